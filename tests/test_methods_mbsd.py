"""MBSD: the loss against a NumPy transcription of BalanceBenchmark's
MBSD_trainer.py (its 2- and 3-modality branches, values and gradients),
edge cases (ties, no correct modality, underflow, identical modalities),
training steps against an independent transcription, the window, separate
heads, the refusals and SMP composing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import mbsd
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

MODS = ("audio", "image")
NAMES = ("audio", "image", "text", "depth")

softmax = fx.softmax


def ce(logits, y):
  return -np.mean(np.log(softmax(logits))[np.arange(len(y)), y])


def released_pair(p, r, y, i, j):
  """One pair of MBSD_trainer.py's loop, transcribed with Python max/min on
  scalars: (torch.mm(w, loss_KL) / B, torch.mm(w, loss_RS) / B)."""
  b_size, c = r[i].shape
  pred = [q.argmax(-1) for q in p]
  w, ps, pw = np.zeros(b_size), np.zeros(b_size), np.zeros(b_size)
  for b in range(b_size):
    pi, pj = p[i][b, y[b]], p[j][b, y[b]]
    if pred[i][b] == y[b] or pred[j][b] == y[b]:
      w[b] = max(pi, pj) - min(pi, pj)
    ps[b] = max(pi, pj)
    pw[b] = min(pi, pj)
  kl = pw * (np.log(pw) - ps)  # F.kl_div(ps, pw, reduction='none')
  rs = 1 / c * np.sum((r[i] - r[j]) ** 2, axis=1)
  return w @ kl / b_size, w @ rs / b_size


def released_terms(z, y, space="released"):
  """(KL, RS) of the release: 2 modalities compare logits, 3 compare
  softmax predictions, averaged over (0,1), (0,2), (1,2). Beyond 3 (not in
  the release): every pair, as the module generalises."""
  p = [softmax(zi) for zi in z]
  on_probs = len(z) >= 3 if space == "released" else space == "probabilities"
  r = p if on_probs else z
  pairs = [released_pair(p, r, y, i, j)
           for i, j in itertools.combinations(range(len(z)), 2)]
  return (sum(k for k, _ in pairs) / len(pairs),
          sum(s for _, s in pairs) / len(pairs))


def random_logits(rng, k, b=8, c=5, scale=2.0):
  return [rng.normal(size=(b, c)) * scale for _ in range(k)]


def some_right_labels(rng, z):
  """Labels that the first modality gets right on the first half of the
  batch (so some samples carry weight) and random on the rest."""
  b, c = z[0].shape
  y = rng.integers(0, c, b)
  y[:b // 2] = z[0][:b // 2].argmax(-1)
  return y


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_terms_match_the_released_code(seed, k):
  rng = np.random.default_rng(seed)
  z = random_logits(rng, k)
  y = some_right_labels(rng, z)
  names = NAMES[:k]
  got = mbsd.mbsd_regularizers({m: jnp.float32(zi) for m, zi in
                                zip(names, z)}, jnp.int32(y), names)
  kl, rs = released_terms(z, y)
  assert float(got.kl) == pytest.approx(kl, rel=1e-5, abs=1e-7)
  assert float(got.rs) == pytest.approx(rs, rel=1e-5, abs=1e-7)
  # Some samples are weighted, some not (neither modality right).
  assert 0.0 < float(got.weight) < 1.0


@pytest.mark.parametrize("space,k", [("logits", 3), ("probabilities", 2)])
def test_forced_similarity_space(space, k):
  rng = np.random.default_rng(7)
  z = random_logits(rng, k)
  y = some_right_labels(rng, z)
  names = NAMES[:k]
  got = mbsd.mbsd_regularizers({m: jnp.float32(zi) for m, zi in
                                zip(names, z)}, jnp.int32(y), names, space)
  _, rs = released_terms(z, y, space)
  _, released_rs = released_terms(z, y)
  assert float(got.rs) == pytest.approx(rs, rel=1e-5)
  assert rs != pytest.approx(released_rs, rel=1e-3)


def numeric_grad(fn, z, eps=1e-6):
  out = []
  for zi in z:
    g = np.zeros_like(zi)
    for idx in np.ndindex(zi.shape):
      old = zi[idx]
      zi[idx] = old + eps
      hi = fn(z)
      zi[idx] = old - eps
      lo = fn(z)
      zi[idx] = old
      g[idx] = (hi - lo) / (2 * eps)
    out.append(g)
  return out


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 2), (2, 3)])
def test_gradient_flows_through_weight_and_both_modalities(seed, k):
  """Nothing is detached in the release: d(KL + RS)/dz, every path through
  g, ps and pw included, matches finite differences of the transcription."""
  rng = np.random.default_rng(seed)
  z = random_logits(rng, k, b=6, c=4)
  y = some_right_labels(rng, z)
  names = NAMES[:k]

  def ours(zs):
    t = mbsd.mbsd_regularizers(dict(zip(names, zs)), jnp.int32(y), names)
    return t.kl + t.rs

  got = jax.grad(ours)([jnp.float32(zi) for zi in z])
  want = numeric_grad(lambda zs: sum(released_terms(zs, y)), z)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4)
  # The weight's own gradient matters: detaching it changes the result.
  def detached(zs):
    a = mbsd.true_class(zs[0], jnp.int32(y))
    b = mbsd.true_class(zs[1], jnp.int32(y))
    g = jax.lax.stop_gradient(mbsd.confidence_gap_weight(a, b))
    kl = mbsd.released_kl(*mbsd.strong_and_weak(a, b))
    return jnp.mean(g * kl)
  if k == 2:
    full = jax.grad(lambda zs: mbsd.mbsd_regularizers(
        dict(zip(names, zs)), jnp.int32(y), names).kl)(
            [jnp.float32(zi) for zi in z])
    part = jax.grad(detached)([jnp.float32(zi) for zi in z])
    assert not np.allclose(full[0], part[0], atol=1e-5)


def test_weight_is_zero_on_ties_and_where_no_modality_is_right():
  y = jnp.int32([0, 0, 1])
  za = jnp.float32([[2.0, 0.0, 0.0],    # right
                    [0.0, 3.0, 0.0],    # wrong
                    [0.0, 1.0, 0.0]])   # right
  zb = jnp.float32([[2.0, 0.0, 0.0],    # the same: a tie
                    [0.0, 1.0, 3.0],    # wrong too
                    [0.0, 1.0, 1.0]])   # tied argmax: index 1, right
  a, b = mbsd.true_class(za, y), mbsd.true_class(zb, y)
  g = np.asarray(mbsd.confidence_gap_weight(a, b))
  assert g[0] == 0.0 and g[1] == 0.0
  want = softmax(np.float64(za[2]))[1] - softmax(np.float64(zb[2]))[1]
  assert g[2] == pytest.approx(want, rel=1e-5)
  # Both predictions wrong although their confidences differ: no weight.
  assert float(a.prob[1]) != pytest.approx(float(b.prob[1]))


def test_identical_modalities_give_zero_terms_and_zero_gradient():
  rng = np.random.default_rng(5)
  z = jnp.float32(rng.normal(size=(6, 4)))
  y = jnp.int32(rng.integers(0, 4, 6))

  def reg(za, zb):
    t = mbsd.mbsd_regularizers({"audio": za, "image": zb}, y, MODS)
    return t.kl + t.rs

  assert float(reg(z, z)) == 0.0
  ga, gb = jax.grad(reg, argnums=(0, 1))(z, z)
  np.testing.assert_array_equal(ga, np.zeros_like(ga))
  np.testing.assert_array_equal(gb, np.zeros_like(gb))


def test_underflowing_probability_stays_finite():
  """A true-class probability that underflows to 0 (torch: log 0): the value
  is the limit 0 * log 0 = 0 and the gradient is finite."""
  y = jnp.int32([0, 1])
  za = jnp.float32([[300.0, 0.0], [0.0, 5.0]])
  zb = jnp.float32([[-300.0, 0.0], [0.0, 1.0]])
  fn = lambda a, b: mbsd.mbsd_regularizers(
      {"audio": a, "image": b}, y, MODS, "probabilities").kl
  value = fn(za, zb)
  grads = jax.grad(fn, argnums=(0, 1))(za, zb)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def moved(new, old):
  return any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


def plain_sgd(**overrides):
  return fx.tiny_config(**{"method": "mbsd",
                           "student.optimizer.momentum": 0.0,
                           "student.optimizer.weight_decay": 0.0},
                        **overrides)


def transcribed_loss(out, p, labels, fusion):
  """MBSDTrainer.training_step inside the window for two modalities,
  written with jnp.maximum/minimum and torch's kl_div formula (xlogy), the
  unimodal logits built from the parameters: concat `fc_out` slices plus
  bias / 2 (avclassify_model.py), late fusion each modality's head."""
  a, v = out.features["audio"], out.features["image"]
  if fusion == "concat":
    kernel, bias = (p["fusion"]["fc_out"]["kernel"],
                    p["fusion"]["fc_out"]["bias"])
    na = a.shape[1]
    za, zv = a @ kernel[:na] + bias / 2, v @ kernel[na:] + bias / 2
  else:
    head = lambda m, f: (f @ p["encoders"][m]["head"]["kernel"]
                         + p["encoders"][m]["head"]["bias"])
    za, zv = head("audio", a), head("image", v)
  pa, pv = jax.nn.softmax(za), jax.nn.softmax(zv)
  ya = jnp.take_along_axis(pa, labels[:, None], 1)[:, 0]
  yv = jnp.take_along_axis(pv, labels[:, None], 1)[:, 0]
  right = (pa.argmax(1) == labels) | (pv.argmax(1) == labels)
  w = jnp.where(right, jnp.maximum(ya, yv) - jnp.minimum(ya, yv), 0.0)
  ps, pw = jnp.maximum(ya, yv), jnp.minimum(ya, yv)
  kl = jax.scipy.special.xlogy(pw, pw) - pw * ps
  rs = 1 / za.shape[1] * jnp.sum((za - zv) ** 2, axis=1)
  return (losses.cross_entropy(out.logits, labels)
          + losses.cross_entropy(za, labels)
          + losses.cross_entropy(zv, labels)
          + jnp.mean(w * rs) + jnp.mean(w * kl))


@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_training_step_descends_the_released_loss(fusion):
  """One SGD step = p - lr * grad of the transcribed loss, every param."""
  ds = fx.tiny_dataset()
  cfg = plain_sgd(**{"model.fusion": fusion})
  model, params0, bs0, batch, new, metrics = fx.one_step(cfg, ds, 0)
  labels = jnp.int32(batch["label"])

  def released(p):
    out, _ = steps.apply_model(model, p, bs0, batch["inputs"], train=True,
                               rng=jax.random.key(0))
    return transcribed_loss(out, p, labels, fusion)

  value, grads = jax.value_and_grad(released)(params0)
  assert metrics["loss"] == pytest.approx(float(value), rel=1e-5)
  assert metrics["mbsd/active"] == 1.0
  assert 0.0 < metrics["mbsd/weight"] < 1.0
  assert metrics["mbsd/rs"] > 0.0
  fx.assert_sgd_step(params0, grads, new, 0.05)


def test_outside_the_window_the_loss_is_the_fused_cross_entropy():
  ds = fx.tiny_dataset()
  cfg = plain_sgd(**{"model.fusion": "concat", "mbsd.window.start_epoch": 1})
  model, params0, bs0, batch, _, metrics = fx.one_step(cfg, ds, 0)
  out, _ = steps.apply_model(model, params0, bs0, batch["inputs"],
                             train=True, rng=jax.random.key(0))
  assert metrics["mbsd/active"] == 0.0
  assert metrics["loss"] == pytest.approx(
      ce(np.asarray(out.logits), batch["label"]), rel=1e-5)
  # The inside-window loss is larger by the unimodal CEs and the terms.
  inside = transcribed_loss(out, params0, jnp.int32(batch["label"]),
                            "concat")
  assert float(inside) > metrics["loss"] + 1.0


def test_separate_heads_train_and_fit_any_fusion():
  ds = fx.tiny_dataset()
  cfg = plain_sgd(**{"model.fusion": "film",
                     "mbsd.unimodal_heads": "separate"})
  _, params0, _, _, new, metrics = fx.one_step(cfg, ds, 0)
  for m in MODS:
    assert metrics[f"loss/unimodal/{m}"] > 0.0
    assert moved(new["aux"][m], params0["aux"][m])


@pytest.mark.parametrize("fusion", ["film", "gated", "cross_attention"])
def test_fusions_without_linear_modality_logits_are_refused(fusion):
  cfg = fx.tiny_config(method="mbsd", **{"model.fusion": fusion})
  with pytest.raises(ConfigError, match="unimodal_heads=separate"):
    mbsd.build(cfg, "classification", modalities=MODS)


def test_bad_settings_are_refused():
  with pytest.raises(ConfigError, match="classification only"):
    mbsd.build(fx.tiny_config(method="mbsd"), "regression")
  with pytest.raises(ConfigError, match="similarity_on"):
    mbsd.build(fx.tiny_config(**{"method": "mbsd",
                                 "mbsd.similarity_on": "features"}),
               "classification")
  with pytest.raises(ConfigError, match="pairs of modalities"):
    mbsd.build(fx.tiny_config(method="mbsd"), "classification",
               modalities=("audio",))


def test_tuning_grid_names_config_fields():
  c = fx.tiny_config(method="mbsd")
  for key, values in mbsd.TUNING_GRID.items():
    assert values[0] == c.mbsd[key]
    assert len(set(values)) >= 2


def test_smp_composes():
  """SMP with audio training alone, separate heads on concat fusion: the
  image encoder and the image head stay put while the audio ones, the
  shared fc_out and the MBSD terms act; one compiled (skipping) pattern."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "mbsd", "smp": True,
                          "model.fusion": "concat",
                          "mbsd.unimodal_heads": "separate"})
  s = student_lib.build_student(cfg, ds, mesh)
  p0 = jax.device_get(s.state.params)
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  batch["gate"] = s.gate.for_batch(batch, 0)
  new, metrics = s.step(s.state, mesh_lib.shard_batch(batch, mesh),
                        np.int32(0), jax.random.key(0))
  p1 = jax.device_get(new.params)
  scalars = {k: float(v) for k, v in metrics["scalars"].items()}
  assert scalars["kappa/image"] == 0.0 and scalars["kappa/audio"] == 1.0
  assert scalars["mbsd/active"] == 1.0 and scalars["mbsd/rs"] > 0.0
  for part in ("encoders", "aux"):
    assert not moved(p1[part]["image"], p0[part]["image"])
    assert moved(p1[part]["audio"], p0[part]["audio"])
  assert moved(p1["fusion"], p0["fusion"])
  assert s.step.compiled_patterns() == {0: 1}
