"""Convolution and max-pooling with CPU-friendly implementations (G2D A.4.1
models, issue "a G2D step that beats PyTorch on the same CPU").

XLA:CPU's convolutions are slow on the shapes deep in a ResNet-18 on small
inputs (`experiments/README.md`, "Step throughput", has the per-layer
measurements): a 3x3 conv on a 2x2 or 1x1 map (the AV-MNIST image encoder's
last two stages) runs 10-20x slower than the same product as a matrix
multiply, and strided and 1x1 convs about 1.2-2.5x slower; the gradient of
`reduce_window` max-pooling (select-and-scatter) is 3-4x slower than routing
the gradient with nine compares. Everything here computes the same function
as `flax.linen.Conv` / `nn.max_pool` (tests compare values and gradients);
only the summation order, and so the last bits of float32, may differ.

- `conv2d(..., impl="im2col")`: gathers the kernel taps into a patch matrix
  [B*Ho*Wo, taps*Cin] and multiplies it by the kernel [taps*Cin, Cout]. Taps
  that only ever read padding (e.g. all but the centre tap of a 3x3 conv on
  a 1x1 map) are dropped, which is exact: they multiply zeros.
- `impl="auto"` picks im2col where it measured faster on this CPU (1x1
  kernels, outputs of at most 4 positions, 3x3 strided convs with Cin >= 16)
  and XLA's convolution elsewhere (stride-1 convs on large maps, the stem);
  on a GPU or TPU it is always XLA's convolution.
- `max_pool(..., impl="fast")`: the forward is XLA's `reduce_window`; the
  backward sends each output's gradient to the first maximum of its window
  in row-major order, exactly the choice XLA's select-and-scatter makes, so
  ties (frequent after a ReLU) are broken identically. Off the CPU it is
  XLA's pooling.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from g2d_jax.errors import ConfigError

Array = jax.Array
CONV_IMPLS = ("xla", "im2col", "auto")
POOL_IMPLS = ("xla", "fast")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _out_size(n: int, k: int, s: int, lo: int, hi: int) -> int:
  return (n + lo + hi - k) // s + 1


def valid_taps(n: int, k: int, s: int, lo: int, hi: int) -> list[int]:
  """Kernel offsets along one axis that read real input for some output."""
  out = _out_size(n, k, s, lo, hi)
  return [i for i in range(k) if any(0 <= o * s + i - lo < n
                                     for o in range(out))]


def on_cpu() -> bool:
  """Whether the computation runs on XLA:CPU (the default backend)."""
  return jax.default_backend() == "cpu"


def choose_impl(impl: str, in_hw: tuple[int, int], kernel_hw: tuple[int, int],
                strides: tuple[int, int], padding: Padding,
                in_features: int) -> str:
  """The implementation `impl` resolves to for one convolution shape."""
  if impl not in CONV_IMPLS:
    raise ConfigError(f"conv_impl={impl!r} is not one of {CONV_IMPLS}.")
  if impl != "auto":
    return impl
  if not on_cpu():
    # The choices below come from CPU timings; GPUs and TPUs get XLA's own
    # convolutions (cuDNN, the TPU's).
    return "xla"
  (kh, kw), (sh, sw) = kernel_hw, strides
  positions = (_out_size(in_hw[0], kh, sh, *padding[0])
               * _out_size(in_hw[1], kw, sw, *padding[1]))
  if (kh, kw) == (1, 1) or positions <= 4:
    return "im2col"
  if max(sh, sw) > 1 and max(kh, kw) <= 3 and in_features >= 16:
    return "im2col"
  return "xla"


def conv2d(x_BxHxWxC: Array, kernel_HWIO: Array, strides: Sequence[int],
           padding: Padding, impl: str = "xla") -> Array:
  """2-D convolution (cross-correlation), NHWC input, HWIO kernel.

  Args:
    x_BxHxWxC: input.
    kernel_HWIO: kernel [kh, kw, Cin, Cout].
    strides: (sh, sw).
    padding: explicit ((top, bottom), (left, right)).
    impl: "xla" (`lax.conv_general_dilated`), "im2col" or "auto".

  Returns:
    [B, Ho, Wo, Cout].
  """
  kh, kw, cin, cout = kernel_HWIO.shape
  strides = tuple(int(s) for s in strides)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  impl = choose_impl(impl, x_BxHxWxC.shape[1:3], (kh, kw), strides, padding,
                     cin)
  if impl == "xla":
    return jax.lax.conv_general_dilated(
        x_BxHxWxC, kernel_HWIO, strides, padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  b, h, w, _ = x_BxHxWxC.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
  ho, wo = _out_size(h, kh, sh, pt, pb), _out_size(w, kw, sw, pl, pr)
  rows, cols = valid_taps(h, kh, sh, pt, pb), valid_taps(w, kw, sw, pl, pr)
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in rows for j in cols]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  kernel = kernel_HWIO[np.array(rows)][:, np.array(cols)].reshape(-1, cout)
  out = jnp.dot(patches.reshape(b * ho * wo, -1), kernel)
  return out.reshape(b, ho, wo, cout)


class Conv(nn.Module):
  """`flax.linen.Conv` (NHWC, explicit padding) with a choice of kernels.

  Parameters are `kernel` [kh, kw, Cin, Cout] and `bias` [Cout], created
  exactly as `nn.Conv` creates them, so checkpoints and parameter paths do
  not depend on `impl`.
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Any = ((0, 0), (0, 0))
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.kernel_size
    strides = ((self.strides,) * 2 if isinstance(self.strides, int)
               else tuple(self.strides))
    padding = self.padding
    if padding == "VALID":
      padding = ((0, 0), (0, 0))
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    y = conv2d(x, kernel.astype(x.dtype), strides, padding, self.impl)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,),
                         jnp.float32).astype(y.dtype)
    return y


def _reduce_max(x: Array, window: int, stride: int, pad: int) -> Array:
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, window, window, 1),
      (1, stride, stride, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _fast_max_pool(x: Array, window: int, stride: int, pad: int) -> Array:
  return _reduce_max(x, window, stride, pad)


def _window_views(x: Array, window: int, stride: int, pad: int,
                  ho: int, wo: int):
  """(i, j, x's values at window tap (i, j) of every output position)."""
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
               constant_values=-jnp.inf)
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  for i in range(window):          # row-major window order
    for j in range(window):
      yield i, j, xp[:, i:i + span_h:stride, j:j + span_w:stride, :]


def _fast_max_pool_fwd(x, window, stride, pad):
  y = _reduce_max(x, window, stride, pad)
  # The tap holding each window's first maximum (XLA's select-and-scatter
  # with `>=` routes the gradient there), found in the forward pass. The
  # backward must not find it by `x == y`: XLA:CPU may fuse x's producer
  # (BatchNorm + ReLU) into several consumers and compute it with
  # different rounding in each, so that no tap equals y and the window's
  # gradient is lost (it lost 10% of a ResNet stem's BatchNorm gradient).
  best = jnp.full(y.shape, -jnp.inf, x.dtype)
  tap = jnp.zeros(y.shape, jnp.int8)
  for k, (_, _, xs) in enumerate(_window_views(x, window, stride, pad,
                                               *y.shape[1:3])):
    better = xs > best
    best = jnp.where(better, xs, best)
    tap = jnp.where(better, jnp.int8(k), tap)
  return y, (tap, x.shape)


def _fast_max_pool_bwd(window, stride, pad, res, dy):
  tap, x_shape = res
  _, h, w, _ = x_shape
  ho, wo = dy.shape[1:3]
  hp, wp = h + 2 * pad, w + 2 * pad
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
  dxp = jnp.zeros((x_shape[0], hp, wp, x_shape[3]), dy.dtype)
  zero = jnp.zeros((), dy.dtype)
  for k in range(window * window):
    i, j = divmod(k, window)
    dxp = dxp + jax.lax.pad(
        jnp.where(tap == k, dy, zero), zero,
        ((0, 0, 0), (i, hp - i - span_h, stride - 1),
         (j, wp - j - span_w, stride - 1), (0, 0, 0)))
  return (dxp[:, pad:pad + h, pad:pad + w, :],)


_fast_max_pool.defvjp(_fast_max_pool_fwd, _fast_max_pool_bwd)


def max_pool(x_BxHxWxC: Array, window: int = 3, stride: int = 2,
             pad: int = 1, impl: str = "xla") -> Array:
  """Square max-pooling with symmetric padding (ResNet's 3x3/2, pad 1)."""
  if impl not in POOL_IMPLS:
    raise ConfigError(f"pool_impl={impl!r} is not one of {POOL_IMPLS}.")
  # "fast" works around XLA:CPU's slow select-and-scatter; elsewhere XLA's
  # own pooling gradient is the fast one.
  if impl == "xla" or not on_cpu():
    return nn.max_pool(x_BxHxWxC, (window, window), strides=(stride, stride),
                       padding=((pad, pad), (pad, pad)))
  return _fast_max_pool(x_BxHxWxC, window, stride, pad)
