"""OPM: the drop probabilities against a NumPy transcription of the released
code (2 and 3 modalities), ties and clipping, the masking and rescale with
removed samples, the keep-mask frequencies, the exact fusion of masked
features, one training step whose dominant modality is dropped, the window,
the refused fusions and SMP composing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.methods import opm
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")


softmax = fx.softmax


def ce(logits, y):
  return -np.mean(np.log(softmax(logits))[np.arange(len(y)), y])


def released_coeffs(uni, label, q_base, alpha):
  """OPM_trainer.py (BalanceBenchmark) training_step, transcribed: scores,
  ratios (k = 2: over the other; k = 3: over the sum of the others), q."""
  keys = list(uni)
  scores = {m: sum(softmax(uni[m])[i][label[i]] for i in range(len(label)))
            for m in keys}
  coeffs = {}
  for m in keys:
    ratio = scores[m]
    if len(keys) == 2:
      other = [n for n in keys if n != m][0]
      ratio = np.tanh(max(ratio / (scores[other] + 1e-5) - 1, 0.0))
    if len(keys) == 3:
      temp = sum(scores[n] for n in keys if n != m)
      ratio = np.tanh(max(ratio / (temp + 1e-5) - 1, 0.0))
    c = q_base * (1 + alpha * ratio) if ratio > 0 else 0
    coeffs[m] = min(max(c, 0.0), 1.0)
  return coeffs


def released_drop(feats, q, dims, mask):
  """Modality_drop.execute_drop with the Bernoulli draw `mask` [k, B] given:
  masked and rescaled features of the samples kept."""
  theta = sum(dims[i] * q[i] for i in range(len(q))) / sum(dims)
  cleaned = [f * mask[i][:, None] / (1 - theta + 1e-5)
             for i, f in enumerate(feats)]
  update_flag = mask.T.sum(1) > 0
  return [c[update_flag] for c in cleaned], update_flag, theta


def q_of(uni, label, q_base, alpha):
  scores = opm.opm_scores({m: jnp.float32(v) for m, v in uni.items()}, label)
  return opm.opm_drop_probabilities(opm.opm_ratios(scores), q_base, alpha)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [2, 3])
def test_drop_probabilities_match_the_released_code(seed, k):
  rng = np.random.default_rng(seed)
  names = ("audio", "image", "text")[:k]
  label = rng.integers(0, 5, 16)
  # The first modality is confident (its true class is boosted), so it
  # dominates and gets q > 0; the others are noise.
  uni = {m: rng.normal(size=(16, 5)) for m in names}
  uni[names[0]][np.arange(16), label] += 2.0 + seed
  q = q_of(uni, label, 0.5, 0.5)
  want = released_coeffs(uni, label, 0.5, 0.5)
  for m in names:
    assert float(q[m]) == pytest.approx(want[m], rel=1e-5, abs=1e-7)
  assert want[names[0]] > 0.5
  assert [want[m] for m in names[1:]] == [0.0] * (k - 1)


def test_ties_give_no_drop_and_large_alpha_clips_at_one():
  # Equal scores: s / (s + 1e-5) < 1, so the ratio is 0 and nothing drops.
  tie = {"audio": jnp.float32(4.0), "image": jnp.float32(4.0)}
  q = opm.opm_drop_probabilities(opm.opm_ratios(tie), 0.5, 0.5)
  assert float(q["audio"]) == float(q["image"]) == 0.0
  strong = {"audio": jnp.float32(30.0), "image": jnp.float32(1.0)}
  q = opm.opm_drop_probabilities(opm.opm_ratios(strong), 0.5, 5.0)
  assert float(q["audio"]) == 1.0 and float(q["image"]) == 0.0
  # Three modalities: beating each other one is not enough, it must beat
  # their sum.
  three = {"audio": jnp.float32(5.0), "image": jnp.float32(3.0),
           "text": jnp.float32(3.0)}
  assert all(float(v) == 0.0 for v in opm.opm_ratios(three).values())
  # Over the others' mean instead: 5 / 3 and 3 / 4 -> only audio; with
  # (3, 3, 1) two modalities drop at once, never the weakest.
  mean = opm.opm_ratios(three, "mean")
  assert float(mean["audio"]) == pytest.approx(
      np.tanh(5.0 / (3.0 + 1e-5) - 1.0), rel=1e-6)
  assert float(mean["image"]) == float(mean["text"]) == 0.0
  two_up = opm.opm_ratios({"audio": jnp.float32(3.0), "image": jnp.float32(
      3.0), "text": jnp.float32(1.0)}, "mean")
  for m in ("audio", "image"):
    assert float(two_up[m]) == pytest.approx(
        np.tanh(3.0 / (2.0 + 1e-5) - 1.0), rel=1e-5)
  assert float(two_up["text"]) == 0.0
  # Two modalities: both rules are the release's.
  pair = {"audio": jnp.float32(5.0), "image": jnp.float32(2.0)}
  assert float(opm.opm_ratios(pair, "mean")["audio"]) == float(
      opm.opm_ratios(pair)["audio"])


@pytest.mark.parametrize("seed", [0, 1])
def test_masking_matches_the_released_drop_and_removes_empty_samples(seed):
  rng = np.random.default_rng(seed)
  feats = [rng.normal(size=(12, 4)), rng.normal(size=(12, 6))]
  q = np.array([0.6, 0.3])  # both > 0, so some samples lose both
  mask = (rng.random((2, 12)) >= q[:, None]).astype(np.float64)
  mask[:, 0] = 0.0  # sample 0 loses every modality
  kernel, bias = rng.normal(size=(10, 3)), rng.normal(size=3)
  label = rng.integers(0, 3, 12)
  cleaned, flag, theta = released_drop(feats, q, [4, 6], mask)
  want = ce(np.concatenate(cleaned, 1) @ kernel + bias, label[flag])

  features = {m: jnp.float32(f) for m, f in zip(MODS, feats)}
  qs = {m: jnp.float32(v) for m, v in zip(MODS, q)}
  got_theta = opm.opm_theta(qs, {"audio": 4, "image": 6})
  assert float(got_theta) == pytest.approx(theta, rel=1e-6)
  masked, weight = opm.opm_mask_features(
      features, {m: jnp.float32(mask[i]) for i, m in enumerate(MODS)},
      got_theta, jnp.bool_(True))
  np.testing.assert_array_equal(weight, flag.astype(np.float32))
  params = {"fusion": {"fc_out": {"kernel": jnp.float32(kernel),
                                  "bias": jnp.float32(bias)}}}
  logits = opm.fuse_features(params, masked, "concat", MODS)
  got = opm.weighted_cross_entropy(logits, label, weight)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Without the drop: the features and every sample as they were.
  same, ones = opm.opm_mask_features(
      features, {m: jnp.zeros(12) for m in MODS}, got_theta, jnp.bool_(False))
  for m in MODS:
    np.testing.assert_array_equal(same[m], features[m])
  np.testing.assert_array_equal(ones, np.ones(12))
  # A batch with no sample left has a zero loss, not a NaN.
  assert float(opm.weighted_cross_entropy(logits, label, jnp.zeros(12))) == 0.0


def test_keep_mask_keeps_each_modality_with_probability_one_minus_q():
  q = {"audio": jnp.float32(0.3), "image": jnp.float32(0.0),
       "text": jnp.float32(1.0)}
  keep = opm.opm_keep_mask(jax.random.key(0), q, 20000)
  assert float(jnp.mean(keep["audio"])) == pytest.approx(0.7, abs=0.015)
  assert float(jnp.min(keep["image"])) == 1.0
  assert float(jnp.max(keep["text"])) == 0.0
  again = opm.opm_keep_mask(jax.random.key(0), q, 20000)
  np.testing.assert_array_equal(keep["audio"], again["audio"])


@pytest.mark.parametrize("fusion", ["late", "concat"])
def test_fusing_features_from_params_is_the_models_fusion(fusion):
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="opm", **{"model.fusion": fusion})
  s = student_lib.build_student(cfg, ds, mesh)
  params = jax.device_get(s.state.params)
  out, _ = steps.apply_model(s.model, params, s.state.batch_stats,
                             fx.first_batch(ds)["inputs"], train=False)
  fused = opm.fuse_features(params, out.features, fusion, MODS)
  np.testing.assert_allclose(fused, out.logits, rtol=1e-5, atol=1e-6)


def plain_sgd(**overrides):
  return fx.tiny_config(**{"method": "opm", "model.fusion": "late",
                           "student.optimizer.momentum": 0.0,
                           "student.optimizer.weight_decay": 0.0},
                        **overrides)


def test_training_step_drops_the_dominant_modality():
  """q_base = 1, alpha = 0, p_exe = 1: the dominant modality is dropped from
  every sample (q = 1), the other rescaled by 1 / (1 - theta + 1e-5); the
  loss is the late fusion of those features, and with plain SGD the
  dropped encoder and head kernel get no gradient (its head bias still
  does)."""
  ds = fx.tiny_dataset()
  cfg = plain_sgd(**{"opm.q_base": 1.0, "opm.alpha": 0.0, "opm.p_exe": 1.0})
  model, params0, bs0, batch, new, metrics = fx.one_step(cfg, ds, 0)
  out, _ = steps.apply_model(model, params0, bs0, batch["inputs"],
                             train=True, rng=jax.random.key(0))
  uni = {m: np.asarray(out.modality_logits[m]) for m in MODS}
  want_q = released_coeffs(uni, batch["label"], 1.0, 0.0)
  dominant = [m for m in MODS if want_q[m] > 0]
  assert len(dominant) == 1  # the batch has a dominant modality
  (dom,), (other,) = dominant, [m for m in MODS if m not in dominant]
  dims = {m: out.features[m].shape[1] for m in MODS}
  theta = dims[dom] / sum(dims.values())
  assert metrics["opm/executed"] == 1.0 and metrics["opm/kept"] == 1.0
  assert metrics[f"opm/q/{dom}"] == 1.0 and metrics[f"opm/q/{other}"] == 0.0
  assert metrics["opm/theta"] == pytest.approx(theta, rel=1e-6)
  head = lambda m, f: (f @ np.asarray(params0["encoders"][m]["head"]["kernel"])
                       + np.asarray(params0["encoders"][m]["head"]["bias"]))
  f_other = np.asarray(out.features[other]) / (1 - theta + 1e-5)
  logits = (head(dom, 0.0 * np.asarray(out.features[dom]))
            + head(other, f_other)) / 2
  assert metrics["loss"] == pytest.approx(ce(logits, batch["label"]),
                                          rel=1e-5)
  for a, b in zip(jax.tree.leaves(new["encoders"][dom]["backbone"]),
                  jax.tree.leaves(params0["encoders"][dom]["backbone"])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(new["encoders"][dom]["head"]["kernel"],
                                params0["encoders"][dom]["head"]["kernel"])
  assert not np.array_equal(new["encoders"][dom]["head"]["bias"],
                            params0["encoders"][dom]["head"]["bias"])
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(new["encoders"][other]["backbone"]),
      jax.tree.leaves(params0["encoders"][other]["backbone"])))


@pytest.mark.parametrize("overrides", [
    {"opm.window.start_epoch": 1},  # outside the window
    {"opm.p_exe": 0.0},             # inside, the drop never executes
])
def test_without_a_drop_the_step_is_plain_fused_cross_entropy(overrides):
  ds = fx.tiny_dataset()
  cfg = plain_sgd(**{"opm.q_base": 1.0, "opm.alpha": 0.0}, **overrides)
  model, params0, bs0, batch, new, metrics = fx.one_step(cfg, ds, 0)

  def plain(p):
    out, _ = steps.apply_model(model, p, bs0, batch["inputs"], train=True,
                               rng=jax.random.key(0))
    logp = jax.nn.log_softmax(out.logits)
    return -jnp.mean(logp[jnp.arange(32), batch["label"]])

  value, grads = jax.value_and_grad(plain)(params0)
  assert metrics["opm/executed"] == 0.0
  assert metrics["loss"] == pytest.approx(float(value), rel=1e-5)
  outside = "opm.window.start_epoch" in overrides
  assert (metrics["opm/q/audio"] + metrics["opm/q/image"] == 0.0) == outside
  for p0, g, got in zip(jax.tree.leaves(params0), jax.tree.leaves(grads),
                        jax.tree.leaves(new)):
    np.testing.assert_allclose(got, p0 - 0.05 * np.asarray(g), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("fusion", ["sum", "film", "gated", "cross_attention"])
def test_fusions_without_the_released_form_are_refused(fusion):
  cfg = fx.tiny_config(method="opm", **{"model.fusion": fusion})
  with pytest.raises(ConfigError, match="fusion= one of .'late', 'concat'."):
    opm.build(cfg, "classification", modalities=MODS)


def test_bad_values_are_refused():
  for field, value in (("q_base", 1.5), ("p_exe", -0.1), ("alpha", -1.0),
                       ("others", "max")):
    cfg = fx.tiny_config(**{"method": "opm", f"opm.{field}": value})
    with pytest.raises(ConfigError, match=f"config.opm.{field}"):
      opm.build(cfg, "classification", modalities=MODS)
