"""MMCosine: the cosine logits against a NumPy transcription of the released
code (2 and 3 modalities, concat slices and late-fusion heads), its edge
cases, one training step against the gradient of an independent
transcription, the window, the refused fusions and SMP composing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import mmcosine
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

MODS = ("audio", "image")


softmax = fx.softmax


def ce(logits, y):
  return -np.mean(np.log(softmax(logits))[np.arange(len(y)), y])


def normalize(x, dim):
  """torch.nn.functional.normalize, transcribed."""
  n = np.sqrt((x ** 2).sum(axis=dim, keepdims=True))
  return x / np.maximum(n, 1e-12)


def released_logits(feats, weight, scaling):
  """MMCosine_trainer.py (BalanceBenchmark), transcribed for k = 2 or 3:
  `weight` is fc_out.weight [C, sum D] in torch's layout, sliced by the
  features' widths in order."""
  out, start = [], 0
  for f in feats:
    w = weight[:, start:start + f.shape[1]]
    out.append(normalize(f, 1) @ normalize(w.T, 0) * scaling)
    start += f.shape[1]
  return sum(out), out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("widths", [(6, 4), (5, 3, 7)])
def test_concat_logits_match_the_released_code(seed, widths):
  rng = np.random.default_rng(seed)
  names = ("audio", "image", "text")[:len(widths)]
  feats = [rng.normal(size=(8, d)) * (i + 1) for i, d in enumerate(widths)]
  weight = rng.normal(size=(5, sum(widths)))  # torch layout [C, sum D]
  labels = rng.integers(0, 5, 8)
  features = {m: jnp.float32(f) for m, f in zip(names, feats)}
  params = {"fusion": {"fc_out": {"kernel": jnp.float32(weight.T),
                                  "bias": jnp.float32(rng.normal(size=5))}}}
  weights = mmcosine.modality_weights(params, features, "concat", names)
  value, per = mmcosine.mmcosine_loss(features, weights, labels, 15.0)
  want, want_per = released_logits(feats, weight, 15.0)
  assert float(value) == pytest.approx(ce(want, labels), rel=1e-5)
  for m, w in zip(names, want_per):
    np.testing.assert_allclose(per[m], w, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(per[m])).max() <= 15.0 + 1e-4


def test_late_fusion_uses_each_head_as_the_modality_slice():
  """Late fusion's heads laid side by side are the release's fc_out."""
  rng = np.random.default_rng(3)
  feats = [rng.normal(size=(6, 4)), rng.normal(size=(6, 3))]
  kernels = [rng.normal(size=(4, 5)), rng.normal(size=(3, 5))]
  params = {"encoders": {m: {"head": {"kernel": jnp.float32(k),
                                      "bias": jnp.ones(5)}}
                         for m, k in zip(MODS, kernels)}}
  features = {m: jnp.float32(f) for m, f in zip(MODS, feats)}
  weights = mmcosine.modality_weights(params, features, "late", MODS)
  fused, _ = mmcosine.cosine_logits(features, weights, 10.0)
  want, _ = released_logits(feats, np.concatenate(kernels, 0).T, 10.0)
  np.testing.assert_allclose(fused, want, rtol=1e-5, atol=1e-5)


def test_logits_ignore_feature_and_weight_norms_and_zero_features():
  rng = np.random.default_rng(4)
  f = {m: jnp.float32(rng.normal(size=(4, 3))) for m in MODS}
  w = {m: jnp.float32(rng.normal(size=(3, 5))) for m in MODS}
  base, _ = mmcosine.cosine_logits(f, w, 10.0)
  scaled, _ = mmcosine.cosine_logits(
      {"audio": 7.0 * f["audio"], "image": 0.01 * f["image"]},
      {"audio": w["audio"], "image": 50.0 * w["image"]}, 10.0)
  np.testing.assert_allclose(scaled, base, rtol=1e-5, atol=1e-5)
  # A zero feature vector (F.normalize's eps): zero logits, finite grads.
  zero = {"audio": jnp.zeros((4, 3)), "image": jnp.zeros((4, 3))}
  fused, _ = mmcosine.cosine_logits(zero, w, 10.0)
  np.testing.assert_array_equal(fused, np.zeros((4, 5)))
  grads = jax.grad(lambda ff: mmcosine.mmcosine_loss(
      ff, w, jnp.zeros(4, jnp.int32), 10.0)[0])(zero)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())


def plain_sgd(**overrides):
  return fx.tiny_config(**{"method": "mmcosine",
                           "student.optimizer.momentum": 0.0,
                           "student.optimizer.weight_decay": 0.0},
                        **overrides)


@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_training_step_descends_the_released_loss(fusion):
  """SGD step = p - lr * grad of a transcription of the released loss, with
  the weights in the release's concat layout; the bias gets no gradient."""
  ds = fx.tiny_dataset()
  cfg = plain_sgd(**{"model.fusion": fusion})
  model, params0, bs0, batch, new, metrics = fx.one_step(cfg, ds, 0)

  def released(p):
    out, _ = steps.apply_model(model, p, bs0, batch["inputs"], train=True,
                               rng=jax.random.key(0))
    a, v = out.features["audio"], out.features["image"]
    if fusion == "concat":
      weight = p["fusion"]["fc_out"]["kernel"].T
    else:
      weight = jnp.concatenate([p["encoders"][m]["head"]["kernel"]
                                for m in MODS], 0).T
    na = a.shape[1]
    norm = lambda x, d: x / jnp.maximum(
        jnp.linalg.norm(x, axis=d, keepdims=True), 1e-12)
    out_a = norm(a, 1) @ norm(weight[:, :na].T, 0) * cfg.mmcosine.scaling
    out_v = norm(v, 1) @ norm(weight[:, na:].T, 0) * cfg.mmcosine.scaling
    return losses.cross_entropy(out_a + out_v, batch["label"])

  value, grads = jax.value_and_grad(released)(params0)
  assert metrics["loss"] == pytest.approx(float(value), rel=1e-5)
  assert metrics["mmcosine/active"] == 1.0
  for (path, p0), g, got in zip(
      jax.tree_util.tree_flatten_with_path(params0)[0],
      jax.tree.leaves(grads), jax.tree.leaves(new)):
    np.testing.assert_allclose(got, p0 - 0.05 * np.asarray(g), rtol=1e-5,
                               atol=1e-6, err_msg=str(path))
  biases = ([params0["fusion"]["fc_out"]["bias"]] if fusion == "concat" else
            [params0["encoders"][m]["head"]["bias"] for m in MODS])
  new_biases = ([new["fusion"]["fc_out"]["bias"]] if fusion == "concat" else
                [new["encoders"][m]["head"]["bias"] for m in MODS])
  for b0, b1 in zip(biases, new_biases):
    np.testing.assert_array_equal(b0, b1)
  moved = jax.tree.leaves(new["encoders"]["audio"]["backbone"])
  assert any(not np.array_equal(a, b) for a, b in zip(
      moved, jax.tree.leaves(params0["encoders"]["audio"]["backbone"])))


def test_outside_the_window_the_loss_is_the_fused_cross_entropy():
  ds = fx.tiny_dataset()
  cfg = plain_sgd(**{"model.fusion": "concat",
                     "mmcosine.window.start_epoch": 1})
  model, params0, bs0, batch, new, metrics = fx.one_step(cfg, ds, 0)
  out, _ = steps.apply_model(model, params0, bs0, batch["inputs"],
                             train=True, rng=jax.random.key(0))
  assert metrics["mmcosine/active"] == 0.0
  assert metrics["loss"] == pytest.approx(
      ce(np.asarray(out.logits), batch["label"]), rel=1e-5)
  # The plain loss trains the bias, which the cosine loss never sees.
  assert not np.array_equal(new["fusion"]["fc_out"]["bias"],
                            params0["fusion"]["fc_out"]["bias"])


@pytest.mark.parametrize("fusion", ["film", "gated", "cross_attention"])
def test_fusions_without_per_modality_weights_are_refused(fusion):
  cfg = fx.tiny_config(method="mmcosine", **{"model.fusion": fusion})
  with pytest.raises(ConfigError, match="fusion= one of .'late', 'sum', "):
    mmcosine.build(cfg, "classification", modalities=MODS)


def test_regression_and_bad_scaling_are_refused():
  with pytest.raises(ConfigError, match="classification only"):
    mmcosine.build(fx.tiny_config(method="mmcosine"), "regression")
  with pytest.raises(ConfigError, match="must be > 0"):
    mmcosine.build(fx.tiny_config(**{"method": "mmcosine",
                                     "mmcosine.scaling": 0.0}),
                   "classification")


def test_smp_composes():
  """SMP with audio training alone: the image branch does not move, concat's
  shared fc_out and the audio branch do; one compiled (skipping) pattern."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "mmcosine", "smp": True,
                          "model.fusion": "concat"})
  s = student_lib.build_student(cfg, ds, mesh)
  before = jax.device_get(s.state.params)
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  batch["gate"] = s.gate.for_batch(batch, 0)
  assert batch["gate"]["pattern"] == 0
  new, metrics = s.step(s.state, mesh_lib.shard_batch(batch, mesh),
                        np.int32(0), jax.random.key(0))
  after = jax.device_get(new.params)
  assert float(metrics["scalars"]["kappa/image"]) == 0.0
  for a, b in zip(jax.tree.leaves(after["encoders"]["image"]),
                  jax.tree.leaves(before["encoders"]["image"])):
    np.testing.assert_array_equal(a, b)
  for part in (("encoders", "audio"), ("fusion",)):
    new_part, old_part = after, before
    for key in part:
      new_part, old_part = new_part[key], old_part[key]
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(new_part), jax.tree.leaves(old_part)))
  assert s.step.compiled_patterns() == {0: 1}
