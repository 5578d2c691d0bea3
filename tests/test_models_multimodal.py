"""Tests for MultimodalModel, UnimodalModel and the model factories.

Variables are filled on the host (model_fixtures) or kept abstract
(`jax.eval_shape`): XLA's CPU compile of `jax.random` costs seconds per
distinct shape here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import gating
from g2d_jax.errors import ConfigError, DataError
from g2d_jax.models import (FUSIONS, MLP, MultimodalModel, MultimodalOutput,
                            SmallCNN, TransformerEncoder, UnimodalModel,
                            make_encoder, make_multimodal, make_unimodal)
from tests import model_fixtures
from tests.model_fixtures import host_variables

B = 4


def _abstract(model, inputs, **kwargs):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), inputs, train=False, **kwargs))


def _cnn():
  return SmallCNN(channels=(4, 8), downsample="stride")


def _images(names, seed=0):
  rng = np.random.default_rng(seed)
  return {m: rng.normal(size=(B, 8, 8, 1)).astype(np.float32) for m in names}


# Per-modality keys (besides "backbone") and shared keys of each fusion, for
# equal feature sizes (so FiLM and cross-attention need no projection).
EXPECTED_KEYS = {
    "late": ({"head"}, None),
    "sum": ({"head"}, None),
    "concat": (set(), {"fc_out"}),
    "film": (set(), {"fc_out", "fc_<others>"}),
    "gated": ({"proj"}, {"fc_out"}),
    "cross_attention": (set(), {"fc_out", "attn_<all>", "norm_<all>"}),
}


def _expand(keys, names):
  out = set()
  for key in keys:
    if key.endswith("<others>"):
      out |= {key.replace("<others>", m) for m in names[1:]}
    elif key.endswith("<all>"):
      out |= {key.replace("<all>", m) for m in names}
    else:
      out.add(key)
  return out


@pytest.mark.parametrize("names", [("video", "audio"),
                                   ("video", "audio", "text")])
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_parameter_tree_paths(fusion, names):
  options = {"num_heads": 2} if fusion == "cross_attention" else {}
  model = MultimodalModel(encoders={m: _cnn() for m in names}, num_outputs=3,
                          fusion=fusion, fusion_kwargs=options)
  variables = _abstract(model, _images(names))
  params, stats = variables["params"], variables["batch_stats"]
  branch_keys, shared_keys = EXPECTED_KEYS[fusion]
  assert set(params) == ({"encoders"} if shared_keys is None
                         else {"encoders", "fusion"})
  assert set(params["encoders"]) == set(names)
  for m in names:
    assert set(params["encoders"][m]) == {"backbone"} | branch_keys
    assert set(params["encoders"][m]["backbone"]) == {"conv0", "bn0", "conv1",
                                                      "bn1"}
    if "head" in branch_keys:
      assert params["encoders"][m]["head"]["kernel"].shape == (8, 3)
  if shared_keys is not None:
    assert set(params["fusion"]) == _expand(shared_keys, names)
  # Running statistics are nested the same way and only in the encoders.
  assert set(stats) == {"encoders"}
  assert all(set(stats["encoders"][m]) == {"backbone"} for m in names)
  assert set(stats["encoders"]["audio"]["backbone"]["bn1"]) == {"mean", "var"}
  # SMP's optimizer labels find every branch by name; the rest is shared.
  labels = gating.modality_labels(params, model.modalities)
  for m in names:
    assert set(jax.tree.leaves(labels["encoders"][m])) == {m}
  if "fusion" in labels:
    assert set(jax.tree.leaves(labels["fusion"])) == {gating.SHARED}


def test_modality_order_is_insertion_order():
  encoders = {"video": MLP((4,)), "audio": MLP((6,)), "text": MLP((5,))}
  model = MultimodalModel(encoders=encoders, num_outputs=2, fusion="concat")
  assert model.modalities == ("video", "audio", "text")
  # The order survives Flax's cloning inside init/apply: concat's kernel
  # rows are video (4), audio (6), text (5) -> the FiLM/gating default and
  # concat slices all follow it.
  inputs = {m: np.ones((B, 3), np.float32) for m in encoders}
  variables = host_variables(model, inputs, train=False)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, inputs)
  p = variables["params"]["fusion"]["fc_out"]
  np.testing.assert_allclose(
      out.modality_logits["video"],
      out.features["video"] @ p["kernel"][:4] + p["bias"] / 3, rtol=1e-5,
      atol=1e-6)
  film = MultimodalModel(encoders=encoders, num_outputs=2, fusion="film",
                         fusion_kwargs={"dim": 4})
  assert set(_abstract(film, inputs)["params"]["fusion"]) == {
      "fc_out", "fc_audio", "fc_text"}                 # video conditions


def test_explicit_modalities_override_and_are_checked():
  encoders = {"a": MLP((4,)), "b": MLP((4,))}
  model = MultimodalModel(encoders=encoders, num_outputs=2,
                          modalities=("b", "a"))
  assert model.modalities == ("b", "a")
  assert model.clone().modalities == ("b", "a")
  with pytest.raises(ConfigError, match="do not match"):
    MultimodalModel(encoders=encoders, num_outputs=2, modalities=("a", "c"))


@pytest.mark.parametrize("kwargs, match", [
    ({"encoders": {"audio": MLP((4,))}}, "at least two"),
    ({"fusion": "mean"}, "valid fusions: late, sum"),
    ({"fusion_kwargs": {"dim": 3}}, "Unknown option"),
    ({"num_outputs": 0}, "num_outputs"),
    ({"encoders": {"audio": MLP((4,)), "fusion": MLP((4,))}}, "reserved"),
])
def test_invalid_construction_raises_config_error(kwargs, match):
  args = {"encoders": {"audio": MLP((4,)), "video": MLP((4,))},
          "num_outputs": 2, **kwargs}
  with pytest.raises(ConfigError, match=match):
    MultimodalModel(**args)


def test_missing_input_raises_data_error_and_extra_keys_are_ignored():
  model = make_multimodal({"audio": MLP((4,)), "video": MLP((4,))}, "late",
                          num_outputs=2)
  inputs = {"audio": jnp.zeros((B, 3)), "video": jnp.zeros((B, 3)),
            "label": jnp.zeros((B,), jnp.int32)}
  variables = _abstract(model, inputs)
  assert set(variables["params"]["encoders"]) == {"audio", "video"}
  with pytest.raises(DataError, match="video"):
    _abstract(model, {"audio": jnp.zeros((B, 3))})


@pytest.mark.parametrize("fusion", ["late", "gated", "cross_attention"])
def test_features_are_the_raw_encoder_outputs(fusion):
  encoders = {"audio": MLP((8,)), "video": MLP((6,))}
  options = {"num_heads": 2} if fusion == "cross_attention" else {}
  model = MultimodalModel(encoders=encoders, num_outputs=3, fusion=fusion,
                          fusion_kwargs=options)
  inputs = {m: np.random.default_rng(i).normal(size=(B, 5)).astype(np.float32)
            for i, m in enumerate(encoders)}
  variables = host_variables(model, inputs, train=False)
  out = jax.jit(functools.partial(model.apply, train=False))(variables, inputs)
  assert isinstance(out, MultimodalOutput)
  for m, encoder in encoders.items():
    alone = encoder.apply(
        {"params": variables["params"]["encoders"][m]["backbone"]},
        inputs[m], train=False)
    np.testing.assert_allclose(out.features[m], alone, rtol=1e-6, atol=1e-7)


def test_mixed_encoders_with_sequence_masks():
  encoders = {
      "audio": TransformerEncoder(hidden_dim=8, num_layers=1, num_heads=2),
      "image": _cnn(),
      "weather": MLP((8,)),
  }
  model = make_multimodal(encoders, "cross_attention", num_outputs=5,
                          num_heads=2)
  rng = np.random.default_rng(0)
  seq = rng.normal(size=(B, 6, 3)).astype(np.float32)
  mask = np.arange(6)[None] < np.array([[6], [3], [1], [4]])
  inputs = {"audio": seq, "image": _images(["image"])["image"],
            "weather": rng.normal(size=(B, 7)).astype(np.float32)}
  variables = host_variables(model, inputs, train=False,
                              masks={"audio": mask})
  apply = jax.jit(functools.partial(model.apply, train=False))
  out = apply(variables, inputs, masks={"audio": mask})
  assert out.logits.shape == (B, 5)
  assert {m: f.shape for m, f in out.features.items()} == {
      "audio": (B, 8), "image": (B, 8), "weather": (B, 8)}
  # The mask reaches the sequence encoder: padded steps do not matter.
  garbage = dict(inputs, audio=np.where(mask[..., None], seq, 50.0))
  np.testing.assert_allclose(apply(variables, garbage,
                                   masks={"audio": mask}).logits,
                             out.logits, rtol=1e-5, atol=1e-6)


def test_batch_stats_update_in_train_mode_only():
  names = ("audio", "video")
  model = MultimodalModel(encoders={m: _cnn() for m in names}, num_outputs=3)
  model_fixtures.assert_batch_stats_move_in_train_mode_only(
      model, _images(names))


def test_jit_and_eager_agree():
  model = MultimodalModel(encoders={"a": MLP((4,)), "b": MLP((5,))},
                          num_outputs=3, fusion="late")
  inputs = {"a": np.ones((B, 2), np.float32), "b": np.ones((B, 3), np.float32)}
  variables = host_variables(model, inputs, train=False)
  eager = model.apply(variables, inputs, train=False)
  jitted = jax.jit(functools.partial(model.apply, train=False))(variables,
                                                                inputs)
  for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(x, y)


def test_unimodal_teacher_shares_the_students_branch_structure():
  teacher = UnimodalModel(encoder=_cnn(), num_outputs=3, modality="audio")
  student = MultimodalModel(encoders={"audio": _cnn(), "video": _cnn()},
                            num_outputs=3)
  inputs = _images(("audio", "video"))
  t_vars = host_variables(teacher, inputs, train=False, seed=1)
  s_vars = _abstract(student, inputs)
  assert set(t_vars["params"]) == {"encoders"}
  assert set(t_vars["params"]["encoders"]) == {"audio"}
  assert set(t_vars["params"]["encoders"]["audio"]) == {"backbone", "head"}
  for collection in ("params", "batch_stats"):
    t_tree = t_vars[collection]["encoders"]["audio"]
    s_tree = s_vars[collection]["encoders"]["audio"]
    assert (jax.tree.structure(t_tree) == jax.tree.structure(s_tree))
    assert jax.tree.map(jnp.shape, t_tree) == jax.tree.map(jnp.shape, s_tree)

  # A teacher's branch dropped into the student gives the same features.
  s_vars = host_variables(student, inputs, train=False, seed=2)
  for collection in ("params", "batch_stats"):
    s_vars[collection]["encoders"]["audio"] = (
        t_vars[collection]["encoders"]["audio"])
  t_out = teacher.apply(t_vars, inputs, train=False)
  s_out = student.apply(s_vars, inputs, train=False)
  np.testing.assert_array_equal(t_out.features["audio"],
                                s_out.features["audio"])
  np.testing.assert_array_equal(t_out.logits, s_out.modality_logits["audio"])
  # Teacher logits: the linear head on the features; array input works too.
  head = t_vars["params"]["encoders"]["audio"]["head"]
  np.testing.assert_allclose(
      t_out.logits, t_out.features["audio"] @ head["kernel"] + head["bias"],
      rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(t_out.modality_logits["audio"], t_out.logits)
  alone = teacher.apply(t_vars, inputs["audio"], train=False)
  np.testing.assert_array_equal(alone.logits, t_out.logits)


def test_make_encoder_kinds_and_errors():
  assert make_encoder("resnet18", width=8).features_dim == 64
  assert make_encoder("cnn", channels=(3, 5)).features_dim == 5
  assert make_encoder("mlp", hidden_dims=(7,)).features_dim == 7
  assert make_encoder("transformer", hidden_dim=16).features_dim == 16
  assert make_encoder("mobilenetv2").features_dim == 1280
  with pytest.raises(ConfigError, match="resnet18, cnn, mlp, transformer, "
                     "mobilenetv2"):
    make_encoder("vit")
  with pytest.raises(ConfigError, match="width"):
    make_encoder("resnet18", depth=34)


def test_factories_accept_encoder_specs():
  model = make_multimodal({"audio": {"kind": "mlp", "hidden_dims": (4,)},
                           "video": MLP((6,))}, "gated", 3, dim=5)
  assert model.modalities == ("audio", "video")
  assert model.fusion_kwargs == {"dim": 5}
  params = _abstract(model, {"audio": jnp.zeros((1, 2)),
                             "video": jnp.zeros((1, 2))})["params"]
  assert params["encoders"]["video"]["proj"]["kernel"].shape == (6, 5)
  teacher = make_unimodal({"kind": "mlp", "hidden_dims": (4,)}, 3, "audio")
  assert isinstance(teacher, UnimodalModel) and teacher.modality == "audio"
  with pytest.raises(ConfigError, match="kind"):
    make_unimodal({"hidden_dims": (4,)}, 3, "audio")
