"""AGM: the mono-modal (Shapley) outputs, scores, coefficients and running
means against NumPy transcriptions of the released code, the gradient the
hooks produce, the clipping, and real training steps (the release's update,
the window's hold, SMP)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.methods import agm
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")


softmax = fx.softmax


# --- The release, transcribed (lihong2303/AGM; BalanceBenchmark / MLB for
# three modalities). ---------------------------------------------------------

def released_mono_2(total_out, pad_visual_out, pad_audio_out):
  """model/CREMAD_net.py: Modality_Audio, Modality_Visual."""
  m_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
  m_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
  return m_a, m_v


def released_mono_3(AVT, AV, AT, VT, A, V, T):  # the release's names
  """AGM_trainer.py (three modalities): Modality_Audio/Visual/Text."""
  m_a = 1 / 3 * (AVT - VT) + 1 / 6 * (AV - V + AT - T) + 1 / 3 * A
  m_v = 1 / 3 * (AVT - AT) + 1 / 6 * (AV - A + VT - T) + 1 / 3 * V
  m_t = 1 / 3 * (AVT - AV) + 1 / 6 * (VT - V + AT - A) + 1 / 3 * T
  return m_a, m_v, m_t


def released_score(out, label):
  """run/CREMAD_main.py: mean of -log p(y), p < 1e-8 scored as 1e-8."""
  score = 0.0
  p = softmax(out.astype(np.float64))
  for k in range(out.shape[0]):
    if p[k][label[k]] < 1e-8:
      score += -np.log(1e-8)
    else:
      score += -np.log(p[k][label[k]])
  return score / out.shape[0]


def released_step(score_audio, score_visual, train_score_a, train_score_v,
                  alpha, iteration):
  """run/CREMAD_main.py `train`: coefficients, then the running means."""
  ratio_a = math.exp(score_visual - score_audio)
  ratio_v = math.exp(score_audio - score_visual)
  optimal_ratio_a = math.exp(train_score_v - train_score_a)
  optimal_ratio_v = math.exp(train_score_a - train_score_v)
  coeff_a = math.exp(alpha * (min(optimal_ratio_a - ratio_a, 10)))
  coeff_v = math.exp(alpha * (min(optimal_ratio_v - ratio_v, 10)))
  train_score_a = (train_score_a * (iteration - 1) / iteration
                   + score_audio / iteration)
  train_score_v = (train_score_v * (iteration - 1) / iteration
                   + score_visual / iteration)
  return coeff_a, coeff_v, train_score_a, train_score_v


def released_coefficients_3(s, train, alpha, cap):
  """Bias_Infusion_AGM_3mod's ratio (mean - s) * 3/2 and cap."""
  mean, train_mean = sum(s) / 3, sum(train) / 3
  return [math.exp(alpha * min(
      math.exp((train_mean - train[i]) * 3 / 2)
      - math.exp((mean - s[i]) * 3 / 2), cap)) for i in range(3)]


def released_clip(grads, fusion_leaves, max_norm):
  """`if grad_max > c or grad_min < -c: clip_grad_norm_(params, c)`."""
  g_max = max(float(np.max(g)) for g in fusion_leaves)
  g_min = min(float(np.min(g)) for g in fusion_leaves)
  if not (g_max > max_norm or g_min < -max_norm):
    return grads, False
  total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64)))
                        for g in jax.tree.leaves(grads)))
  coef = max_norm / (total + 1e-6)
  if coef >= 1.0:
    return grads, True
  return jax.tree.map(lambda g: np.asarray(g) * coef, grads), True


# --- The rule's pieces. ---------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mono_outputs_match_the_release_for_two_and_three_modalities(seed):
  rng = np.random.default_rng(seed)
  f = lambda: rng.normal(size=(5, 4)).astype(np.float32)
  logits = {("audio", "image"): f(), ("audio",): f(), ("image",): f()}
  mono = agm.shapley_outputs(logits, MODS)
  want_a, want_v = released_mono_2(logits[("audio", "image")],
                                   logits[("audio",)], logits[("image",)])
  np.testing.assert_allclose(mono["audio"], want_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mono["image"], want_v, rtol=1e-5, atol=1e-6)

  order = ("a", "v", "t")
  logits3 = {t: f() for t in agm.coalitions(order)}
  mono3 = agm.shapley_outputs(logits3, order)
  g = lambda *t: logits3[tuple(t)]
  want = released_mono_3(g("a", "v", "t"), g("a", "v"), g("a", "t"),
                         g("v", "t"), g("a"), g("v"), g("t"))
  for m, w in zip(order, want):
    np.testing.assert_allclose(mono3[m], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_mono_outputs_sum_to_the_full_pass(k):
  order = tuple(f"m{i}" for i in range(k))
  ts = agm.coalitions(order)
  assert ts[0] == order and len(ts) == 2 ** k - 1 == len(set(ts))
  rng = np.random.default_rng(k)
  logits = {t: rng.normal(size=(3, 5)).astype(np.float32) for t in ts}
  mono = agm.shapley_outputs(logits, order)
  np.testing.assert_allclose(sum(mono.values()), logits[order], atol=1e-5)
  # The Shapley weights of one player sum to 1 over its coalitions.
  for m, cm in agm.shapley_coefficients(order).items():
    assert sum(c for t, c in cm.items() if m in t) == pytest.approx(1.0)


def test_one_modality_is_refused():
  with pytest.raises(ConfigError, match="at least two"):
    agm.shapley_coefficients(("audio",))


def test_scores_match_the_release_including_the_floor():
  rng = np.random.default_rng(0)
  out = rng.normal(size=(6, 5)).astype(np.float32)
  label = rng.integers(0, 5, 6)
  out[0] = 0.0
  out[0, (label[0] + 1) % 5] = 40.0   # p(y) ~ 4e-18 < 1e-8: the floor
  s = agm.agm_scores({"audio": out}, label)
  assert float(s["audio"]) == pytest.approx(released_score(out, label),
                                            rel=1e-5)
  assert float(s["audio"]) > -np.log(1e-8) / 6  # the floored sample counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coefficients_and_running_means_match_the_release(seed):
  """Five consecutive steps: k from the scores and the running means of
  all previous steps, then the means advance (iteration = step + 1)."""
  rng = np.random.default_rng(seed)
  alpha = 1.3
  avg = {"audio": jnp.float32(0.0), "image": jnp.float32(0.0)}
  ta = tv = 0.0
  for step in range(5):
    sa, sv = rng.uniform(0.2, 2.5, size=2)
    scores = {"audio": jnp.float32(sa), "image": jnp.float32(sv)}
    k = agm.agm_coefficients(scores, avg, alpha, cap=10.0)
    want_a, want_v, ta, tv = released_step(float(np.float32(sa)),
                                           float(np.float32(sv)), ta, tv,
                                           alpha, step + 1)
    assert float(k["audio"]) == pytest.approx(want_a, rel=1e-5)
    assert float(k["image"]) == pytest.approx(want_v, rel=1e-5)
    avg = agm.update_averages(avg, scores, jnp.int32(step + 1))
    assert float(avg["audio"]) == pytest.approx(ta, rel=1e-5)
    assert float(avg["image"]) == pytest.approx(tv, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_three_modality_coefficients(seed):
  rng = np.random.default_rng(seed)
  s, t = rng.uniform(0.2, 2.5, size=3), rng.uniform(0.2, 2.5, size=3)
  names = ("a", "v", "f")
  k = agm.agm_coefficients({n: jnp.float32(x) for n, x in zip(names, s)},
                           {n: jnp.float32(x) for n, x in zip(names, t)},
                           0.7, cap=7.0)
  want = released_coefficients_3([float(np.float32(x)) for x in s],
                                 [float(np.float32(x)) for x in t], 0.7, 7.0)
  for n, w in zip(names, want):
    assert float(k[n]) == pytest.approx(w, rel=1e-5)


def test_first_step_tie_and_cap():
  zero = {m: jnp.float32(0.0) for m in MODS}
  # A tie on the first step (means 0): r = eta = 1, k = 1 exactly.
  tie = agm.agm_coefficients({m: jnp.float32(1.7) for m in MODS}, zero, 2.0,
                             cap=10.0)
  assert [float(tie[m]) for m in MODS] == [1.0, 1.0]
  # The leader on the first step slows down, the other speeds up.
  k = agm.agm_coefficients({"audio": jnp.float32(0.5),
                            "image": jnp.float32(1.5)}, zero, 1.0, cap=10.0)
  assert float(k["audio"]) == pytest.approx(math.exp(1 - math.e), rel=1e-6)
  assert float(k["image"]) == pytest.approx(math.exp(1 - 1 / math.e),
                                            rel=1e-6)
  # A large target (eta - r = e^12 - 1 > cap) is capped: exp(alpha cap).
  capped = agm.agm_coefficients(
      {m: jnp.float32(1.0) for m in MODS},
      {"audio": jnp.float32(0.0), "image": jnp.float32(12.0)}, 0.5, cap=10.0)
  assert float(capped["audio"]) == pytest.approx(math.exp(5.0), rel=1e-6)


def test_hooked_coefficients_inside_and_outside_the_window():
  fresh = {"audio": jnp.float32(0.5), "image": jnp.float32(2.0)}
  held = {"audio": jnp.float32(0.8), "image": jnp.float32(1.1)}
  inside = agm.hooked_coefficients(fresh, held, jnp.bool_(True), hold=True)
  assert [float(inside[m]) for m in MODS] == [0.5, 2.0]
  kept = agm.hooked_coefficients(fresh, held, jnp.bool_(False), hold=True)
  assert [float(kept[m]) for m in MODS] == [
      pytest.approx(0.8), pytest.approx(1.1)]
  one = agm.hooked_coefficients(fresh, held, jnp.bool_(False), hold=False)
  assert [float(one[m]) for m in MODS] == [1.0, 1.0]


def test_scale_grad_scales_only_the_backward():
  x = jnp.arange(4.0)
  y, vjp = jax.vjp(lambda x: agm.scale_grad(x, jnp.float32(0.25)), x)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_allclose(vjp(jnp.ones(4))[0], 0.25 * np.ones(4))
  # No gradient reaches the coefficient.
  assert float(jax.grad(lambda k: jnp.sum(agm.scale_grad(x, k)))(
      jnp.float32(2.0))) == 0.0


def test_hooks_scale_each_real_path_of_an_additive_fusion():
  """Three modalities, f(T) = sum_{m in T} x_m W_m + sum_{m not in T} c_m
  + b: W_m gets k_m times the plain gradient, b mean(k) times, and the
  zero-input constant c_m (no plain gradient) (mean(k) - k_m) sum_i G_i."""
  rng = np.random.default_rng(0)
  order = ("a", "v", "t")
  x = {m: jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for m in order}
  params = {"W": {m: jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
                  for m in order},
            "c": {m: jnp.asarray(rng.normal(size=4), jnp.float32)
                  for m in order},
            "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
  y = jnp.asarray(rng.integers(0, 4, 6))
  k = {"a": jnp.float32(0.5), "v": jnp.float32(1.5), "t": jnp.float32(2.5)}

  def f(p, t):
    return p["b"] + sum(x[m] @ p["W"][m] if m in t else p["c"][m]
                        for m in order)

  def agm_loss(p):
    mono = agm.shapley_outputs({t: f(p, t) for t in agm.coalitions(order)},
                               order)
    fused = sum(agm.scale_grad(mono[m], k[m]) for m in order)
    return -jnp.mean(jax.nn.log_softmax(fused)[jnp.arange(6), y])

  got = jax.grad(agm_loss)(params)
  logits = f(params, order)
  G = (softmax(np.asarray(logits)) - np.eye(4)[np.asarray(y)]) / 6
  mean_k = float(np.mean([float(v) for v in k.values()]))
  for m in order:
    np.testing.assert_allclose(got["W"][m], float(k[m]) * np.asarray(x[m]).T
                               @ G, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["c"][m], (mean_k - float(k[m]))
                               * G.sum(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["b"], mean_k * G.sum(0), rtol=1e-4,
                             atol=1e-6)


def grads_tree(head_scale=1.0, fc_out=False):
  rng = np.random.default_rng(0)
  g = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  tree = {"encoders": {
      m: {"backbone": {"dense": {"kernel": g(5, 6)}},
          "head": {"kernel": head_scale * g(6, 4), "bias": g(4)}}
      for m in MODS}}
  if fc_out:
    for m in MODS:
      del tree["encoders"][m]["head"]
    tree["fusion"] = {"fc_out": {"kernel": head_scale * g(12, 4),
                                 "bias": g(4)}}
  return tree


@pytest.mark.parametrize("fc_out", [False, True])
@pytest.mark.parametrize("head_scale", [0.05, 3.0])
def test_clipping_matches_clip_grad_norm(fc_out, head_scale):
  g = grads_tree(head_scale, fc_out)
  fusion = ([g["fusion"]["fc_out"]["kernel"]] if fc_out else
            [g["encoders"][m]["head"]["kernel"] for m in MODS])
  want, hit = released_clip(g, fusion, 1.0)
  got, clipped = agm.clip_on_fusion_range(g, 1.0, MODS)
  assert float(clipped) == float(hit)
  assert hit == (head_scale > 1.0)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  if hit:
    norm = math.sqrt(sum(float(jnp.sum(a ** 2))
                         for a in jax.tree.leaves(got)))
    assert norm == pytest.approx(1.0, rel=1e-4)


def test_clipping_zero_gradients_and_off():
  g = jax.tree.map(jnp.zeros_like, grads_tree())
  got, clipped = agm.clip_on_fusion_range(g, 1.0, MODS)
  assert float(clipped) == 0.0
  assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(got))
  big = grads_tree(50.0)
  same, clipped = agm.clip_on_fusion_range(big, 0.0, MODS)
  assert float(clipped) == 0.0
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(big)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match="agm.clip=0"):
    agm.clip_on_fusion_range({"encoders": {"audio": {"backbone": {}}}}, 1.0,
                             MODS)


def test_bad_options_and_regression_are_refused():
  with pytest.raises(ConfigError, match="classification"):
    agm.build(fx.tiny_config(method="agm"), "regression", modalities=MODS)
  with pytest.raises(ConfigError, match="outside_window"):
    agm.build(fx.tiny_config(**{"method": "agm",
                                "agm.outside_window": "drop"}),
              "classification", modalities=MODS)
  with pytest.raises(ConfigError, match="clip"):
    agm.build(fx.tiny_config(**{"method": "agm", "agm.clip": -1.0}),
              "classification", modalities=MODS)


# --- Real training steps. -------------------------------------------------

def test_training_steps_follow_the_release_and_hold_after_the_window():
  """Step 1 (epoch 0, inside the window) against the release computed
  independently: three passes (the padded ones in inference mode), the
  transcribed coefficients, the hooks'
  gradient, the clipping, plain SGD; the full pass's BatchNorm statistics
  are kept. Step 2 (epoch 1, outside): the hooks keep step 1's k while the
  running means advance; one compiled step for both."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  # The window is epoch 0 of 3 (0.34 * 3 rounds to 1); clip 0.02 < the
  # head gradients, so the clipping acts.
  cfg = fx.tiny_config(**{"method": "agm", "agm.alpha": 2.0,
                          "agm.clip": 0.02, "agm.window.end": 0.34,
                          "student.optimizer.momentum": 0.0,
                          "student.optimizer.weight_decay": 0.0})
  s = student_lib.build_student(cfg, ds, mesh)
  model, gate, step, state = s.model, s.gate, s.step, s.state
  params0 = jax.device_get(state.params)
  bs0 = state.batch_stats
  batch = next(loader.train_batches(ds.splits["train"], 32, seed=0, epoch=0))
  batch["gate"] = gate.for_batch(batch, 0)
  a, v = batch["inputs"]["audio"], batch["inputs"]["image"]
  y = np.asarray(batch["label"])

  def passes(p):
    f = lambda x: steps.apply_model(model, p, bs0, x, train=True,
                                    rng=jax.random.key(0))
    # The padded passes in inference mode (the release's net.eval()).
    f_eval = lambda x: steps.apply_model(model, p, bs0, x, train=False)
    total, new_bs = f({"audio": a, "image": v})
    pad_visual_out = f_eval({"audio": a, "image": np.zeros_like(v)})[0].logits
    pad_audio_out = f_eval({"audio": np.zeros_like(a), "image": v})[0].logits
    return total.logits, pad_visual_out, pad_audio_out, new_bs

  total, pv, pa, full_bs = jax.jit(passes)(params0)
  m_a, m_v = released_mono_2(*(np.asarray(x, np.float64)
                               for x in (total, pv, pa)))
  sa, sv = released_score(m_a, y), released_score(m_v, y)
  k_a, k_v, ta, tv = released_step(sa, sv, 0.0, 0.0, 2.0, 1)
  assert abs(math.log(k_a)) > 1e-3  # a real modulation, not k = 1
  G = (softmax(np.asarray(total, np.float64)) - np.eye(4)[y]) / len(y)

  def hooked(p):
    t, pvo, pao, _ = passes(p)
    mono_a, mono_v = released_mono_2(t, pvo, pao)
    return (k_a * jnp.sum(jnp.asarray(G, jnp.float32) * mono_a)
            + k_v * jnp.sum(jnp.asarray(G, jnp.float32) * mono_v))

  grads = jax.device_get(jax.jit(jax.grad(hooked))(params0))
  grads, hit = released_clip(grads, [grads["encoders"][m]["head"]["kernel"]
                                     for m in MODS], 0.02)
  assert hit

  new, metrics = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                      jax.random.key(0))
  sc = metrics["scalars"]
  assert float(sc["agm/coeff/audio"]) == pytest.approx(k_a, rel=1e-4)
  assert float(sc["agm/coeff/image"]) == pytest.approx(k_v, rel=1e-4)
  assert float(sc["agm/score/audio"]) == pytest.approx(sa, rel=1e-5)
  assert float(sc["agm/clipped"]) == 1.0
  ce = -np.mean(np.log(softmax(np.asarray(total, np.float64)))[
      np.arange(len(y)), y])
  assert float(sc["loss"]) == pytest.approx(ce, rel=1e-5)
  got = jax.device_get(new.params)
  for (path, p0), g, p1 in zip(
      jax.tree_util.tree_flatten_with_path(params0)[0],
      jax.tree.leaves(grads), jax.tree.leaves(got)):
    np.testing.assert_allclose(p1, p0 - 0.05 * np.asarray(g), rtol=1e-4,
                               atol=1e-6, err_msg=str(path))
  for x, w in zip(jax.tree.leaves(new.batch_stats),
                  jax.tree.leaves(full_bs)):
    np.testing.assert_allclose(x, w, rtol=1e-6, atol=1e-7)
  ms = jax.device_get(new.method_state)
  assert float(ms["score_avg"]["audio"]) == pytest.approx(ta, rel=1e-5)
  assert float(ms["score_avg"]["image"]) == pytest.approx(tv, rel=1e-5)

  # Step 2, epoch 1: outside the window; the hooks hold step 1's k.
  batch2 = next(loader.train_batches(ds.splits["train"], 32, seed=0,
                                     epoch=1))
  batch2["gate"] = gate.for_batch(batch2, 1)
  new2, metrics2 = step(new, mesh_lib.shard_batch(batch2, mesh), np.int32(1),
                        jax.random.key(1))
  sc2 = metrics2["scalars"]
  assert float(sc2["agm/coeff/audio"]) == pytest.approx(k_a, rel=1e-4)
  assert float(sc2["agm/coeff/image"]) == pytest.approx(k_v, rel=1e-4)
  s2 = float(sc2["agm/score/audio"])
  ms2 = jax.device_get(new2.method_state)
  assert float(ms2["score_avg"]["audio"]) == pytest.approx(
      ta / 2 + s2 / 2, rel=1e-5)
  assert step.compiled_patterns() == {loader.ALL: 1}


def test_coalitions_cover_every_nonempty_subset_once():
  order = ("a", "b", "c")
  want = {tuple(t) for r in range(1, 4)
          for t in itertools.combinations(order, r)}
  assert set(agm.coalitions(order)) == want
