"""Tests for the Transformer sequence encoder.

Forward tests fill variables on the host (model_fixtures): XLA's CPU
compile of `jax.random` costs seconds per distinct shape here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.models import TransformerEncoder
from g2d_jax.models.transformer import sinusoidal_positions
from tests.model_fixtures import host_variables


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_default_is_the_papers_encoder():
  model = TransformerEncoder()
  x = jnp.zeros((2, 10, 40))
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))["params"]
  assert sorted(params) == ["final_norm", "input_projection", "layer0",
                            "layer1", "layer2", "layer3"]
  d, mlp = 768, 3072
  attention = 4 * (d * d + d)              # q, k, v, out with biases
  layer = attention + 2 * 2 * d + (d * mlp + mlp) + (mlp * d + d)
  assert _count(params) == 40 * d + 4 * layer + 2 * d
  assert params["layer0"]["attention"]["query"]["kernel"].shape == (d, 8, 96)
  out = jax.eval_shape(functools.partial(model.apply, train=False),
                       {"params": params}, x)
  assert out.shape == (2, 768)


@pytest.mark.parametrize("positional, norm_first", [
    ("sinusoidal", True), ("learned", False)])
def test_padding_does_not_change_features(positional, norm_first):
  model = TransformerEncoder(hidden_dim=8, num_layers=1, num_heads=2,
                             mlp_dim=16, conv_kernel_size=3,
                             positional=positional, max_len=16,
                             norm_first=norm_first)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 5)).astype(np.float32)
  lengths = np.array([7, 4])
  mask = np.arange(7)[None, :] < lengths[:, None]
  variables = host_variables(model, x, train=False, mask=mask)
  apply = jax.jit(functools.partial(model.apply, train=False))
  padded = np.where(mask[..., None], x, 100.0 * rng.normal(size=x.shape))
  out = apply(variables, padded, mask=mask)
  assert out.shape == (2, 8)
  # The padded sequence alone, unpadded, gives the same features.
  alone = apply(variables, x[1:, :4])
  np.testing.assert_allclose(out[1], alone[0], rtol=1e-4, atol=1e-5)
  assert not np.allclose(out[0], apply(variables, x[:1, :4])[0], atol=1e-3)
  if positional == "sinusoidal":
    # No mask means every step is valid.
    np.testing.assert_allclose(apply(variables, x, mask=np.ones((2, 7), bool)),
                               apply(variables, x), rtol=1e-6)


def test_post_norm_has_no_final_norm_and_learned_table_is_a_parameter():
  model = TransformerEncoder(hidden_dim=8, num_layers=1, num_heads=2,
                             positional="learned", max_len=12,
                             norm_first=False)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 5, 3)), train=False))["params"]
  assert sorted(params) == ["input_projection", "layer0",
                            "position_embedding"]
  assert params["position_embedding"].shape == (12, 8)
  assert params["input_projection"]["kernel"].shape == (1, 3, 8)
  assert "bias" not in params["input_projection"]


def test_sinusoidal_positions_golden():
  table = sinusoidal_positions(3, 4)
  expected = [[0, 1, 0, 1],
              [np.sin(1), np.cos(1), np.sin(0.01), np.cos(0.01)],
              [np.sin(2), np.cos(2), np.sin(0.02), np.cos(0.02)]]
  np.testing.assert_allclose(table, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_dim": 10, "num_heads": 4}, "divisible"),
    ({"positional": "rotary"}, "sinusoidal"),
    ({"positional": "learned", "max_len": 4}, "max_len"),
])
def test_invalid_configs_raise_config_error(kwargs, match):
  # Bad options fail at construction, a too long sequence when called.
  with pytest.raises(ConfigError, match=match):
    model = TransformerEncoder(**{"hidden_dim": 8, "num_heads": 2, **kwargs})
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 6, 3)),
                                      train=False))


def test_dropout_is_active_in_train_mode_only():
  model = TransformerEncoder(hidden_dim=8, num_layers=1, num_heads=2,
                             dropout_rate=0.5)
  x = jnp.ones((2, 4, 3))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))
  # Eval mode needs no rng; train mode draws dropout masks from "dropout".
  out = jax.eval_shape(functools.partial(model.apply, train=False),
                       variables, x)
  assert out.shape == (2, 8)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(functools.partial(model.apply, train=True), variables, x)
