r"""Per-layer kernel timings behind `g2d_jax.models.conv` (CPU).

For every convolution shape of the AV-MNIST `paper` model (two ResNet-18s:
audio 112x112, image 28x28) and the stem max-pool, times the forward and the
backward (input and kernel gradients) of XLA's kernels against the im2col
matrix product and the select-and-scatter-free max-pool, compiled, with
`block_until_ready`, medians of repeated runs; also reports what
`conv_impl="auto"` picks. Writes JSON with `--out`.

  python experiments/conv_kernels.py --batch_size=16 --out=/tmp/conv16.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
from g2d_jax.models import conv as conv_lib  # pylint: disable=wrong-import-position

# (name, input size, Cin, Cout, kernel, stride, padding)
LAYERS = [
    ("audio stem 7x7/2", 112, 1, 64, 7, 2, 3),
    ("audio layer1 3x3 64@28", 28, 64, 64, 3, 1, 1),
    ("audio layer2.0 3x3/2 64>128", 28, 64, 128, 3, 2, 1),
    ("audio layer2 3x3 128@14", 14, 128, 128, 3, 1, 1),
    ("audio layer2 down 1x1/2", 28, 64, 128, 1, 2, 0),
    ("audio layer3.0 3x3/2 128>256", 14, 128, 256, 3, 2, 1),
    ("audio layer3 3x3 256@7", 7, 256, 256, 3, 1, 1),
    ("audio layer4.0 3x3/2 256>512", 7, 256, 512, 3, 2, 1),
    ("audio layer4 3x3 512@4", 4, 512, 512, 3, 1, 1),
    ("image stem 7x7/2", 28, 1, 64, 7, 2, 3),
    ("image layer1 3x3 64@7", 7, 64, 64, 3, 1, 1),
    ("image layer2 3x3 128@4", 4, 128, 128, 3, 1, 1),
    ("image layer3.0 3x3/2 128>256", 4, 128, 256, 3, 2, 1),
    ("image layer3 3x3 256@2", 2, 256, 256, 3, 1, 1),
    ("image layer4.0 3x3/2 256>512", 2, 256, 512, 3, 2, 1),
    ("image layer4 3x3 512@1", 1, 512, 512, 3, 1, 1),
]


def bench(fn, args, n: int, reps: int) -> float:
  """Median over `reps` of the median of `n` timed calls (s)."""
  f = jax.jit(fn)
  jax.block_until_ready(f(*args))
  meds = []
  for _ in range(reps):
    ts = []
    for _ in range(n):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      ts.append(time.perf_counter() - t0)
    meds.append(statistics.median(ts))
  return statistics.median(meds)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--n", type=int, default=10, help="timed calls per rep")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  bs, rows = args.batch_size, []
  print(f"batch {bs}; ms: forward xla / im2col | backward xla / im2col "
        "| auto")
  for name, h, cin, cout, k, s, p in LAYERS:
    x = jnp.asarray(rng.normal(size=(bs, h, h, cin)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
    pad = ((p, p), (p, p))
    f = {impl: functools.partial(conv_lib.conv2d, strides=(s, s),
                                 padding=pad, impl=impl)
         for impl in ("xla", "im2col")}
    g = jnp.ones(jax.eval_shape(f["xla"], x, w).shape, jnp.float32)
    # The stem's input gradient is never needed (it is the data).
    argnums = (1,) if cin == 1 else (0, 1)
    back = {impl: jax.grad(lambda x, w, fn=fn, g=g: jnp.sum(fn(x, w) * g),
                           argnums) for impl, fn in f.items()}
    t = {f"fwd_{i}": bench(f[i], (x, w), args.n, args.reps)
         for i in f} | {f"bwd_{i}": bench(back[i], (x, w), args.n, args.reps)
                        for i in f}
    auto = conv_lib.choose_impl("auto", (h, h), (k, k), (s, s), pad, cin)
    rows.append({"layer": name, "auto": auto,
                 **{key: 1e3 * v for key, v in t.items()}})
    print(f"{name:30s} {1e3 * t['fwd_xla']:7.2f} / {1e3 * t['fwd_im2col']:7.2f}"
          f" | {1e3 * t['bwd_xla']:7.2f} / {1e3 * t['bwd_im2col']:7.2f} | "
          f"{auto}", flush=True)
  # The stem max-pool: 3x3/2, pad 1, on ReLU outputs (many ties).
  for name, h in (("audio stem max-pool", 56), ("image stem max-pool", 14)):
    x = jnp.asarray(np.maximum(rng.normal(size=(bs, h, h, 64)), 0).astype(
        np.float32))
    pools = {impl: functools.partial(conv_lib.max_pool, impl=impl)
             for impl in conv_lib.POOL_IMPLS}
    g = jnp.ones(jax.eval_shape(pools["xla"], x).shape, jnp.float32)
    t = {}
    for impl, fn in pools.items():
      t[f"fwd_{impl}"] = bench(fn, (x,), args.n, args.reps)
      grad = jax.grad(lambda x, fn=fn, g=g: jnp.sum(fn(x) * g))
      t[f"bwd_{impl}"] = bench(grad,
                               (x,), args.n, args.reps)
    rows.append({"layer": name, **{key: 1e3 * v for key, v in t.items()}})
    print(f"{name:30s} {1e3 * t['fwd_xla']:7.2f} / {1e3 * t['fwd_fast']:7.2f}"
          f" | {1e3 * t['bwd_xla']:7.2f} / {1e3 * t['bwd_fast']:7.2f} | "
          "fast", flush=True)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"batch_size": bs, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
