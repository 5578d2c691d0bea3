"""OGM / OGM-GE: the coefficient rule against a NumPy transcription of the
released code, which leaves it modulates, the GE noise, and one training
step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import ogm
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")


softmax = fx.softmax


def released_coefficients(out_a, out_v, label, alpha):
  """GeWu-Lab/OGM-GE main.py, transcribed: batch sums, ratio, 1 - tanh."""
  score_v = sum(softmax(out_v)[i][label[i]] for i in range(len(label)))
  score_a = sum(softmax(out_a)[i][label[i]] for i in range(len(label)))
  ratio_v = score_v / score_a
  ratio_a = 1 / ratio_v
  if ratio_v > 1:
    return 1.0, 1 - np.tanh(alpha * max(ratio_v, 0.0))
  return 1 - np.tanh(alpha * max(ratio_a, 0.0)), 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coefficients_match_the_released_rule(seed):
  rng = np.random.default_rng(seed)
  out_a = rng.normal(size=(8, 5)).astype(np.float32)
  out_v = (rng.normal(size=(8, 5)) * 2).astype(np.float32)
  label = rng.integers(0, 5, 8)
  scores = ogm.ogm_scores({"audio": out_a, "image": out_v}, label)
  k = ogm.ogm_coefficients(scores, 0.8, MODS)
  want_a, want_v = released_coefficients(out_a, out_v, label, 0.8)
  assert float(k["audio"]) == pytest.approx(want_a, rel=1e-5)
  assert float(k["image"]) == pytest.approx(want_v, rel=1e-5)
  assert min(float(k["audio"]), float(k["image"])) < 1.0


def test_a_tie_suppresses_the_first_modality_and_rho_one_jumps():
  s = {"audio": jnp.float32(3.0), "image": jnp.float32(3.0)}
  k = ogm.ogm_coefficients(s, 0.8, MODS)
  # The code's else-branch: k_a = 1 - tanh(0.8 * 1) = 0.33596...
  assert float(k["audio"]) == pytest.approx(1 - np.tanh(0.8), rel=1e-6)
  assert float(k["image"]) == 1.0


def grads_tree():
  rng = np.random.default_rng(0)
  g = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"encoders": {
      "audio": {"backbone": {"conv": {"kernel": g(3, 3, 8, 16)},
                             "bn": {"scale": g(16)}},
                "head": {"kernel": g(16, 4), "bias": g(4)}},
      "image": {"backbone": {"conv": {"kernel": g(3, 3, 8, 16)},
                             "dense": {"kernel": g(16, 16)}},
                "head": {"kernel": g(16, 4), "bias": g(4)}}},
          "fusion": {"w": g(4, 4)}}


def test_ogm_scales_only_encoder_conv_kernels_inside_the_window():
  g = grads_tree()
  k = {"audio": jnp.float32(0.25), "image": jnp.float32(1.0)}
  out = ogm.modulate(g, k, active=jnp.bool_(True), modalities=MODS)
  a, a0 = out["encoders"]["audio"], g["encoders"]["audio"]
  np.testing.assert_allclose(a["backbone"]["conv"]["kernel"],
                             0.25 * a0["backbone"]["conv"]["kernel"])
  for path in (("backbone", "bn", "scale"), ("head", "kernel")):
    x, x0 = a, a0
    for p in path:
      x, x0 = x[p], x0[p]
    np.testing.assert_array_equal(x, x0)
  np.testing.assert_array_equal(out["fusion"]["w"], g["fusion"]["w"])
  off = ogm.modulate(g, k, active=jnp.bool_(False), modalities=MODS)
  for x, y in zip(jax.tree.leaves(off), jax.tree.leaves(g)):
    np.testing.assert_array_equal(x, y)
  # scope="encoder": every encoder leaf, still not heads or fusion.
  enc = ogm.modulate(g, k, active=jnp.bool_(True), modalities=MODS,
                     scope="encoder")
  np.testing.assert_allclose(enc["encoders"]["audio"]["backbone"]["bn"]
                             ["scale"], 0.25 * a0["backbone"]["bn"]["scale"])
  np.testing.assert_array_equal(enc["encoders"]["audio"]["head"]["kernel"],
                                a0["head"]["kernel"])


def test_ge_noise_has_the_unmodulated_std_on_both_encoders():
  g = grads_tree()
  k = {"audio": jnp.float32(0.25), "image": jnp.float32(1.0)}
  out = ogm.modulate(g, k, active=jnp.bool_(True), modalities=MODS,
                     noise_rng=jax.random.key(3))
  for m in MODS:
    g0 = np.asarray(g["encoders"][m]["backbone"]["conv"]["kernel"])
    noise = (np.asarray(out["encoders"][m]["backbone"]["conv"]["kernel"])
             - float(k[m]) * g0)
    # 1152 draws of N(0, std(g0)^2): sample std within 6%, mean near 0.
    assert np.std(noise) == pytest.approx(np.std(g0, ddof=1), rel=0.06)
    assert abs(np.mean(noise)) < 0.1 * np.std(g0)
  np.testing.assert_array_equal(
      out["encoders"]["image"]["backbone"]["dense"]["kernel"],
      g["encoders"]["image"]["backbone"]["dense"]["kernel"])


def test_an_encoder_without_convs_is_an_error_under_the_released_scope():
  g = grads_tree()
  del g["encoders"]["image"]["backbone"]["conv"]
  with pytest.raises(ConfigError, match="scope=encoder"):
    ogm.modulate(g, {"audio": 1.0, "image": 1.0}, active=jnp.bool_(True),
                 modalities=MODS)


def test_training_step_applies_the_coefficients():
  """One OGM step with plain SGD equals SGD on the k-scaled gradient."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "ogm", "ogm.scope": "encoder",
                          "student.optimizer.momentum": 0.0,
                          "student.optimizer.weight_decay": 0.0})
  s = student_lib.build_student(cfg, ds, mesh)
  model, gate, step, state = s.model, s.gate, s.step, s.state
  params0 = jax.device_get(state.params)
  batch = next(loader.train_batches(ds.splits["train"], 32, seed=0, epoch=0))
  batch["gate"] = gate.for_batch(batch, 0)

  def loss(p):
    out, _ = steps.apply_model(model, p, state.batch_stats, batch["inputs"],
                               train=True, rng=jax.random.key(0))
    return losses.cross_entropy(out.logits, batch["label"]), out
  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params0)
  k = released_coefficients(np.asarray(out.modality_logits["audio"]),
                            np.asarray(out.modality_logits["image"]),
                            batch["label"], cfg.ogm.alpha)
  new, metrics = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                      jax.random.key(0))
  new = jax.device_get(new.params)
  metrics = metrics["scalars"]
  assert float(metrics["ogm/coeff/audio"]) == pytest.approx(k[0], rel=1e-5)
  assert float(metrics["ogm/coeff/image"]) == pytest.approx(k[1], rel=1e-5)
  for i, m in enumerate(MODS):
    for path, g in jax.tree_util.tree_flatten_with_path(
        grads["encoders"][m])[0]:
      scale = k[i] if path[0].key == "backbone" else 1.0
      got = new["encoders"][m]
      p0 = params0["encoders"][m]
      for p in path:
        got, p0 = got[p.key], p0[p.key]
      np.testing.assert_allclose(got, p0 - 0.05 * scale * np.asarray(g),
                                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", ["sum", "film", "gated", "cross_attention"])
def test_fusions_without_the_released_scores_are_refused(fusion):
  cfg = fx.tiny_config(method="ogm", **{"model.fusion": fusion})
  with pytest.raises(ConfigError, match="fusion= one of .'late', 'concat'."):
    ogm.build(cfg, "classification", modalities=("audio", "image"))
