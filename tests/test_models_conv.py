"""The CPU-friendly convolution and max-pool compute what XLA's do."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.models import ResNet18
from g2d_jax.models import conv as conv_lib
from tests.model_fixtures import host_variables

SHAPES = [  # (H, Cin, Cout, k, stride, padding)
    (1, 8, 6, 3, 1, ((1, 1), (1, 1))),     # only the centre tap is real
    (2, 8, 6, 3, 1, ((1, 1), (1, 1))),
    (5, 4, 3, 3, 1, ((1, 1), (1, 1))),
    (7, 4, 6, 3, 2, ((1, 1), (1, 1))),     # 7 -> 4
    (6, 5, 3, 1, 2, ((0, 0), (0, 0))),     # strided 1x1 (downsample)
    (12, 1, 4, 7, 2, ((3, 3), (3, 3))),    # ResNet stem
    (9, 3, 2, 4, 4, ((0, 0), (0, 0))),     # patchify-like, VALID
    (6, 3, 2, 3, 1, ((2, 0), (0, 1))),     # asymmetric padding
]


def _xla(x, w, s, p):
  return jax.lax.conv_general_dilated(x, w, (s, s), p,
                                      dimension_numbers=("NHWC", "HWIO",
                                                         "NHWC"))


@pytest.mark.parametrize("h,cin,cout,k,s,p", SHAPES)
def test_im2col_equals_xla_conv_values_and_gradients(h, cin, cout, k, s, p):
  rng = np.random.default_rng(h * 31 + k)
  x = rng.normal(size=(3, h, h, cin)).astype(np.float32)
  w = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
  want = _xla(x, w, s, p)
  got = conv_lib.conv2d(x, w, (s, s), p, impl="im2col")
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g = rng.normal(size=want.shape).astype(np.float32)
  grad = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * g), (0, 1))(x, w)
  for a, b in zip(grad(lambda x, w: conv_lib.conv2d(x, w, (s, s), p,
                                                    impl="im2col")),
                  grad(lambda x, w: _xla(x, w, s, p))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_valid_taps_by_hand():
  assert conv_lib.valid_taps(1, 3, 1, 1, 1) == [1]        # 1x1 map
  assert conv_lib.valid_taps(2, 3, 1, 1, 1) == [0, 1, 2]
  assert conv_lib.valid_taps(2, 3, 2, 1, 1) == [1, 2]      # 2 -> 1, stride 2
  assert conv_lib.valid_taps(1, 7, 2, 3, 3) == [3]


def test_auto_picks_im2col_where_it_measured_faster():
  pad1 = ((1, 1), (1, 1))
  pick = lambda hw, k, s, p, c: conv_lib.choose_impl("auto", (hw, hw), (k, k),
                                                     (s, s), p, c)
  assert pick(28, 3, 1, pad1, 64) == "xla"      # ResNet layer1 @28
  assert pick(112, 7, 2, ((3, 3), (3, 3)), 1) == "xla"   # audio stem
  assert pick(2, 3, 1, pad1, 256) == "im2col"   # image layer3 @2x2
  assert pick(1, 3, 1, pad1, 512) == "im2col"   # image layer4 @1x1
  assert pick(28, 1, 2, ((0, 0), (0, 0)), 64) == "im2col"   # downsample
  assert pick(28, 3, 2, pad1, 64) == "im2col"   # strided 3x3
  with pytest.raises(ConfigError, match="conv_impl='fft'"):
    conv_lib.choose_impl("fft", (4, 4), (3, 3), (1, 1), pad1, 4)


def test_off_the_cpu_auto_and_fast_are_xlas_own(monkeypatch):
  """The CPU-tuned choices resolve to XLA's kernels on a GPU or TPU: the
  im2col shapes above are XLA convolutions, and the fast pooling's gradient
  is XLA's select-and-scatter (the fast one has none)."""
  pad1 = ((1, 1), (1, 1))
  x = np.zeros((1, 8, 8, 2), np.float32)
  grad_ops = lambda: str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(
      conv_lib.max_pool(x, 3, 2, 1, impl="fast"))))(x))
  assert "select_and_scatter_add" not in grad_ops()
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert conv_lib.choose_impl("auto", (2, 2), (3, 3), (1, 1), pad1,
                                256) == "xla"
    assert conv_lib.choose_impl("auto", (28, 28), (1, 1), (2, 2),
                                ((0, 0), (0, 0)), 64) == "xla"
    assert conv_lib.choose_impl("im2col", (2, 2), (3, 3), (1, 1), pad1,
                                256) == "im2col"   # asked for by name
    assert "select_and_scatter_add" in grad_ops()


def test_conv_module_has_flax_conv_parameters():
  x = np.ones((2, 5, 5, 3), np.float32)
  key = jax.random.key(0)
  ours = conv_lib.Conv(4, (3, 3), padding=((1, 1), (1, 1)), impl="im2col")
  ref = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)))
  po, pr = ours.init(key, x), ref.init(key, x)
  assert jax.tree.structure(po) == jax.tree.structure(pr)
  for a, b in zip(jax.tree.leaves(po), jax.tree.leaves(pr)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(ours.apply(po, x), ref.apply(pr, x), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("h", [8, 9, 14])
def test_fast_max_pool_equals_xla_values_and_gradient_with_ties(h):
  rng = np.random.default_rng(h)
  # After a ReLU about half the values are 0: windows full of ties.
  x = np.maximum(rng.normal(size=(2, h, h, 3)), 0).astype(np.float32)
  x[0, :3, :3, 0] = 1.5                 # a window of equal maxima
  ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2),
                              padding=((1, 1), (1, 1)))
  fast = functools.partial(conv_lib.max_pool, window=3, stride=2, pad=1,
                           impl="fast")
  np.testing.assert_array_equal(fast(x), ref(x))
  g = rng.normal(size=ref(x).shape).astype(np.float32)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * g))(x)
  a, b = grad(fast), grad(ref)
  # Same routing (the first maximum in row-major order); only the order of
  # adding overlapping windows' contributions may differ.
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(a != 0, b != 0)
  with pytest.raises(ConfigError, match="pool_impl"):
    conv_lib.max_pool(x, impl="numpy")


def test_fast_max_pool_gradient_after_batchnorm_under_jit():
  """Jitted, with BatchNorm + ReLU in front (as in the ResNet stem), every
  window still routes its gradient: XLA:CPU recomputes the fused producer
  in the backward with other rounding, and an `x == max` search lost whole
  windows (found as a 10% error on the stem's BatchNorm gradient)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 14, 14, 8)).astype(np.float32)
  g = rng.normal(size=(4, 7, 7, 8)).astype(np.float32)

  def loss(x, impl):
    m, v = x.mean((0, 1, 2)), x.var((0, 1, 2))
    z = jax.nn.relu((x - m) * jax.lax.rsqrt(v + 1e-5) * 1.3 + 0.2)
    return jnp.sum(conv_lib.max_pool(z, 3, 2, 1, impl=impl) * g)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  a, b = grad(x, "fast"), grad(x, "xla")
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  assert float(np.abs(b).max()) > 1.0


def test_resnet_fast_kernels_compute_the_same_network():
  """Same parameter tree and, within float32 rounding, the same features
  and gradients as the XLA kernels (AV-MNIST image: tiny late maps)."""
  x = np.random.default_rng(0).normal(size=(4, 28, 28, 1)).astype(np.float32)
  slow = ResNet18(width=8)
  fast = ResNet18(width=8, conv_impl="auto", pool_impl="fast")
  variables = host_variables(slow, x, train=False)
  assert (jax.tree.structure(host_variables(fast, x, train=False))
          == jax.tree.structure(variables))

  def loss(model, params):
    y, _ = model.apply({"params": params,
                        "batch_stats": variables["batch_stats"]}, x,
                       train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y))

  for model in (slow, fast):
    model.loss = functools.partial(loss, model)
  # Jitted: op-by-op dispatch of a ResNet's backward pass is slower than
  # compiling it.
  ls, gs = jax.jit(jax.value_and_grad(slow.loss))(variables["params"])
  lf, gf = jax.jit(jax.value_and_grad(fast.loss))(variables["params"])
  np.testing.assert_allclose(lf, ls, rtol=1e-5)
  # Train-mode BatchNorm over a 1x1 map of 4 samples amplifies float32
  # rounding, so compare each gradient tensor by its relative error norm.
  for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gs)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-6
