"""Tests for the MobileNetV2 encoder."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.models import MobileNetV2, conv_kernel_init
from g2d_jax.models.mobilenet import InvertedResidual, make_divisible
from tests import model_fixtures


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def test_standard_network_parameter_count_and_features():
  model = MobileNetV2()
  x = jnp.zeros((2, 64, 64, 3))
  out, variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, train=False))
  # torchvision mobilenet_v2: 3,504,872 parameters, of which the classifier
  # Linear(1280, 1000) has 1,281,000.
  assert _count(variables["params"]) == 3_504_872 - 1_281_000
  assert out.shape == (2, 1280) == (2, model.features_dim)


def test_make_divisible_golden():
  assert make_divisible(32 * 1.0) == 32
  assert make_divisible(32 * 0.25) == 8
  assert make_divisible(16 * 0.35) == 8        # 5.6 rounds up to the minimum
  assert make_divisible(24 * 0.75) == 24       # 16 would lose > 10% of 18
  assert make_divisible(1280 * 1.4) == 1792


@pytest.mark.parametrize("width, shape, features", [
    (0.25, (2, 64, 48, 1), 1280),     # last conv keeps >= 1280 channels
    (1.4, (1, 32, 32, 3), 1792),
])
def test_output_shapes(width, shape, features):
  model = MobileNetV2(width_multiplier=width)
  variables = _abstract(model, shape)
  out = jax.eval_shape(functools.partial(model.apply, train=False),
                       variables, jnp.zeros(shape))
  assert out.shape == (shape[0], features) == (shape[0], model.features_dim)


def test_block_layout_strides_and_expansion():
  model = MobileNetV2(width_multiplier=0.5)
  x = jnp.zeros((1, 64, 64, 3))
  _, variables = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, train=False,
                                     capture_intermediates=True))
  inter, params = variables["intermediates"], variables["params"]
  assert sorted(k for k in params if k.startswith("block")) == sorted(
      f"block{i}" for i in range(17))
  # Five stride-2 stages: 64 / 32 = 2; 320 * 0.5 = 160 channels.
  assert inter["block16"]["__call__"][0].shape == (1, 2, 2, 160)
  # The first block (t = 1) has no expansion conv; later ones expand by 6.
  assert "expand_conv" not in params["block0"]
  assert params["block1"]["expand_conv"]["kernel"].shape == (1, 1, 8, 48)
  # Depthwise 3x3 kernel: one input channel per group.
  assert params["block1"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 48)


def test_residual_only_when_shape_is_kept():
  # With the projection BN's scale and bias zeroed the block's branch is 0,
  # so a block with a residual is the identity and one without returns 0.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 24)),
                  jnp.float32)
  keep = InvertedResidual(24, strides=1, expansion=6)
  shrink = InvertedResidual(32, strides=2, expansion=6)
  for module in (keep, shrink):
    abstract = jax.eval_shape(
        lambda m=module: m.init(jax.random.key(0), x, train=False))
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract)
    variables["params"]["project_bn"] = jax.tree.map(
        jnp.zeros_like, variables["params"]["project_bn"])
    out = module.apply(variables, x, train=False)
    if module is keep:
      np.testing.assert_array_equal(out, x)
    else:
      assert out.shape == (1, 4, 4, 32)
      np.testing.assert_array_equal(out, np.zeros_like(out))


def test_convs_use_kaiming_fan_out_without_bias():
  seen = model_fixtures.modules_created(
      lambda: _abstract(MobileNetV2(width_multiplier=0.5), (1, 32, 32, 3)))
  convs = [m for m in seen if isinstance(m, nn.Conv)]
  assert len(convs) == 1 + 17 * 3 - 1 + 1    # stem, blocks, last 1x1 conv
  assert all(c.kernel_init is conv_kernel_init and not c.use_bias
             for c in convs)
