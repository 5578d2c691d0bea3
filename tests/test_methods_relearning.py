"""Diagnosing and Re-learning: the scaling, k-means++, Lloyd and purity
against NumPy transcriptions of the released code (and of the sklearn
functions it calls), alpha and the soft re-initialisation, the diagnosis
schedule, the epoch hook, the training step (mix before the gradient,
feature recording), SMP, and exact resume around a re-initialisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.methods import relearning
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

# --------------------------------------------------------------------------
# NumPy transcriptions.


def released_purity_score(y_true, y_pred):
  """ours.py's purity_score, transcribed (sklearn's accuracy_score inlined)."""
  y_true = y_true.copy()
  y_voted_labels = np.zeros(y_true.shape)
  labels = np.unique(y_true)
  ordered_labels = np.arange(labels.shape[0])
  for k in range(labels.shape[0]):
    y_true[y_true == labels[k]] = ordered_labels[k]
  labels = np.unique(y_true)
  bins = np.concatenate((labels, [np.max(labels) + 1]), axis=0)
  for cluster in np.unique(y_pred):
    hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
    y_voted_labels[y_pred == cluster] = np.argmax(hist)
  return np.mean(y_true == y_voted_labels)


def sklearn_minmax(x):
  """MinMaxScaler(feature_range=(-1, 1)).fit_transform, transcribed."""
  lo, hi = x.min(0), x.max(0)
  span = hi - lo
  span[span < 10 * np.finfo(span.dtype).eps] = 1.0
  scale = 2.0 / span
  return x * scale + (-1.0 - lo * scale)


def sq_dist(a, b):
  return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T
                    + (b * b).sum(1)[None], 0.0)


def sklearn_plusplus(x, k, u0, trials):
  """sklearn's _kmeans_plusplus (unit weights), its random numbers given."""
  n = len(x)
  w = np.ones(n)
  first = int(np.searchsorted(np.cumsum(w / w.sum()), u0, side="right"))
  centers = [x[first]]
  closest = sq_dist(x[first][None], x)[0]
  pot = closest @ w
  for c in range(1, k):
    cand = np.searchsorted(np.cumsum(w * closest), trials[c - 1] * pot)
    cand = np.clip(cand, None, n - 1)
    d = np.minimum(closest, sq_dist(x[cand], x))
    pots = d @ w
    b = np.argmin(pots)
    pot, closest = pots[b], d[b]
    centers.append(x[cand[b]])
  return np.stack(centers)


def sklearn_lloyd(x, centers, max_iter=300, tol=1e-4):
  """sklearn's _kmeans_single_lloyd with unit weights (relocating empty
  clusters to the farthest points), transcribed; returns labels."""
  tol = np.mean(np.var(x, axis=0)) * tol
  labels_old = np.full(len(x), -1)
  strict = False
  for _ in range(max_iter):
    labels = sq_dist(x, centers).argmin(1)
    sums = np.zeros_like(centers)
    weight = np.zeros(len(centers))
    for i, c in enumerate(labels):
      sums[c] += x[i]
      weight[c] += 1
    empty = np.where(weight == 0)[0]
    if len(empty):
      far = np.argsort(-((x - centers[labels]) ** 2).sum(1), kind="stable")
      for j, new in enumerate(empty):
        i = far[j]
        sums[labels[i]] -= x[i]
        weight[labels[i]] -= 1
        sums[new], weight[new] = x[i], 1
    new_centers = np.where(weight[:, None] > 0,
                           sums / np.maximum(weight, 1)[:, None], centers)
    shift = ((new_centers - centers) ** 2).sum()
    centers = new_centers
    if np.array_equal(labels, labels_old):
      strict = True
      break
    if shift <= tol:
      break
    labels_old = labels
  if not strict:
    labels = sq_dist(x, centers).argmin(1)
  return labels


def released_separability(x, y, k, key):
  """reinit_score for one modality and split: MinMaxScaler, KMeans (one
  k-means++ run from the draws of the method's key, then Lloyd),
  purity_score; all transcribed."""
  xs = sklearn_minmax(np.asarray(x, np.float32))
  u0, trials = relearning.plusplus_draws(jax.random.split(key, 1)[0], k)
  start = sklearn_plusplus(xs, k, float(u0), np.asarray(trials))
  return released_purity_score(np.asarray(y), sklearn_lloyd(xs, start))


def blobs(seed, n=100, k=4, d=6):
  """n points around k random centres in d dimensions (fixed shapes, so
  the jitted functions compile once across seeds)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  x = (rng.normal(size=(k, d)) * rng.uniform(0.5, 3.0))[y]
  x = (x + rng.normal(size=(n, d))).astype(np.float32)
  return x, y, k


plusplus = jax.jit(relearning.kmeans_plusplus, static_argnums=2)
lloyd = jax.jit(relearning.lloyd, static_argnames=("max_iter", "tol"))


# --------------------------------------------------------------------------
# Diagnosing.


@pytest.mark.parametrize("seed", range(4))
def test_minmax_matches_sklearn_and_ignores_padding(seed):
  x, _, _ = blobs(seed)
  x[:, 0] = 3.0  # a constant column maps to -1
  pad = np.concatenate([x, np.full((5, x.shape[1]), 1e3, np.float32)])
  mask = np.arange(len(pad)) < len(x)
  got = np.asarray(relearning.minmax_scale(jnp.asarray(pad),
                                           jnp.asarray(mask)))
  np.testing.assert_allclose(got[:len(x)], sklearn_minmax(x), atol=1e-5)
  np.testing.assert_array_equal(got[:len(x), 0], -1.0)
  np.testing.assert_array_equal(got[len(x):], 0.0)


@pytest.mark.parametrize("seed,k", [(0, 4), (1, 4), (2, 7), (3, 2)])
def test_kmeans_plusplus_matches_sklearn_given_its_draws(seed, k):
  x, _, k = blobs(seed, k=k)
  x = sklearn_minmax(x)
  u0, trials = relearning.plusplus_draws(jax.random.key(seed), k)
  assert trials.shape == (k - 1, 2 + int(np.log(k)))
  got = plusplus(jnp.asarray(x), jnp.ones(len(x)), k, (u0, trials))
  want = sklearn_plusplus(x.astype(np.float64), k, float(u0),
                          np.asarray(trials, np.float64))
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_kmeans_plusplus_never_draws_padding():
  x, _, k = blobs(7)
  pad = np.concatenate([x, np.full((20, x.shape[1]), 50.0, np.float32)])
  w = (np.arange(len(pad)) < len(x)).astype(np.float32)
  for s in range(5):
    draws = relearning.plusplus_draws(jax.random.key(s), k)
    got = np.asarray(plusplus(jnp.asarray(pad), jnp.asarray(w), k, draws))
    assert np.all(np.abs(got) < 50.0)


@pytest.mark.parametrize("seed,k", [(0, 4), (1, 4), (2, 7)])
def test_lloyd_matches_sklearn_from_the_same_start(seed, k):
  x, _, k = blobs(seed, k=k)
  x = sklearn_minmax(x)
  rng = np.random.default_rng(seed)
  start = x[rng.choice(len(x), k, replace=False)]
  mask = jnp.ones(len(x), bool)
  labels, _, _ = lloyd(jnp.asarray(x), mask, jnp.asarray(start),
                       max_iter=300, tol=1e-4)
  np.testing.assert_array_equal(labels, sklearn_lloyd(x, start))


def test_lloyd_relocates_empty_clusters_and_ignores_padding():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(60, 3)).astype(np.float32)
  start = x[[0, 0, 5, 0, 9]].copy()  # duplicates: empty clusters at once
  want = sklearn_lloyd(x, start)
  assert len(np.unique(want)) == 5
  pad = np.concatenate([x, 40 * np.ones((7, 3), np.float32)])
  mask = jnp.asarray(np.arange(len(pad)) < len(x))
  labels, _, _ = lloyd(jnp.asarray(pad), mask, jnp.asarray(start),
                       max_iter=300, tol=1e-4)
  np.testing.assert_array_equal(np.asarray(labels)[:len(x)], want)


@pytest.mark.parametrize("seed", range(4))
def test_purity_matches_the_released_score(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 5, 90)
  y[y == 2] = 3  # a missing class, as purity_score's relabelling handles
  clusters = rng.integers(0, 5, 90)
  got = relearning.purity(jnp.asarray(clusters), jnp.asarray(y),
                          jnp.ones(90, bool), 5, 5)
  assert float(got) == pytest.approx(released_purity_score(y, clusters),
                                     abs=1e-6)
  # Padding rows do not count.
  pad_y = np.concatenate([y, np.zeros(10, int)])
  pad_c = np.concatenate([clusters, np.zeros(10, int)])
  mask = jnp.asarray(np.arange(100) < 90)
  assert float(relearning.purity(jnp.asarray(pad_c), jnp.asarray(pad_y),
                                 mask, 5, 5)) == pytest.approx(float(got))


def test_purity_ties_and_a_single_cluster():
  # A cluster with a tied majority counts the tied count once.
  y = np.array([0, 1, 0, 1, 2, 2])
  c = np.array([0, 0, 0, 0, 1, 1])
  got = float(relearning.purity(jnp.asarray(c), jnp.asarray(y),
                                jnp.ones(6, bool), 3, 3))
  assert got == pytest.approx(released_purity_score(y, c)) == 4 / 6
  # Identical features (every column constant: -1 after scaling): one
  # cluster takes everything, the purity is the majority share. (The
  # shapes of blobs(), as the next test, so one compilation serves both.)
  _, y, k = blobs(11)
  p = relearning.separability(jnp.ones((100, 6)), jnp.asarray(y),
                              jnp.ones(100, bool), k, jax.random.key(0))
  assert float(p) == pytest.approx(np.bincount(y).max() / 100)


def test_separability_of_separated_and_of_random_features():
  x, y, k = blobs(11)
  centres = 20.0 * np.random.default_rng(0).normal(size=(k, x.shape[1]))
  mask = jnp.ones(len(y), bool)
  p = relearning.separability(jnp.asarray(x + centres[y]), jnp.asarray(y),
                              mask, k, jax.random.key(0))
  assert float(p) == 1.0
  noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  q = relearning.separability(jnp.asarray(noise), jnp.asarray(y), mask, k,
                              jax.random.key(0))
  assert float(q) < 0.8


def test_stacked_separability_equals_the_transcription_per_problem():
  # Different sizes and widths, padded rows: one lax.map over zero-padded
  # copies gives each problem's own purity.
  problems, want = [], []
  for seed, (n, d) in enumerate([(90, 5), (60, 9)]):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = (rng.normal(size=(4, d)) * 1.2)[y] + rng.normal(size=(n, d))
    x = x.astype(np.float32)
    mask = np.arange(n) < n - 6
    problems.append((jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)))
    want.append(released_separability(x[mask], y[mask], 4, jax.random.key(0)))
  got = relearning.stacked_separability(problems, 4, jax.random.key(0))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert 0.3 < min(want) and max(want) < 1.0  # neither trivial nor random


@pytest.mark.parametrize("p_train,p_val", [(0.9, 0.6), (0.4, 0.7), (0.5, 0.5)])
def test_alpha_is_tanh_of_lambda_times_the_purity_gap(p_train, p_val):
  gap = relearning.purity_gap(jnp.float32(p_train), jnp.float32(p_val))
  alpha = relearning.reinit_strength(gap, 3.0)
  assert float(alpha) == pytest.approx(np.tanh(3 * abs(p_train - p_val)),
                                       abs=1e-6)


def test_soft_reinit_is_the_released_mix():
  rng = np.random.default_rng(0)
  cur = {"a": rng.normal(size=(3, 2)).astype(np.float32),
         "b": rng.normal(size=(4,)).astype(np.float32)}
  ini = jax.tree.map(lambda v: (v * 0 + 1).astype(np.float32), cur)
  for a in (0.0, 0.3, 1.0):
    got = relearning.soft_reinit(cur, ini, jnp.float32(a))
    for k in cur:
      np.testing.assert_allclose(got[k], a * ini[k] + (1 - a) * cur[k],
                                 rtol=1e-6)
  got = relearning.soft_reinit(cur, ini, jnp.float32(1.0))
  np.testing.assert_array_equal(got["a"], ini["a"])


def released_reinit_epochs(reinit_epoch, reinit_num, epochs):
  """ours.py's main loop: the epochs after which it re-initialises."""
  out, flag = [], 0
  for epoch in range(epochs):
    if epoch % reinit_epoch == 0 and epoch > 0:
      flag += 1
      if flag <= reinit_num:
        out.append(epoch)
  return out


@pytest.mark.parametrize("period,count,epochs", [
    (20, 3, 90), (13, 3, 60), (2, 3, 8), (1, 3, 4), (1, 3, 2), (5, 0, 30),
    (7, 10, 30)])
def test_diagnosis_epochs_follow_the_released_loop(period, count, epochs):
  got = relearning.diagnosis_epochs(period, count, epochs)
  # The hook runs at the start of the next epoch; one after the last
  # epoch would change nothing.
  want = [d + 1 for d in released_reinit_epochs(period, count, epochs)
          if d + 1 < epochs]
  assert list(got) == want


def test_period_is_a_fraction_of_the_run():
  cfg = fx.tiny_config(method="relearning", **{"student.epochs": 90})
  assert relearning.reinit_period(cfg) == 20
  cfg = fx.tiny_config(method="relearning", **{"student.epochs": 8})
  assert relearning.reinit_period(cfg) == 2
  cfg = fx.tiny_config(method="relearning", **{
      "student.epochs": 2, "relearning.reinit_every_epochs": 1})
  assert relearning.reinit_period(cfg) == 1


@pytest.mark.parametrize("field,value", [
    ("move_lambda", -1.0), ("reinit_every", 0.0), ("reinit_num", -1),
    ("train_fraction", 0.0), ("val_fraction", 1.5), ("n_init", 0)])
def test_bad_settings_name_the_field(field, value):
  cfg = fx.tiny_config(method="relearning", **{f"relearning.{field}": value})
  with pytest.raises(ConfigError, match=field):
    relearning.build(cfg, "classification", steps_per_epoch=4)


def test_regression_and_a_missing_step_count_are_refused():
  cfg = fx.tiny_config(method="relearning")
  with pytest.raises(ConfigError, match="classification"):
    relearning.build(cfg, "regression", steps_per_epoch=4)
  with pytest.raises(ConfigError, match="steps_per_epoch"):
    relearning.build(cfg, "classification")


# --------------------------------------------------------------------------
# Through the pipeline.

# One student for the pipeline tests (its step compiles once): 4 steps per
# epoch, the last 2 recorded, 3 epochs with period 1, so one diagnosis, at
# the start of epoch 2.
CFG = {"method": "relearning", "relearning.train_fraction": 0.5,
       "relearning.reinit_every_epochs": 1}


@functools.lru_cache(maxsize=None)
def shared():
  """(dataset, mesh, student) of CFG."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  return ds, mesh, student_lib.build_student(fx.tiny_config(**CFG), ds, mesh)


def fresh(s):
  """A copy of the student's initial state (the step donates its input)."""
  return jax.device_put(jax.device_get(s.state))


def with_state(state, **changes):
  ms = dict(jax.device_get(state.method_state))
  ms.update(changes)
  return state.replace(method_state=jax.device_put(ms))


def run_step(s, state, batch, epoch):
  _, mesh, _ = shared()
  batch = dict(batch)
  batch["gate"] = s.gate.for_batch(batch, epoch)
  return s.step(state, mesh_lib.shard_batch(batch, mesh), np.int32(epoch),
                jax.random.key(0))


def test_state_holds_the_initial_encoders_and_a_feature_buffer():
  _, _, s = shared()
  ms = jax.device_get(s.state.method_state)
  params = jax.device_get(s.state.params)
  for m in ("audio", "image"):
    for a, b in zip(jax.tree.leaves(ms["init"][m]),
                    jax.tree.leaves(params["encoders"][m]["backbone"])):
      np.testing.assert_array_equal(a, b)
  # 4 steps per epoch, the last half recorded: 2 batches of 32 rows.
  assert jax.tree.map(np.shape, ms["train"]["features"]) == {
      "audio": (64, 8), "image": (64, 16)}
  assert not ms["train"]["mask"].any() and not any(ms["pending"].values())


def test_steps_record_the_features_of_the_epochs_last_batches():
  ds, _, s = shared()
  state, want = fresh(s), []
  for i, batch in enumerate(loader.train_batches(ds.splits["train"], 32,
                                                 seed=0, epoch=0)):
    out, _ = steps.apply_model(s.model, state.params, state.batch_stats,
                               batch["inputs"], train=True)
    if i >= 2:
      want.append((jax.device_get(out.features), batch["label"]))
    state, metrics = run_step(s, state, batch, 0)
    mask = np.asarray(state.method_state["train"]["mask"])
    assert mask.sum() == 32 * max(0, i - 1)
    assert float(metrics["scalars"]["relearning/reset/audio"]) == 0.0
  buf = jax.device_get(state.method_state["train"])
  for j, (feats, labels) in enumerate(want):
    rows = slice(32 * j, 32 * (j + 1))
    np.testing.assert_array_equal(buf["label"][rows], labels)
    for m in ("audio", "image"):
      np.testing.assert_allclose(buf["features"][m][rows], feats[m],
                                 rtol=1e-5, atol=1e-6)


def test_hook_diagnoses_only_at_diagnosis_epochs():
  ds, mesh, s = shared()  # 3 epochs, period 1: diagnosed at epoch 2 only
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 64).astype(np.int32)
  train = {"features": {"audio": rng.normal(size=(64, 8)).astype(np.float32)
                        + 3 * np.eye(4, 8, dtype=np.float32)[y],
                        "image": rng.normal(size=(64, 16)).astype(
                            np.float32)},
           "label": y, "mask": np.ones(64, bool)}
  state = with_state(fresh(s), train=train)
  hook = student_lib.make_epoch_hook(s, ds.splits["train"], 32, 0, mesh,
                                     val=ds.splits["val"])
  before = jax.device_get(state.method_state)
  same = jax.device_get(hook(state, 1).method_state)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  new = jax.device_get(hook(state, 2).method_state)
  # Validation features of the model (inference mode), padding masked.
  feats, labels = {"audio": [], "image": []}, []
  for batch in loader.eval_batches(ds.splits["val"], 32):
    out, _ = steps.apply_model(s.model, state.params, state.batch_stats,
                               batch["inputs"], train=False)
    for m in feats:
      feats[m].append(np.asarray(out.features[m])[batch["mask"]])
    labels.append(batch["label"][batch["mask"]])
  labels = np.concatenate(labels)
  key = jax.random.key(relearning.KMEANS_SEED)
  for m in ("audio", "image"):
    p_train = released_separability(train["features"][m], y, 4, key)
    p_val = released_separability(np.concatenate(feats[m]), labels, 4, key)
    assert new["purity"]["train"][m] == pytest.approx(p_train, abs=1e-6)
    assert new["purity"]["val"][m] == pytest.approx(p_val, abs=1e-6)
    assert new["alpha"][m] == pytest.approx(
        np.tanh(3.0 * abs(p_train - p_val)), abs=1e-6)
    assert bool(new["pending"][m])
  # The separable audio buffer is diagnosed as well learnt.
  assert new["purity"]["train"]["audio"] > 0.9
  assert new["alpha"]["audio"] > 0.5


def test_the_step_mixes_before_its_gradient_and_clears_the_flag():
  ds, _, s = shared()
  batches = list(loader.train_batches(ds.splits["train"], 32, seed=0,
                                      epoch=0))
  state = fresh(s)
  for b in batches[:2]:  # move away from the initial weights
    state, _ = run_step(s, state, b, 0)
  host = jax.device_get(state)
  alpha = {"audio": np.float32(0.4), "image": np.float32(0.0)}
  pending = {"audio": np.bool_(True), "image": np.bool_(True)}
  reset, metrics = run_step(
      s, with_state(state, alpha=alpha, pending=pending), batches[2], 0)
  reset = jax.device_get(reset)
  # The same step from hand-mixed parameters, nothing pending.
  init = host.method_state["init"]
  mixed = jax.tree.map(np.copy, host.params)
  mixed["encoders"]["audio"]["backbone"] = jax.tree.map(
      lambda c, i: 0.4 * i + 0.6 * c, host.params["encoders"]["audio"][
          "backbone"], init["audio"])
  hand = jax.device_put(host.replace(params=mixed))
  hand, _ = run_step(s, hand, batches[2], 0)
  hand = jax.device_get(hand)
  for a, b in zip(jax.tree.leaves(reset.params), jax.tree.leaves(hand.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert not any(reset.method_state["pending"].values())
  scalars = metrics["scalars"]
  assert float(scalars["relearning/reset/audio"]) == 1.0
  assert float(scalars["relearning/alpha/audio"]) == pytest.approx(0.4)
  # The mix is not a no-op here (the weights had left their initial values).
  assert not np.allclose(
      mixed["encoders"]["audio"]["backbone"]["conv0"]["kernel"],
      host.params["encoders"]["audio"]["backbone"]["conv0"]["kernel"])


def test_smp_defers_the_reset_of_a_frozen_branch():
  ds, mesh, _ = shared()
  s = student_lib.build_student(fx.tiny_config(method="relearning", smp=True),
                                ds, mesh)
  state = s.state
  params0 = jax.device_get(state.params)
  # Move both branches away from their initial weights (joint phase).
  moved = jax.tree.map(lambda v: v + 0.1, params0)
  state = state.replace(params=jax.device_put(moved))
  alpha = {"audio": np.float32(0.5), "image": np.float32(0.5)}
  pending = {"audio": np.bool_(True), "image": np.bool_(True)}
  state = with_state(state, alpha=alpha, pending=pending)
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  batch["gate"] = s.gate.for_batch(batch, 0)
  assert batch["gate"]["pattern"] == 0  # audio trains alone
  new, metrics = s.step(state, mesh_lib.shard_batch(batch, mesh),
                        np.int32(0), jax.random.key(0))
  new = jax.device_get(new)
  for a, b in zip(jax.tree.leaves(new.params["encoders"]["image"]),
                  jax.tree.leaves(moved["encoders"]["image"])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(
      new.params["encoders"]["audio"]["backbone"]["conv0"]["kernel"],
      moved["encoders"]["audio"]["backbone"]["conv0"]["kernel"])
  assert bool(new.method_state["pending"]["image"])
  assert not bool(new.method_state["pending"]["audio"])
  assert float(metrics["scalars"]["relearning/reset/image"]) == 0.0
  assert float(metrics["scalars"]["relearning/reset/audio"]) == 1.0
  assert float(metrics["scalars"]["kappa/image"]) == 0.0
  assert s.step.compiled_patterns() == {0: 1}


def test_resumed_training_equals_uninterrupted(tmp_path):
  cfg = fx.tiny_config(**{"method": "relearning", "student.epochs": 4,
                          "student.checkpoint_every_steps": 3,
                          "relearning.reinit_every_epochs": 1})
  # Diagnoses at the starts of epochs 2 and 3 (global steps 8 and 12).
  # Stop after step 9 (the reset applied; resume from the epoch-1
  # checkpoint, so the diagnosis reruns from the checkpointed features),
  # then after step 12 (resume mid-epoch 2 from step 11: its reset done,
  # the features of epoch 2's last steps partly recorded; epoch 3's
  # diagnosis then runs on the resumed buffer).
  fx.assert_resume_exact(cfg, fx.tiny_dataset(), tmp_path, stops=(9, 4))
