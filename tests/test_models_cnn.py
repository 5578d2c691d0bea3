"""Tests for the LeNet-style SmallCNN and the MLP encoder.

Forward tests fill variables on the host (model_fixtures): XLA's CPU
compile of `jax.random` costs seconds per distinct shape here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.models import MLP, SmallCNN, lenet_channels
from tests import model_fixtures
from tests.model_fixtures import host_variables


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, x, **kwargs):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False, **kwargs))


def test_lenet_channels_follow_multibench():
  assert lenet_channels(6, 3) == (6, 12, 24, 48)
  assert lenet_channels(6, 5) == (6, 12, 24, 48, 96, 192)


def test_multibench_image_encoder_parameter_count():
  params = _abstract(SmallCNN(), jnp.zeros((1, 28, 28, 1)))["params"]
  # LeNet(1, 6, 3): 5x5x1x6 + 3x3x(6x12 + 12x24 + 24x48) conv weights (no
  # bias) and BN scale/bias on 6+12+24+48 channels.
  convs = 25 * 6 + 9 * (6 * 12 + 12 * 24 + 24 * 48)
  assert _count(params) == convs + 2 * (6 + 12 + 24 + 48) == 13_938
  assert "bias" not in params["conv0"]


@pytest.mark.parametrize("downsample, last_conv_hw", [
    # Pooling floors (28 -> 14 -> 7 -> 3 before the last pool); a stride-2
    # conv with "same" padding rounds up (28 -> 14 -> 7 -> 4 -> 2).
    ("maxpool", (3, 3)), ("avgpool", (3, 3)), ("stride", (2, 2))])
@pytest.mark.parametrize("shape, channels", [
    ((2, 28, 28, 1), lenet_channels(6, 3)),      # AV-MNIST digit
    ((2, 112, 112, 1), lenet_channels(6, 5)),    # AV-MNIST spectrogram
])
def test_output_shapes(downsample, last_conv_hw, shape, channels):
  model = SmallCNN(channels=channels, downsample=downsample)
  x = jnp.zeros(shape)
  _, state = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, train=False,
                                     capture_intermediates=True))
  last = f"conv{len(channels) - 1}"
  conv_out = state["intermediates"][last]["__call__"][0]
  assert conv_out.shape == (2,) + last_conv_hw + (channels[-1],)
  assert state["intermediates"]["__call__"][0].shape == (2, channels[-1])
  assert model.features_dim == channels[-1]


def test_downsampling_golden_values():
  # One 1x1 conv with kernel 1 and no BN: features = mean(pool(relu(x))).
  x = (np.arange(16, dtype=np.float32) - 5).reshape(1, 4, 4, 1)
  relu = np.maximum(x[0, :, :, 0], 0)
  blocks = relu.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(2, 2, 4)
  expected = {
      "maxpool": blocks.max(-1).mean(),
      "avgpool": blocks.mean(-1).mean(),
      "stride": relu[::2, ::2].mean(),   # 1x1 stride-2 conv samples pixels
  }
  for downsample, value in expected.items():
    model = SmallCNN(channels=(1,), first_kernel_size=1, downsample=downsample,
                     use_batchnorm=False)
    variables = {"params": {"conv0": {"kernel": jnp.ones((1, 1, 1, 1)),
                                      "bias": jnp.zeros((1,))}}}
    out = model.apply(variables, jnp.asarray(x), train=False)
    np.testing.assert_allclose(out, [[value]], rtol=1e-6)


def test_batch_norm_optional_and_bias_only_without_it():
  params = _abstract(SmallCNN(channels=(4, 8), use_batchnorm=False),
                     jnp.zeros((1, 8, 8, 1)))["params"]
  assert sorted(params) == ["conv0", "conv1"]
  assert params["conv1"]["bias"].shape == (8,)


def test_invalid_configs_raise_config_error_at_construction():
  with pytest.raises(ConfigError, match="maxpool"):
    SmallCNN(downsample="unpool")
  with pytest.raises(ConfigError, match="at least one"):
    SmallCNN(channels=())
  with pytest.raises(ConfigError, match="at least one"):
    MLP(hidden_dims=())


def test_cnn_batch_stats_change_in_train_mode_only():
  model = SmallCNN(channels=(4, 8), downsample="stride")
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 1)).astype(np.float32)
  model_fixtures.assert_batch_stats_move_in_train_mode_only(model, x)


def test_mlp_shapes_and_flattening():
  model = MLP(hidden_dims=(16, 8))
  x = jnp.zeros((3, 2, 5))
  variables = _abstract(model, x)
  assert variables["params"]["dense0"]["kernel"].shape == (10, 16)
  out = jax.eval_shape(functools.partial(model.apply, train=False),
                       variables, x)
  assert out.shape == (3, 8) and model.features_dim == 8


def test_mlp_forward_golden():
  model = MLP(hidden_dims=(3, 2))
  x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
  variables = host_variables(model, x, train=False)
  p = jax.tree.map(np.asarray, variables["params"])
  hidden = np.maximum(x @ p["dense0"]["kernel"] + p["dense0"]["bias"], 0)
  expected = np.maximum(hidden @ p["dense1"]["kernel"] + p["dense1"]["bias"], 0)
  np.testing.assert_allclose(model.apply(variables, x, train=False), expected,
                             rtol=1e-5, atol=1e-6)


def test_mlp_batch_norm_golden_in_train_and_eval_mode():
  model = MLP(hidden_dims=(3,), use_batchnorm=True)
  x = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
  variables = host_variables(model, x, train=False)
  p = jax.tree.map(np.asarray, variables["params"])
  stats = jax.tree.map(np.asarray, variables["batch_stats"])
  assert "bias" not in p["dense0"]          # BN's bias replaces it
  pre = x.astype(np.float64) @ p["dense0"]["kernel"]
  scale, shift = p["bn0"]["scale"], p["bn0"]["bias"]

  out, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  mean, var = pre.mean(0), pre.var(0)       # Flax keeps the biased variance
  np.testing.assert_allclose(
      out, np.maximum((pre - mean) / np.sqrt(var + 1e-5) * scale + shift, 0),
      rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["bn0"]["mean"],
                             0.9 * stats["bn0"]["mean"] + 0.1 * mean,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["bn0"]["var"],
                             0.9 * stats["bn0"]["var"] + 0.1 * var,
                             rtol=1e-5, atol=1e-6)

  out = model.apply(variables, x, train=False)
  running = (pre - stats["bn0"]["mean"]) / np.sqrt(stats["bn0"]["var"] + 1e-5)
  np.testing.assert_allclose(out, np.maximum(running * scale + shift, 0),
                             rtol=1e-4, atol=1e-5)


def test_mlp_dropout_in_train_mode_only():
  model = MLP(hidden_dims=(512,), dropout_rate=0.5)
  x = jnp.ones((2, 4))
  variables = host_variables(model, x, train=False)
  evaluated = np.asarray(model.apply(variables, x, train=False))
  out = np.asarray(model.apply(variables, x, train=True,
                               rngs={"dropout": jax.random.key(0)}))
  active = evaluated > 0
  kept = out[active] != 0
  # About half of the active units survive (binomial SE < 0.03 here) and the
  # survivors are scaled by 1 / (1 - rate).
  assert active.sum() > 300
  assert 0.4 < kept.mean() < 0.6
  np.testing.assert_allclose(out[active][kept], 2 * evaluated[active][kept],
                             rtol=1e-6)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True)


def test_dense_initialiser_is_xavier_normal():
  # A 256x1024 Dense of the MLP itself: Xavier's Var = 2 / (fan_in + fan_out)
  # = 1/640, distinct from fan-in (1/256) and fan-out (1/1024) scalings.
  model = MLP(hidden_dims=(1024,))
  params = model.init(jax.random.key(0), jnp.zeros((1, 256)),
                      train=False)["params"]
  kernel = np.asarray(params["dense0"]["kernel"], np.float64)
  assert kernel.shape == (256, 1024)
  n, var = kernel.size, 2.0 / (256 + 1024)
  # E[w^2] = var with standard error var * sqrt(2 / n) (0.28% here): 6 SE.
  assert abs(np.mean(kernel**2) / var - 1) < 6 * np.sqrt(2 / n)
  # Kurtosis of a normal is 3 (SE sqrt(24 / n)); uniform has 1.8, a 2-sigma
  # truncated normal about 2.4, so this pins "untruncated normal".
  assert abs(np.mean(kernel**4) / var**2 - 3) < 6 * np.sqrt(24 / n)
  assert abs(np.mean(kernel)) < 6 * np.sqrt(var / n)
  np.testing.assert_array_equal(params["dense0"]["bias"], np.zeros(1024))


def test_patchify_first_layer_is_a_patch_embedding():
  """patchify=4: the first conv is a non-overlapping 4x4 patch embedding
  (a reshape and a matrix product, checked in NumPy), then stride-2 convs."""
  model = SmallCNN(channels=(16, 32), downsample="stride",
                   use_batchnorm=False, patchify=4)
  x = np.random.default_rng(0).normal(size=(2, 112, 112, 1)).astype(
      np.float32)
  variables = host_variables(model, x, train=False)
  k = np.asarray(variables["params"]["conv0"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["conv0"]["bias"], np.float64)
  assert k.shape == (4, 4, 1, 16)
  _, inter = model.apply(variables, x, train=False,
                         capture_intermediates=True)
  first = np.asarray(inter["intermediates"]["conv0"]["__call__"][0])
  assert first.shape == (2, 28, 28, 16)
  patches = x.astype(np.float64).reshape(2, 28, 4, 28, 4, 1).transpose(
      0, 1, 3, 2, 4, 5).reshape(2, 28, 28, 16)
  np.testing.assert_allclose(first, patches @ k.reshape(16, 16) + b,
                             rtol=1e-5, atol=1e-5)
  out = model.apply(variables, x, train=False)
  assert out.shape == (2, 32)   # 28x28 -> 14x14 by the stride-2 conv
  params = _abstract(model, jnp.zeros((1, 112, 112, 1)))["params"]
  assert _count(params) == 16 * 16 + 16 + 9 * 16 * 32 + 32
