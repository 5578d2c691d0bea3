"""Tests for the official-variant ResNet-18 encoder.

XLA's CPU compile of `jax.random` costs seconds per distinct shape here, so
forward-path tests fill the variables on the host (model_fixtures);
initialiser statistics are tested on single layers and the wiring of the
initialisers is checked by interception under `eval_shape`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.models import conv as conv_lib
from g2d_jax.models import ResNet18, conv_kernel_init
from g2d_jax.models import initializers as inits
from tests import model_fixtures
from tests.model_fixtures import host_variables


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_init(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


MODEL = ResNet18(width=4)
VIDEO = jnp.asarray(
    np.random.default_rng(1).normal(size=(2, 3, 16, 16, 3)), jnp.float32)


@functools.partial(jax.jit, static_argnames=("train", "mutable"))
def _apply(variables, x, train=False, mutable=False):
  return MODEL.apply(variables, x, train=train, mutable=mutable)


@pytest.fixture(scope="module")
def video_variables():
  return host_variables(MODEL, VIDEO, train=False)


@pytest.fixture(scope="module")
def video_eval(video_variables):
  """Eval-mode features and the (allowed to change) batch stats, jitted once."""
  return _apply(video_variables, VIDEO, train=False, mutable=("batch_stats",))


def test_default_one_channel_parameter_count_matches_official():
  variables = _abstract_init(ResNet18(), (1, 32, 32, 1))
  # torchvision resnet18 has 11,689,512 parameters; minus fc (512*1000+1000)
  # and minus the 2 extra input channels of conv1 (2*64*7*7).
  assert _count(variables["params"]) == 11_689_512 - 513_000 - 2 * 64 * 49
  assert _count(variables["params"]) == 11_170_240
  # Running mean and variance of 4,800 BN channels are not parameters.
  assert _count(variables["batch_stats"]) == 2 * 4_800


def test_three_channel_stem_takes_channels_from_input():
  variables = _abstract_init(ResNet18(), (1, 32, 32, 3))
  assert _count(variables["params"]) == 11_689_512 - 513_000
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)


def test_feature_map_sizes_and_width_variant():
  # 112x112 audio gives a 4x4 layer4 map (official: AV-MNIST audio 4x4).
  x = jnp.zeros((2, 112, 112, 1))
  _, state = jax.eval_shape(
      lambda: MODEL.init_with_output(jax.random.key(0), x, train=False,
                                     capture_intermediates=True))
  inter = state["intermediates"]
  assert inter["layer1_1"]["__call__"][0].shape == (2, 28, 28, 4)
  assert inter["layer4_1"]["__call__"][0].shape == (2, 4, 4, 32)
  assert inter["__call__"][0].shape == (2, 32)
  assert MODEL.features_dim == 32
  assert ResNet18().features_dim == 512


@pytest.mark.parametrize("shape, expected", [
    ((2, 28, 28, 1), (2, 32)),         # AV-MNIST digit
    ((3, 40, 30, 1), (3, 32)),         # spectrogram, non-square
    ((2, 3, 16, 16, 3), (2, 32)),      # video clips of 3 frames
    ((1, 1, 224, 224, 3), (1, 32)),    # CREMA-D: one frame per clip
])
def test_output_shapes(shape, expected):
  x = jnp.zeros(shape)
  variables = _abstract_init(MODEL, shape)
  out = jax.eval_shape(functools.partial(MODEL.apply, train=False),
                       variables, x)
  assert out.shape == expected


def test_rejects_other_ranks():
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    _abstract_init(MODEL, (16, 16, 1))


def test_video_fold_equals_per_frame_average_in_eval_mode(video_variables,
                                                         video_eval):
  folded, _ = video_eval
  # The 2-D path on every frame (as 6 separate images), then a mean over T.
  per_frame, _ = _apply(video_variables, VIDEO.reshape((6, 16, 16, 3)),
                        train=False, mutable=("batch_stats",))
  assert folded.shape == (2, 32) and per_frame.shape == (6, 32)
  np.testing.assert_allclose(folded, per_frame.reshape((2, 3, 32)).mean(1),
                             rtol=1e-5, atol=1e-6)


def test_batch_stats_update_in_train_mode_over_all_frames(video_variables):
  before = video_variables["batch_stats"]
  _, state = _apply(video_variables, VIDEO, train=True,
                    mutable=("batch_stats",))
  after = state["batch_stats"]
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
  assert all(jax.tree.leaves(changed))
  # Stem BN after one step: 0.9 * old + 0.1 * the batch mean of conv1 over
  # all N*T = 6 frames, i.e. BN sees the frames folded into the batch.
  frames = VIDEO.reshape((6, 16, 16, 3))
  conv1 = jax.lax.conv_general_dilated(
      frames, video_variables["params"]["conv1"]["kernel"], (2, 2),
      ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  expected = (0.9 * before["bn1"]["mean"]
              + 0.1 * np.mean(conv1, axis=(0, 1, 2)))
  np.testing.assert_allclose(after["bn1"]["mean"], expected, rtol=1e-5,
                             atol=1e-6)


def test_batch_stats_untouched_in_eval_mode(video_variables, video_eval):
  _, state = video_eval
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                      video_variables["batch_stats"], state["batch_stats"])
  assert all(jax.tree.leaves(same))
  # Eval mode needs no mutable collection (Flax raises on a write to one).
  out = jax.eval_shape(functools.partial(MODEL.apply, train=False),
                       video_variables, VIDEO)
  assert out.shape == (2, 32)


def test_layers_use_official_initialisers_and_batch_norm_settings():
  seen = model_fixtures.modules_created(
      lambda: _abstract_init(ResNet18(), (1, 32, 32, 1)))
  convs = [m for m in seen if isinstance(m, (nn.Conv, conv_lib.Conv))]
  norms = [m for m in seen if isinstance(m, nn.BatchNorm)]
  assert len(convs) == 20 and len(norms) == 20
  assert all(c.kernel_init is conv_kernel_init and not c.use_bias
             for c in convs)
  assert all((n.momentum, n.epsilon) == (0.9, 1e-5) for n in norms)
  assert all(n.scale_init is nn.initializers.ones
             and n.bias_init is nn.initializers.zeros for n in norms)


def test_conv_initialiser_is_untruncated_kaiming_normal_fan_out():
  kernel = np.asarray(
      conv_kernel_init(jax.random.key(0), (3, 3, 128, 256)), np.float64)
  n, var = kernel.size, 2.0 / (256 * 9)    # fan-out = out_channels * k * k
  # E[w^2] = var with standard error var * sqrt(2 / n): allow 6 SE.
  assert abs(np.mean(kernel**2) / var - 1) < 6 * np.sqrt(2 / n)
  # Kurtosis 3 +- 6 * sqrt(24 / n); a 2-sigma truncated normal has ~2.4.
  assert abs(np.mean(kernel**4) / var**2 - 3) < 6 * np.sqrt(24 / n)


def test_batch_norm_initialised_to_one_and_zero():
  variables = inits.batch_norm(train=False).init(jax.random.key(0),
                                                 jnp.zeros((1, 4)))
  np.testing.assert_array_equal(variables["params"]["scale"], np.ones(4))
  np.testing.assert_array_equal(variables["params"]["bias"], np.zeros(4))
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(4))


def test_downsample_shortcut_only_where_shape_changes():
  params = _abstract_init(MODEL, (1, 32, 32, 1))["params"]
  with_shortcut = sorted(name for name, block in params.items()
                         if "downsample_conv" in block)
  assert with_shortcut == ["layer2_0", "layer3_0", "layer4_0"]
  assert params["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 4, 8)
