r"""Training-step throughput of the AV-MNIST student: JAX vs PyTorch, by method
and SMP gating pattern.

Each implementation runs in its own long-lived worker process (never two
thread pools in one process); the parent interleaves blocks of steps across
variants (A B C A B C ...), waits for the machine to be quiet before each
block, and records the foreign CPU load during it. Reported per variant:
median/min/max step time over blocks (each block's median), compile time
(apart), first-step time, examples/s, FLOPs from XLA's cost analysis (the
same count for the PyTorch step of the same model and pattern) and achieved
FLOP/s. Ratios (JAX / PyTorch, method / joint) are computed per repetition,
from blocks run side by side.

  python experiments/benchmark_step.py --out experiments/results/step.json
  python experiments/benchmark_step.py --quick --out /tmp/step.json   # < 2 min

Variants: `impl` jax | torch; `method` joint | g2d | (other g2d_jax methods,
JAX only); `pattern` all | audio | image (which modalities train: "audio"
means SMP gates the image branch); `model` paper (two ResNet-18s) | quick
(two stride-2 CNNs); `batch_size`. JAX runs on its default device (a GPU
when jax[cuda12] is installed); PyTorch on `$G2D_TORCH_DEVICE` (default cpu;
experiments/device_check.sh sets cuda).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PATTERNS = ("all", "audio", "image")


# --------------------------------------------------------------------------
# Machine load (Linux /proc/stat), to keep foreign load out of the numbers.


def _busy_jiffies() -> tuple[int, int]:
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:]]
  idle = v[3] + v[4]
  return sum(v) - idle, sum(v)


def machine_busy_cores(seconds: float) -> float:
  b0, t0 = _busy_jiffies()
  time.sleep(seconds)
  b1, t1 = _busy_jiffies()
  ncpu = os.cpu_count() or 1
  return ncpu * (b1 - b0) / max(1, t1 - t0)


def wait_quiet(threshold: float, max_wait: float) -> float:
  """Waits (up to max_wait s) until busy cores over 1 s < threshold."""
  deadline = time.time() + max_wait
  busy = machine_busy_cores(1.0)
  while busy > threshold and time.time() < deadline:
    busy = machine_busy_cores(1.0)
  return busy


# --------------------------------------------------------------------------
# Workers.


def jax_worker() -> None:
  """Serves setup/run commands for JAX variants over stdin/stdout."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(HERE))
  from configs import avmnist  # pylint: disable=g-import-not-at-top
  from g2d_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import build  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import loader  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import steps  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import student  # pylint: disable=g-import-not-at-top

  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  variants = {}

  def fake_dataset(n):
    return synthetic.random_dataset(
        n, {"audio": (112, 112, 1), "image": (28, 28, 1)}, 10,
        "benchmark_random")

  def setup(v):
    cfg = avmnist.get_config(v["model"])
    cfg.unlock()
    for m in ("audio", "image"):
      enc = cfg.model.encoders[m]
      if enc.kind == "resnet18":
        fast = v["kernels"] == "fast"
        enc.conv_impl = "auto" if fast else "xla"
        enc.pool_impl = "fast" if fast else "xla"
    cfg.method = v["method"]
    # As the pipeline runs them: SMP on for G2D only.
    cfg.smp = v["method"] == "g2d"
    cfg.gating.taus = (1,)
    cfg.lock()
    ds = fake_dataset(max(8, v["batch_size"]))
    s = student.build_student(cfg, ds, mesh)
    model, gate, step, state = s.model, s.gate, s.step, s.state
    feats = jax.eval_shape(
        lambda: steps.apply_model(
            model, state.params, state.batch_stats,
            build.example_inputs(ds.splits["train"], 2), train=False)[0])
    rng = np.random.default_rng(1)
    n = v["batch_size"]
    kappa = {"all": (1.0, 1.0), "audio": (1.0, 0.0),
             "image": (0.0, 1.0)}[v["pattern"]]
    batches = []
    for _ in range(4):
      b = ds.splits["train"].batch(rng.permutation(len(ds.splits["train"]))[:n])
      batch = {"index": b["index"], "label": b["label"],
               "inputs": {m: b[m] for m in ("audio", "image")},
               "teacher": {
                   "logits": {m: rng.normal(size=(n, 10)).astype(np.float32)
                              for m in ("audio", "image")},
                   "features": {
                       m: rng.normal(size=(n, feats.features[m].shape[-1]))
                       .astype(np.float32) for m in ("audio", "image")}}}
      batch["gate"] = {
          "kappa": {m: np.float32(k)
                    for m, k in zip(("audio", "image"), kappa)},
          "confidence": {m: np.float32(0.5) for m in ("audio", "image")},
          "pattern": (loader.ALL
                      if v["pattern"] == "all" or not gate.skip_frozen
                      else ("audio", "image").index(v["pattern"]))}
      if not gate.enabled:
        batch["gate"] = {"kappa": {m: np.float32(1)
                                   for m in ("audio", "image")},
                         "confidence": {}, "pattern": loader.ALL}
      batches.append(mesh_lib.shard_batch(batch, mesh))
    pattern = step.split_pattern(batches[0])[0]
    jitted = step.jitted(pattern)
    dbatches = [step.split_pattern(b)[1] for b in batches]
    epoch, key = np.int32(0), jax.random.key(0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, dbatches[0], epoch, key).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    t0 = time.perf_counter()
    state, m = compiled(state, dbatches[0], epoch, key)
    jax.block_until_ready((state, m))
    first_s = time.perf_counter() - t0
    variants[v["id"]] = {"compiled": compiled, "state": state,
                         "batches": dbatches, "i": 0}
    return {"compile_s": compile_s, "flops": flops, "first_step_s": first_s}

  def run(vid, steps_n):
    s = variants[vid]
    times = []
    c0 = os.times()
    for _ in range(steps_n):
      b = s["batches"][s["i"] % len(s["batches"])]
      s["i"] += 1
      t0 = time.perf_counter()
      s["state"], m = s["compiled"](s["state"], b, np.int32(0),
                                    jax.random.key(0))
      jax.block_until_ready((s["state"], m))
      times.append(time.perf_counter() - t0)
    c1 = os.times()
    cpu_s = (c1.user - c0.user) + (c1.system - c0.system)
    return {"times": times, "cpu_s": cpu_s}

  _serve(setup, run)


def torch_worker() -> None:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  sys.path.insert(0, HERE)
  from torch_step import TorchStep  # pylint: disable=g-import-not-at-top
  variants = {}

  def setup(v):
    step = TorchStep(v["model"], v["method"], v["pattern"], v["batch_size"],
                     device=os.environ.get("G2D_TORCH_DEVICE", "cpu"))
    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    variants[v["id"]] = step
    return {"compile_s": 0.0, "flops": 0.0, "first_step_s": first_s}

  def run(vid, steps_n):
    step = variants[vid]
    times = []
    c0 = os.times()
    for _ in range(steps_n):
      t0 = time.perf_counter()
      step()
      times.append(time.perf_counter() - t0)
    c1 = os.times()
    cpu_s = (c1.user - c0.user) + (c1.system - c0.system)
    return {"times": times, "cpu_s": cpu_s}

  _serve(setup, run)


def _serve(setup, run) -> None:
  out = sys.stdout
  sys.stdout = sys.stderr  # keep library prints off the protocol channel
  for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "setup":
      res = setup(msg["variant"])
    elif msg["cmd"] == "run":
      res = run(msg["id"], msg["steps"])
    else:
      return
    out.write(json.dumps(res) + "\n")
    out.flush()


class Worker:
  """A worker subprocess speaking JSON lines."""

  def __init__(self, impl: str):
    env = dict(os.environ)
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), f"--worker={impl}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

  def call(self, **msg):
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker died (exit {self.proc.wait()})")
    return json.loads(line)

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass
    self.proc.wait(timeout=60)


def torch_available() -> bool:
  return importlib.util.find_spec("torch") is not None


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--worker", choices=("jax", "torch"))
  ap.add_argument("--out", help="JSON file for the records")
  ap.add_argument("--quick", action="store_true",
                  help="quick model, batch 16, few repetitions (< 2 min)")
  ap.add_argument("--models", default="paper,quick")
  ap.add_argument("--batch_sizes", default="16,128")
  ap.add_argument("--methods",
                  default="joint,g2d,umt,ogm,ogm_ge,mlb,mmpareto,mla,pmr",
                  help="JAX methods (ume trains nothing); torch implements "
                  "joint and g2d")
  ap.add_argument("--impls", default="jax,torch")
  ap.add_argument("--kernels", default="fast",
                  help="JAX ResNet kernels: xla (XLA's conv and max-pool), "
                  "fast (g2d_jax.models.conv: im2col where faster, "
                  "max-pool gradient without select-and-scatter), or both")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--steps", type=int, default=5, help="steps per block")
  ap.add_argument("--quiet_threshold", type=float, default=0.15,
                  help="busy cores allowed before a block starts")
  ap.add_argument("--max_wait", type=float, default=20.0)
  args = ap.parse_args()
  if args.worker == "jax":
    return jax_worker()
  if args.worker == "torch":
    return torch_worker()
  if not args.out:
    ap.error("--out is required")
  if args.quick:
    args.models, args.batch_sizes, args.reps, args.steps = "quick", "16", 3, 5
  impls = args.impls.split(",")
  if "torch" in impls and not torch_available():
    print("PyTorch is not installed: skipping the torch rows "
          "(pip install torch==2.13.0 for the CPU build).", file=sys.stderr)
    impls = [i for i in impls if i != "torch"]

  variants = []
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  for model, bs in itertools.product(args.models.split(","), batch_sizes):
    for impl in impls:
      methods = args.methods.split(",") if impl == "jax" else ["joint", "g2d"]
      kernels = (args.kernels.split(",") if impl == "jax" and model == "paper"
                 else ["-"])
      for kern in kernels:
        for method in methods:
          patterns = PATTERNS if method == "g2d" else ("all",)
          for pattern in patterns:
            variants.append(dict(id=len(variants), impl=impl, method=method,
                                 pattern=pattern, model=model,
                                 batch_size=bs, kernels=kern))

  workers = {impl: Worker(impl) for impl in impls}
  try:
    setups = {}
    for v in variants:
      setups[v["id"]] = workers[v["impl"]].call(cmd="setup", variant=v)
      print(f"setup {v['impl']:5s} {v['kernels']:4s} {v['model']:5s} "
            f"bs{v['batch_size']:<4d} "
            f"{v['method']:8s} {v['pattern']:6s} compile "
            f"{setups[v['id']]['compile_s']:.1f} s", file=sys.stderr)
    # Same model and pattern: the PyTorch step does the same FLOPs as JAX's
    # plain gated step (XLA's count of the JAX step with all branches).
    blocks = {v["id"]: [] for v in variants}
    loads = {v["id"]: [] for v in variants}
    for rep in range(args.reps):
      for v in variants:
        wait_quiet(args.quiet_threshold, args.max_wait)
        b0, t0 = _busy_jiffies()
        res = workers[v["impl"]].call(cmd="run", id=v["id"], steps=args.steps)
        b1, t1 = _busy_jiffies()
        wall = sum(res["times"])
        busy = (os.cpu_count() or 1) * (b1 - b0) / max(1, t1 - t0)
        foreign = max(0.0, busy - res["cpu_s"] / max(wall, 1e-9))
        blocks[v["id"]].append(statistics.median(res["times"]))
        loads[v["id"]].append(foreign)
      print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
  finally:
    for w in workers.values():
      w.close()

  records = []
  for v in variants:
    s, bl = setups[v["id"]], blocks[v["id"]]
    med = statistics.median(bl)
    flops = s["flops"]
    if v["impl"] == "torch":
      twin = [u for u in variants if u["impl"] == "jax" and
              u["model"] == v["model"] and u["batch_size"] == v["batch_size"]
              and u["method"] == v["method"] and u["pattern"] == "all"
              and u["kernels"] in ("xla", "-")]
      twin = twin or [u for u in variants if u["impl"] == "jax" and
                      u["model"] == v["model"] and
                      u["batch_size"] == v["batch_size"] and
                      u["method"] == v["method"] and u["pattern"] == "all"]
      flops = setups[twin[0]["id"]]["flops"] if twin else 0.0
    records.append(dict(
        impl=v["impl"], method=v["method"], pattern=v["pattern"],
        model=v["model"], batch_size=v["batch_size"], kernels=v["kernels"],
        median_ms=1e3 * med, min_ms=1e3 * min(bl), max_ms=1e3 * max(bl),
        block_medians_ms=[1e3 * x for x in bl], compile_s=s["compile_s"],
        first_step_s=s["first_step_s"], flops=flops,
        examples_per_s=v["batch_size"] / med,
        gflops_per_s=flops / med / 1e9 if flops else None,
        foreign_load_cores=loads[v["id"]]))
  # Ratios from blocks run side by side (same repetition).
  for r in records:
    same = lambda u, r=r, **kw: all(u[k] == kw.get(k, r[k]) for k in
                               ("impl", "method", "pattern", "model",
                                "batch_size", "kernels"))
    joint = [u for u in records if same(u, method="joint", pattern="all")]
    torch_twin = [u for u in records if same(u, impl="torch", kernels="-")]
    if joint:
      r["ratio_to_joint"] = statistics.median(
          a / b for a, b in zip(r["block_medians_ms"],
                                joint[0]["block_medians_ms"]))
    if r["impl"] == "jax" and torch_twin:
      r["jax_over_torch"] = statistics.median(
          a / b for a, b in zip(r["block_medians_ms"],
                                torch_twin[0]["block_medians_ms"]))
  meta = {"cpu": _cpu_model(), "cores": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "reps": args.reps, "steps_per_block": args.steps,
          "date": time.strftime("%Y-%m-%d %H:%M")}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "records": records}, f, indent=1)
  print_table(records)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "?"


def print_table(records) -> None:
  head = (f"{'impl':5s} {'kern':4s} {'model':5s} {'bs':>4s} {'method':9s} "
          f"{'pattern':7s} "
          f"{'median ms':>10s} {'min':>8s} {'max':>8s} {'ex/s':>7s} "
          f"{'GFLOP/s':>8s} {'/joint':>7s} {'jax/torch':>9s} {'compile s':>9s}")
  print(head)
  for r in records:
    fmt = lambda k, f, r=r: (f % r[k]) if r.get(k) is not None else "-"
    print(f"{r['impl']:5s} {r['kernels']:4s} {r['model']:5s} "
          f"{r['batch_size']:4d} "
          f"{r['method']:9s} {r['pattern']:7s} {r['median_ms']:10.1f} "
          f"{r['min_ms']:8.1f} {r['max_ms']:8.1f} {r['examples_per_s']:7.1f} "
          f"{fmt('gflops_per_s', '%.1f'):>8s} "
          f"{fmt('ratio_to_joint', '%.3f'):>7s} "
          f"{fmt('jax_over_torch', '%.3f'):>9s} {r['compile_s']:9.1f}")


if __name__ == "__main__":
  main()
