"""Tests for g2d_jax.losses against NumPy and hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import g2d_jax
from g2d_jax import losses


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kl_batchmean(student, teacher, t):
  """KL(p_t || p_s) as explicit loops (sum over classes, mean over B)."""
  ls = np_log_softmax(np.asarray(student) / t)
  lt = np_log_softmax(np.asarray(teacher) / t)
  total = 0.0
  for i in range(ls.shape[0]):
    for c in range(ls.shape[1]):
      p = math.exp(lt[i, c])
      total += p * (lt[i, c] - ls[i, c])
  return t * t * total / ls.shape[0]


def np_ce(logits, labels):
  ls = np_log_softmax(logits)
  return -np.mean([ls[i, y] for i, y in enumerate(labels)])


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_cross_entropy_hand_value():
  # -log(e^2 / (e^2 + e + 1)) = log(1 + e^-1 + e^-2)
  got = losses.cross_entropy(jnp.array([[2.0, 1.0, 0.0]]), jnp.array([0]))
  assert got == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-2)),
                              rel=1e-6)


def test_logit_distillation_hand_value():
  # p = [.5, .5], q = softmax([0, ln 3]) = [.25, .75]:
  # KL = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3).
  got = losses.logit_distillation(jnp.array([[0.0, math.log(3.0)]]),
                                  jnp.array([[0.0, 0.0]]))
  assert got == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logit_distillation_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  s = rng.normal(size=(5, 7)) * 3
  t = rng.normal(size=(5, 7)) * 3
  got = losses.logit_distillation(jnp.asarray(s, jnp.float32),
                                  jnp.asarray(t, jnp.float32), temperature)
  assert got == pytest.approx(np_kl_batchmean(s, t, temperature), rel=1e-5)


def test_logit_distillation_zero_when_equal_and_handles_zero_mass():
  x = jnp.array([[1.0, -2.0, 0.5]])
  assert losses.logit_distillation(x, x) == pytest.approx(0.0, abs=1e-7)
  # A teacher with (numerically) zero mass on a class adds nothing for it.
  teacher = jnp.array([[0.0, -1e4, 0.0]])
  student = jnp.array([[0.0, 3.0, 0.0]])
  got = losses.logit_distillation(student, teacher)
  # p = [.5, 0, .5]; q = softmax([0, 3, 0]).
  q = np.exp([0, 3, 0]) / np.exp([0, 3, 0]).sum()
  want = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[2])
  assert np.isfinite(got) and got == pytest.approx(want, rel=1e-5)


def test_feature_distillation_reductions():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(4, 6)).astype(np.float32)
  t = rng.normal(size=(4, 6)).astype(np.float32)
  sq = (s.astype(np.float64) - t) ** 2
  mean = float(losses.feature_distillation(s, t, "mean"))
  per_sample = float(losses.feature_distillation(s, t, "sum_features"))
  assert mean == pytest.approx(sq.sum() / (4 * 6), rel=1e-6)
  assert per_sample == pytest.approx(
      np.mean([np.sum(sq[i]) for i in range(4)]), rel=1e-6)
  assert per_sample == pytest.approx(6 * mean, rel=1e-6)


def test_feature_distillation_rejects_mismatched_widths():
  with pytest.raises(ValueError, match="same encoder"):
    losses.feature_distillation(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def _batch(modalities, b=6, c=5, d=8, seed=0):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: rng.normal(size=s).astype(np.float32)
  return dict(
      student_logits=f32(b, c) * 2,
      student_features={m: f32(b, d) for m in modalities},
      teacher_logits={m: f32(b, c) * 2 for m in modalities},
      teacher_features={m: f32(b, d) for m in modalities},
      labels=rng.integers(0, c, size=b).astype(np.int32))


@pytest.mark.parametrize("modalities", [("audio", "image"),
                                        ("audio", "text", "visual")])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.25, 0.75), (0.0, 1.0)])
def test_g2d_loss_classification_matches_numpy(modalities, alpha, beta):
  b = _batch(modalities)
  loss, parts = g2d_jax.g2d_loss(**b, alpha=alpha, beta=beta, temperature=2.0)
  ce = np_ce(b["student_logits"], b["labels"])
  feats = {m: np.mean((b["student_features"][m].astype(np.float64)
                       - b["teacher_features"][m]) ** 2) for m in modalities}
  kls = {m: np_kl_batchmean(b["student_logits"], b["teacher_logits"][m], 2.0)
         for m in modalities}
  want = ce + alpha * sum(feats.values()) + beta * sum(kls.values())
  assert loss == pytest.approx(want, rel=1e-5)
  assert parts["student"] == pytest.approx(ce, rel=1e-5)
  assert sorted(parts["feature"]) == sorted(modalities)
  for m in modalities:
    assert parts["feature"][m] == pytest.approx(feats[m], rel=1e-5)
    assert parts["logit"][m] == pytest.approx(kls[m], rel=1e-5)


def test_g2d_loss_sum_features_and_partial_teachers():
  b = _batch(("audio", "image"))
  # UMT-style: feature terms only, and only for audio.
  loss, parts = g2d_jax.g2d_loss(
      b["student_logits"], b["student_features"], None,
      {"audio": b["teacher_features"]["audio"]}, b["labels"],
      feature_reduction="sum_features")
  sq = (b["student_features"]["audio"].astype(np.float64)
        - b["teacher_features"]["audio"]) ** 2
  want = np_ce(b["student_logits"], b["labels"]) + sq.sum(-1).mean()
  assert loss == pytest.approx(want, rel=1e-5)
  assert parts["logit"] == {} and list(parts["feature"]) == ["audio"]


@pytest.mark.parametrize("out_shape", [(6,), (6, 1)])
@pytest.mark.parametrize("modalities", [("image", "tabular"),
                                        ("a", "b", "c")])
def test_g2d_loss_regression_matches_numpy(out_shape, modalities):
  rng = np.random.default_rng(3)
  s = rng.normal(size=out_shape).astype(np.float32)
  tl = {m: rng.normal(size=out_shape).astype(np.float32) for m in modalities}
  sf = {m: rng.normal(size=(6, 4)).astype(np.float32) for m in modalities}
  tf = {m: rng.normal(size=(6, 4)).astype(np.float32) for m in modalities}
  y = rng.uniform(size=6).astype(np.float32)
  loss, parts = g2d_jax.g2d_loss(s, sf, tl, tf, y, alpha=0.5, beta=2.0,
                                 task="regression")
  ps = np_sigmoid(s.reshape(-1))
  mse = np.mean((ps - y) ** 2)
  logit = {m: np.mean((ps - np_sigmoid(tl[m].reshape(-1))) ** 2)
           for m in modalities}
  feat = {m: np.mean((sf[m].astype(np.float64) - tf[m]) ** 2)
          for m in modalities}
  want = mse + 0.5 * sum(feat.values()) + 2.0 * sum(logit.values())
  assert loss == pytest.approx(want, rel=1e-5)
  assert parts["student"] == pytest.approx(mse, rel=1e-5)
  for m in modalities:
    assert parts["logit"][m] == pytest.approx(logit[m], rel=1e-5)


def test_g2d_loss_regression_rejects_temperature():
  with pytest.raises(ValueError, match="temperature"):
    g2d_jax.g2d_loss(jnp.zeros(3), {}, None, None, jnp.zeros(3),
                     task="regression", temperature=2.0)


def test_g2d_loss_bad_arguments():
  b = _batch(("audio", "image"))
  with pytest.raises(ValueError, match="task"):
    g2d_jax.g2d_loss(**b, task="ranking")
  with pytest.raises(ValueError, match="feature_reduction"):
    g2d_jax.g2d_loss(**b, feature_reduction="l1")
  tf = dict(b["teacher_features"], text=b["teacher_features"]["audio"])
  with pytest.raises(ValueError, match="not in student_features"):
    g2d_jax.g2d_loss(b["student_logits"], b["student_features"], None, tf,
                     b["labels"])


def test_g2d_loss_gradients_do_not_reach_teachers():
  b = _batch(("audio", "image"))

  def f(teacher_logits, teacher_features):
    return g2d_jax.g2d_loss(b["student_logits"], b["student_features"],
                            teacher_logits, teacher_features, b["labels"])[0]

  g_logits, g_feats = jax.grad(f, argnums=(0, 1))(b["teacher_logits"],
                                                  b["teacher_features"])
  for g in jax.tree.leaves((g_logits, g_feats)):
    np.testing.assert_array_equal(g, 0.0)


def test_g2d_loss_student_gradient_matches_finite_difference():
  b = _batch(("audio", "image"), b=3, c=4, d=3)

  def f(student_logits):
    return g2d_jax.g2d_loss(student_logits, b["student_features"],
                            b["teacher_logits"], b["teacher_features"],
                            b["labels"])[0]

  x = jnp.asarray(b["student_logits"])
  g = np.asarray(jax.grad(f)(x))
  eps = 1e-2
  e = np.zeros_like(b["student_logits"])
  e[1, 2] = eps
  fd = (f(x + e) - f(x - e)) / (2 * eps)
  assert float(g[1, 2]) == pytest.approx(float(fd), rel=2e-2, abs=1e-4)
