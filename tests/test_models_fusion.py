"""Tests for the fusion heads: fused and per-modality logits against NumPy.

Every head is run inside `MultimodalModel` with small MLP encoders, for two
and three modalities, and its outputs are recomputed in float64 NumPy from
the returned features and the parameter tree. Variables are filled on the
host (model_fixtures): XLA's CPU compile of `jax.random` costs seconds per
distinct shape here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.models import FUSIONS, MLP, MultimodalModel, make_fusion
from tests.model_fixtures import host_variables

B, C = 5, 4
# Deliberately not alphabetical, so modality order is exercised everywhere.
NAMES = ("video", "audio", "text")


def _run(fusion, dims, **options):
  """Runs a model with MLP encoders of feature sizes `dims`; float64 views."""
  names = NAMES[:len(dims)]
  model = MultimodalModel(
      encoders={m: MLP(hidden_dims=(d,)) for m, d in zip(names, dims)},
      num_outputs=C, fusion=fusion, fusion_kwargs=options)
  rng = np.random.default_rng(len(dims))
  inputs = {m: rng.normal(size=(B, 3 + i)).astype(np.float32)
            for i, m in enumerate(names)}
  variables = host_variables(model, inputs, train=False)
  out = jax.jit(functools.partial(model.apply, train=False))(variables,
                                                             inputs)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        variables["params"])
  feats = {m: np.asarray(f, np.float64) for m, f in out.features.items()}
  return model, params, feats, out


def _linear(x, p, bias_scale=1.0):
  return x @ p["kernel"] + bias_scale * p["bias"]


def _assert_close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=1e-5, atol=1e-5)


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _common(params, feats, m):
  """Features in the fusion width: projected when the branch has `proj`."""
  branch = params["encoders"][m]
  return _linear(feats[m], branch["proj"]) if "proj" in branch else feats[m]


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("dims", [(6, 6), (6, 5, 7)])
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_output_shapes_for_every_head(fusion, dims):
  names = NAMES[:len(dims)]
  options = {"num_heads": 1} if fusion == "cross_attention" else {}
  model = MultimodalModel(
      encoders={m: MLP(hidden_dims=(d,)) for m, d in zip(names, dims)},
      num_outputs=C, fusion=fusion, fusion_kwargs=options)
  inputs = {m: jnp.zeros((B, 3)) for m in names}
  out, _ = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), inputs, train=False))
  assert model.modalities == names
  assert out.logits.shape == (B, C)
  assert {m: l.shape for m, l in out.modality_logits.items()} == {
      m: (B, C) for m in names}
  assert {m: f.shape for m, f in out.features.items()} == {
      m: (B, d) for m, d in zip(names, dims)}


@pytest.mark.parametrize("dims", [(6, 5), (6, 5, 7)])
def test_late_fusion_is_exactly_the_mean_of_modality_logits(dims):
  model, params, feats, out = _run("late", dims)
  logits = [np.asarray(out.modality_logits[m]) for m in model.modalities]
  # The same float32 operations in the same order: bitwise equal. (The mean
  # is a sum times 1/k; for k = 2 that is also exactly the sum / 2.)
  total = sum(logits[1:], logits[0])
  np.testing.assert_array_equal(out.logits, total * np.float32(1 / len(dims)))
  if len(dims) == 2:
    np.testing.assert_array_equal(out.logits, (logits[0] + logits[1]) / 2)
  np.testing.assert_allclose(out.logits, np.mean(logits, axis=0), rtol=3e-7,
                             atol=1e-7)
  for m in model.modalities:
    _assert_close(out.modality_logits[m],
                  _linear(feats[m], params["encoders"][m]["head"]))


@pytest.mark.parametrize("dims", [(6, 5), (6, 5, 7)])
def test_sum_fusion_golden(dims):
  model, params, feats, out = _run("sum", dims)
  k = len(dims)
  heads = {m: params["encoders"][m]["head"] for m in model.modalities}
  _assert_close(out.logits,
                sum(_linear(feats[m], heads[m]) for m in model.modalities))
  for m in model.modalities:
    # Official convention: W_m f_m + b_m / 2, generalised to b_m / k.
    _assert_close(out.modality_logits[m], _linear(feats[m], heads[m], 1 / k))


@pytest.mark.parametrize("dims", [(6, 5), (6, 5, 7)])
def test_concat_fusion_slices_follow_modality_order(dims):
  model, params, feats, out = _run("concat", dims)
  fc = params["fusion"]["fc_out"]
  assert fc["kernel"].shape == (sum(dims), C)
  concat = np.concatenate([feats[m] for m in model.modalities], -1)
  _assert_close(out.logits, _linear(concat, fc))
  start = 0
  for m, d in zip(model.modalities, dims):   # video first, then audio, ...
    expected = feats[m] @ fc["kernel"][start:start + d] + fc["bias"] / len(dims)
    _assert_close(out.modality_logits[m], expected)
    start += d


def test_film_two_modalities_matches_the_official_formula():
  model, params, feats, out = _run("film", (6, 6))
  x, y = feats["video"], feats["audio"]      # the first modality conditions
  fc, fc_out = params["fusion"]["fc_audio"], params["fusion"]["fc_out"]
  assert fc["kernel"].shape == (6, 12)
  gamma, beta = np.split(_linear(x, fc), 2, axis=-1)
  _assert_close(out.logits, _linear(gamma * y + beta, fc_out))
  # Official self-conditioning with half the bias.
  for m, f in (("video", x), ("audio", y)):
    g, b = np.split(_linear(f, fc), 2, axis=-1)
    _assert_close(out.modality_logits[m], _linear(g * f + b, fc_out, 0.5))
  assert "proj" not in params["encoders"]["audio"]


def test_film_three_modalities_with_projection_and_chosen_conditioning():
  model, params, feats, out = _run("film", (6, 5, 7), conditioning="audio")
  enc = params["encoders"]
  # Common width = first modality's size (6): the others are projected.
  assert "proj" not in enc["video"]
  assert enc["audio"]["proj"]["kernel"].shape == (5, 6)
  assert enc["text"]["proj"]["kernel"].shape == (7, 6)
  assert sorted(params["fusion"]) == ["fc_out", "fc_text", "fc_video"]
  h = {m: _common(params, feats, m) for m in model.modalities}
  fusion = params["fusion"]

  def modulate(cond, target):
    total = 0
    for t in ("video", "text"):
      g, b = np.split(_linear(cond, fusion[f"fc_{t}"]), 2, axis=-1)
      total = total + g * target[t] + b
    return total

  _assert_close(out.logits, _linear(modulate(h["audio"], h), fusion["fc_out"]))
  for m in model.modalities:
    expected = _linear(modulate(h[m], {"video": h[m], "text": h[m]}),
                       fusion["fc_out"], 1 / 3)
    _assert_close(out.modality_logits[m], expected)


@pytest.mark.parametrize("dims, options", [
    ((6, 6), {}), ((6, 5, 7), {"dim": 4, "gate": "text"})])
def test_gated_fusion_golden(dims, options):
  model, params, feats, out = _run("gated", dims, **options)
  gate = options.get("gate", "video")
  width = options.get("dim", dims[0])
  enc, fc_out = params["encoders"], params["fusion"]["fc_out"]
  o = {m: _linear(feats[m], enc[m]["proj"]) for m in model.modalities}
  assert all(enc[m]["proj"]["kernel"].shape == (d, width)
             for m, d in zip(model.modalities, dims))
  z = sum(_sigmoid(o[gate]) * o[t] for t in model.modalities if t != gate)
  _assert_close(out.logits, _linear(z, fc_out))
  for m in model.modalities:
    _assert_close(out.modality_logits[m], _linear(o[m], fc_out, 1 / len(dims)))
  # Features stay the raw encoder outputs (deliberate deviation).
  assert [out.features[m].shape[-1] for m in model.modalities] == list(dims)


def _attention(q_in, kv_in, p, num_heads):
  """NumPy multi-head attention with Flax's parameter layout."""
  def project(x, layer):
    return np.einsum("bld,dhk->blhk", x, layer["kernel"]) + layer["bias"]
  q, k, v = (project(q_in, p["query"]), project(kv_in, p["key"]),
             project(kv_in, p["value"]))
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = np.einsum("bhqs,bshk->bqhk", weights, v)
  assert heads.shape[2] == num_heads
  out = np.einsum("bqhk,hkd->bqd", heads, p["out"]["kernel"])
  return out + p["out"]["bias"]


@pytest.mark.parametrize("dims, num_heads", [((6, 6), 2), ((6, 5, 7), 3)])
def test_cross_attention_golden(dims, num_heads):
  model, params, feats, out = _run("cross_attention", dims,
                                   num_heads=num_heads)
  fusion, k = params["fusion"], len(dims)
  h = {m: _common(params, feats, m) for m in model.modalities}
  refined = {}
  for m in model.modalities:
    others = np.stack([h[n] for n in model.modalities if n != m], axis=1)
    attended = _attention(h[m][:, None], others, fusion[f"attn_{m}"],
                          num_heads)[:, 0]
    refined[m] = _layer_norm(h[m] + attended, fusion[f"norm_{m}"])
  fc = fusion["fc_out"]
  concat = np.concatenate([refined[m] for m in model.modalities], -1)
  _assert_close(out.logits, _linear(concat, fc))
  for i, m in enumerate(model.modalities):
    rows = fc["kernel"][i * dims[0]:(i + 1) * dims[0]]
    _assert_close(out.modality_logits[m], refined[m] @ rows + fc["bias"] / k)


def test_cross_attention_two_modalities_reduces_to_value_projection():
  # One key per query: the softmax is 1, so X's attention output is
  # out(value(Y)) whatever the query and key parameters.
  model, params, feats, _ = _run("cross_attention", (6, 6), num_heads=2)
  p = params["fusion"]["attn_video"]
  value = np.einsum("bd,dhk->bhk", feats["audio"], p["value"]["kernel"])
  value = value + p["value"]["bias"]
  expected = np.einsum("bhk,hkd->bd", value, p["out"]["kernel"])
  expected = expected + p["out"]["bias"]
  full = _attention(feats["video"][:, None], feats["audio"][:, None], p, 2)
  np.testing.assert_allclose(full[:, 0], expected, rtol=1e-10, atol=1e-12)


def test_cross_attention_heads_must_divide_width():
  with pytest.raises(ConfigError, match="num_heads"):
    _run("cross_attention", (6, 6), num_heads=4)


def test_unknown_fusion_and_option_raise_config_error_listing_valid_ones():
  with pytest.raises(ConfigError, match="late, sum, concat, film, gated, "
                     "cross_attention"):
    make_fusion("bilinear", num_outputs=3)
  with pytest.raises(ConfigError, match="conditioning"):
    make_fusion("film", num_outputs=3, temperature=2.0)
  with pytest.raises(ConfigError, match="none"):
    make_fusion("late", num_outputs=3, dim=8)
  with pytest.raises(ConfigError, match="gate"):
    _run("gated", (6, 6), gate="depth")


def test_regression_head_has_one_output():
  model = MultimodalModel(encoders={"image": MLP((4,)), "weather": MLP((3,))},
                          num_outputs=1, fusion="concat")
  inputs = {"image": jnp.zeros((2, 5)), "weather": jnp.zeros((2, 2))}
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), inputs, train=False))
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables,
                       inputs)
  assert out.logits.shape == (2, 1)
  assert out.modality_logits["weather"].shape == (2, 1)


@pytest.mark.parametrize("dims", [(6, 5), (6, 5, 7)])
def test_missing_modalities_late_fusion_averages_present_heads(dims):
  """Paper Table 11: a missing modality's features are zeros and late
  fusion averages only the present modalities' logits (NumPy)."""
  model, params, feats, _ = _run("late", dims)
  names = model.modalities
  rng = np.random.default_rng(len(dims))
  inputs = {m: rng.normal(size=(B, 3 + i)).astype(np.float32)
            for i, m in enumerate(names)}
  present = {m: np.array([1, 0, 1, 1, 0], np.float32) if i == 0 else
             np.array([1, 1, 0, 1, 1], np.float32) for i, m in enumerate(names)}
  variables = host_variables(model, inputs, train=False)
  out = model.apply(variables, inputs, train=False, present=present)
  heads = {m: _linear(feats[m], params["encoders"][m]["head"]) for m in names}
  w = {m: present[m][:, None].astype(np.float64) for m in names}
  want = sum(w[m] * heads[m] for m in names) / sum(w.values())
  _assert_close(out.logits, want)
  for m in names:
    _assert_close(out.features[m], feats[m] * w[m])
  full = model.apply(variables, inputs, train=False,
                     present={m: np.ones(B, np.float32) for m in names})
  _assert_close(full.logits, np.mean([heads[m] for m in names], axis=0))


def test_missing_modalities_concat_fusion_sees_zero_features():
  model, params, feats, _ = _run("concat", (6, 5))
  names = model.modalities
  rng = np.random.default_rng(2)
  inputs = {m: rng.normal(size=(B, 3 + i)).astype(np.float32)
            for i, m in enumerate(names)}
  present = {names[0]: np.array([0, 1, 1, 0, 1], np.float32),
             names[1]: np.ones(B, np.float32)}
  variables = host_variables(model, inputs, train=False)
  out = model.apply(variables, inputs, train=False, present=present)
  fc = params["fusion"]["fc_out"]
  concat = np.concatenate([feats[names[0]] * present[names[0]][:, None],
                           feats[names[1]]], -1)
  _assert_close(out.logits, _linear(concat, fc))


@pytest.mark.parametrize("fusion", ["late", "concat"])
def test_feature_scale_multiplies_pooled_units_before_heads_and_fusion(
    fusion):
  """AMCo's unit masking: `feature_scale` ([D] shared, or [B, D] per
  sample) multiplies a modality's pooled features; heads and fusion see the
  scaled ones, and an unscaled modality is untouched (NumPy)."""
  model, params, feats, plain = _run(fusion, (6, 5))
  names = model.modalities
  rng = np.random.default_rng(2)
  inputs = {m: rng.normal(size=(B, 3 + i)).astype(np.float32)
            for i, m in enumerate(names)}
  variables = host_variables(model, inputs, train=False)
  units = np.array([1, 0, 1, 1, 0, 1], np.float32)
  per_sample = rng.integers(0, 2, size=(B, 6)).astype(np.float32)
  for scale in (units, per_sample):
    out = model.apply(variables, inputs, train=False,
                      feature_scale={names[0]: scale})
    scaled = feats[names[0]] * scale
    _assert_close(out.features[names[0]], scaled)
    _assert_close(out.features[names[1]], feats[names[1]])
    if fusion == "late":
      heads = [_linear(scaled, params["encoders"][names[0]]["head"]),
               _linear(feats[names[1]], params["encoders"][names[1]]["head"])]
      _assert_close(out.logits, np.mean(heads, axis=0))
    else:
      concat = np.concatenate([scaled, feats[names[1]]], -1)
      _assert_close(out.logits, _linear(concat, params["fusion"]["fc_out"]))
  ones = model.apply(variables, inputs, train=False,
                     feature_scale={names[0]: np.ones(6, np.float32)})
  _assert_close(ones.logits, np.asarray(plain.logits, np.float64))
