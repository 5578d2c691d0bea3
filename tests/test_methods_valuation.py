"""Sample-level modality valuation: the per-sample Shapley contributions,
the re-sampling bands and the loss against NumPy transcriptions of the
released code (the authors' and BalanceBenchmark's), and real training steps
(inside and outside the window, feature and input removal, three
modalities, SMP)."""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from g2d_jax.data import base
from g2d_jax.errors import ConfigError
from g2d_jax.methods import agm
from g2d_jax.methods import valuation
from g2d_jax.pipeline import steps
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")
PAIR = ("audio", "image")


softmax = fx.softmax


# --- The releases, transcribed. ---------------------------------------------

def released_contributions(correct_all, correct_a, correct_v):
  """code/sample_level.py `execute_modulation`, one sample."""
  value_all = 0.0
  value_a = 0.0
  value_v = 0.0
  if correct_all:
    value_all = 2.0
  if correct_v:
    value_v = 1.0
  if correct_a:
    value_a = 1.0
  contrib_a = (value_a + value_all - value_v) / 2.0
  contrib_v = (value_v + value_all - value_a) / 2.0
  return contrib_a, contrib_v


def released_copies(contrib):
  """code/datasets/dataloader.py `AV_KS_Dataset_sample_level`: the copies
  one modality's contribution adds."""
  if 0.4 < contrib < 0.9:
    return 1
  elif -0.1 < contrib < 0.4:
    return 2
  elif contrib < -0.1:
    return 3
  return 0


def benchmark_copies(shapley_value):
  """BalanceBenchmark `create_dataset_sample_level`."""
  if 0.4 < shapley_value < 1:
    return 1
  elif -0.1 < shapley_value < 0.4:
    return 2
  elif shapley_value < -0.1:
    return 3
  return 0


def benchmark_shapley(res_cache, modalitys, i):
  """BalanceBenchmark `Calculate_Shapley_Sample`, sample i: res_cache maps
  sorted coalitions to [B] bools (the empty one is all False)."""
  n = len(modalitys)
  out = {}
  for modality in modalitys:
    shapley_value = 0.0
    temp = [m for m in modalitys if m != modality]
    combos = [list(c) for r in range(len(temp) + 1)
              for c in itertools.combinations(temp, r)]
    for combo in combos:
      s_size = len(combo)
      v_combo = res_cache[tuple(sorted(combo))][i]
      v_add = res_cache[tuple(sorted(combo + [modality]))][i]
      weight = (math.factorial(s_size) * math.factorial(n - s_size - 1)
                / math.factorial(n))
      shapley_value += weight * (float(v_add) - float(v_combo))
    out[modality] = shapley_value
  return out


def resampled_epoch_loss(full, kept, copies, y):
  """The release's re-sampled items of one batch (the originals, plus c
  copies of sample i with only m kept), each item's CE at weight 1/B (its
  share of one epoch's SGD updates)."""
  items = []
  for i in range(len(y)):
    items.append((full[i], y[i]))
    for m in kept:
      items.extend([(kept[m][i], y[i])] * int(copies[m][i]))
  return sum(-np.log(softmax(z)[label]) for z, label in items) / len(y)


# --- The rule's pieces. ---------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contributions_match_the_authors_code(seed):
  rng = np.random.default_rng(seed)
  correct = {t: rng.random(32) < 0.5 for t in agm.coalitions(PAIR)}
  phi = valuation.shapley_contributions(
      valuation.coalition_values({t: jnp.asarray(c) for t, c in
                                  correct.items()}, "cardinality"), PAIR)
  for i in range(32):
    want_a, want_v = released_contributions(
        correct[PAIR][i], correct[("audio",)][i], correct[("image",)][i])
    assert float(phi["audio"][i]) == want_a
    assert float(phi["image"][i]) == want_v
  got = set(np.concatenate([np.asarray(phi[m]) for m in PAIR]).tolist())
  assert got <= {-0.5, 0.0, 0.5, 1.0, 1.5} and len(got) >= 3


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_contributions_match_balancebenchmark(k, seed):
  order = ("audio", "visual", "text")[:k]
  rng = np.random.default_rng(seed)
  correct = {t: rng.random(16) < 0.6 for t in agm.coalitions(order)}
  phi = valuation.shapley_contributions(
      valuation.coalition_values({t: jnp.asarray(c) for t, c in
                                  correct.items()}, "correct"), order)
  cache = {tuple(sorted(t)): c for t, c in correct.items()}
  cache[()] = np.zeros(16, bool)
  for i in range(16):
    want = benchmark_shapley(cache, list(order), i)
    for m in order:
      assert float(phi[m][i]) == pytest.approx(want[m], abs=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_contributions_add_up_to_the_full_value(k):
  """Efficiency: sum_m phi_m = v(M), so k when the fused prediction is
  right under "cardinality" (a fair share of 1 each) and 1 under
  "correct"."""
  order = tuple(f"m{i}" for i in range(k))
  rng = np.random.default_rng(k)
  correct = {t: jnp.asarray(rng.random(20) < 0.5)
             for t in agm.coalitions(order)}
  for value, scale in (("cardinality", k), ("correct", 1)):
    phi = valuation.shapley_contributions(
        valuation.coalition_values(correct, value), order)
    np.testing.assert_allclose(sum(np.asarray(p) for p in phi.values()),
                               scale * np.asarray(correct[order], float),
                               atol=1e-5)
  everyone = {t: jnp.ones(3, bool) for t in agm.coalitions(order)}
  phi = valuation.shapley_contributions(
      valuation.coalition_values(everyone), order)
  for m in order:
    np.testing.assert_allclose(phi[m], 1.0, atol=1e-6)


def test_copies_match_both_releases_including_the_borders():
  phis = np.array([-0.5, -0.05, 0.0, 0.45, 0.5, 0.95, 1.0, 1.5, -3.0]
                  + list(np.random.default_rng(0).uniform(-1, 2, 40)),
                  np.float32)
  got = valuation.resample_copies(jnp.asarray(phis))
  assert [float(c) for c in got] == [released_copies(float(p)) for p in phis]
  bb = valuation.resample_copies(jnp.asarray(phis), (1.0, 0.4, -0.1))
  assert [float(c) for c in bb] == [benchmark_copies(float(p)) for p in phis]
  # BalanceBenchmark's upper border 1: phi = 0.95 gets a copy there only.
  assert float(bb[5]) == 1.0 and float(got[5]) == 0.0
  # The borders themselves get no copy (the releases' strict inequalities).
  assert [float(c) for c in valuation.resample_copies(
      jnp.float32([0.9, 0.4, -0.1]))] == [0.0, 0.0, 0.0]
  assert [released_copies(b) for b in (0.9, 0.4, -0.1)] == [0, 0, 0]


def test_bands_are_checked():
  with pytest.raises(ConfigError, match="decrease"):
    valuation.check_bands((0.4, 0.9), (1, 2))
  with pytest.raises(ConfigError, match="same length"):
    valuation.check_bands((0.9, 0.4), (1, 2, 3))
  with pytest.raises(ConfigError, match="whole numbers"):
    valuation.check_bands((0.9, 0.4), (1, -2))
  with pytest.raises(ConfigError, match="whole numbers"):
    valuation.check_bands((0.9,), (0.5,))
  with pytest.raises(ConfigError, match="one of"):
    valuation.coalition_values({}, "accuracy")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_is_the_resampled_items_at_weight_one_over_b(seed):
  rng = np.random.default_rng(seed)
  b, c = 8, 5
  full = rng.normal(size=(b, c))
  kept = {m: rng.normal(size=(b, c)) for m in PAIR}
  copies = {m: rng.integers(0, 4, b).astype(np.float32) for m in PAIR}
  y = rng.integers(0, c, b)
  total, ce_full, extra = valuation.valuation_loss(
      jnp.float32(full), {m: jnp.float32(v) for m, v in kept.items()},
      {m: jnp.asarray(v) for m, v in copies.items()}, jnp.asarray(y))
  assert float(total) == pytest.approx(
      resampled_epoch_loss(full, kept, copies, y), rel=1e-5)
  want_full = -np.mean(np.log(softmax(full))[np.arange(b), y])
  assert float(ce_full) == pytest.approx(want_full, rel=1e-5)
  assert float(total) == pytest.approx(float(ce_full) + float(extra),
                                       rel=1e-6)
  # No copies (every modality contributes its share): the fused CE alone.
  none = {m: jnp.zeros(b) for m in PAIR}
  alone, _, zero = valuation.valuation_loss(
      jnp.float32(full), {m: jnp.float32(v) for m, v in kept.items()}, none,
      jnp.asarray(y))
  assert float(zero) == 0.0
  assert float(alone) == pytest.approx(want_full, rel=1e-6)


def test_the_copies_carry_no_gradient_of_their_own():
  x = jnp.float32(np.random.default_rng(0).normal(size=(4, 3)))
  y = jnp.asarray([0, 1, 2, 0])
  g = jax.grad(lambda w: valuation.valuation_loss(
      x, {"audio": x}, {"audio": w}, y)[0])(jnp.ones(4))
  np.testing.assert_array_equal(g, np.zeros(4))


def test_bad_configs_are_refused():
  def build(task="classification", modalities=MODS, **overrides):
    return valuation.build(fx.tiny_config(method="valuation", **overrides),
                           task, modalities=modalities)
  with pytest.raises(ConfigError, match="classification"):
    build("regression")
  with pytest.raises(ConfigError, match="value"):
    build(**{"valuation.value": "accuracy"})
  with pytest.raises(ConfigError, match="drop"):
    build(**{"valuation.drop": "noise"})
  with pytest.raises(ConfigError, match="decrease"):
    build(**{"valuation.thresholds": (0.4, 0.9, -0.1)})
  with pytest.raises(ConfigError, match="at least two"):
    build(modalities=("audio",))
  with pytest.raises(ConfigError, match="max_modalities=5"):
    build(modalities=tuple(f"v{i}" for i in range(5)))
  assert build(modalities=tuple(f"v{i}" for i in range(5)),
               **{"valuation.max_modalities": 5}).name == "valuation"


# --- Real training steps. -------------------------------------------------

def late_logits(modality_logits, biases, keep, order):
  """Late fusion with the modalities outside `keep` removed (features
  zeroed): their heads give their bias alone; the mean over all k."""
  return sum(modality_logits[m] if m in keep else biases[m]
             for m in order) / len(order)


def sgd_config(drop="features", start=0.0):
  return fx.tiny_config(**{"method": "valuation", "valuation.drop": drop,
                           "valuation.window.start": start,
                           "student.optimizer.momentum": 0.0,
                           "student.optimizer.weight_decay": 0.0})


@pytest.mark.parametrize("drop", ["features", "inputs"])
def test_training_step_matches_the_release_computed_independently(drop):
  """The first step, inside the window: copies from the authors' formulas
  on the inference-mode predictions with each modality removed, then one
  plain SGD step on the fused CE plus the weighted kept-modality CEs; the
  full pass's BatchNorm statistics are kept."""
  ds = fx.tiny_dataset()
  model, p0, bs0, batch, p1, sc = fx.one_step(sgd_config(drop), ds, 0)
  x = {m: jnp.asarray(v) for m, v in batch["inputs"].items()}
  y = np.asarray(batch["label"])

  def zeroed(keep):
    return {m: v if m in keep else jnp.zeros_like(v) for m, v in x.items()}

  def predictions(p, keep, train):
    """f({keep}): feature removal from the late-fusion formula, input
    removal by running the model on zeros."""
    out, _ = steps.apply_model(model, p, bs0, x if drop == "features"
                               else zeroed(keep), train=train,
                               rng=jax.random.key(0))
    if drop == "inputs" or len(keep) == len(MODS):
      return out.logits
    biases = {m: p["encoders"][m]["head"]["bias"] for m in MODS}
    return late_logits(out.modality_logits, biases, keep, MODS)

  right = {t: np.argmax(np.asarray(predictions(p0, t, False)), -1) == y
           for t in [PAIR, ("audio",), ("image",)]}
  contrib = np.array([released_contributions(
      right[PAIR][i], right[("audio",)][i], right[("image",)][i])
      for i in range(len(y))])
  copies = {m: np.array([released_copies(c) for c in contrib[:, j]],
                        np.float32) for j, m in enumerate(MODS)}
  assert sum(c.sum() for c in copies.values()) > 0  # a real re-sampling

  def loss(p):
    ce = lambda z: -jnp.take_along_axis(jax.nn.log_softmax(z), jnp.asarray(
        y)[:, None], -1)[:, 0]
    total = ce(predictions(p, PAIR, True))
    for m in MODS:
      total = total + copies[m] * ce(predictions(p, (m,), True))
    return jnp.mean(total)

  value, grads = jax.jit(jax.value_and_grad(loss))(p0)
  assert sc["loss"] == pytest.approx(float(value), rel=1e-5)
  for j, m in enumerate(MODS):
    assert sc[f"valuation/phi/{m}"] == pytest.approx(contrib[:, j].mean())
    assert sc[f"valuation/copies/{m}"] == pytest.approx(copies[m].mean())
  assert sc["valuation/active"] == 1.0
  for (path, a), g, b in zip(jax.tree_util.tree_flatten_with_path(p0)[0],
                             jax.tree.leaves(jax.device_get(grads)),
                             jax.tree.leaves(p1)):
    np.testing.assert_allclose(b, a - 0.05 * np.asarray(g), rtol=1e-4,
                               atol=1e-6, err_msg=str(path))


def test_outside_the_window_the_step_is_joint_training():
  """Epoch 0 before the window (it starts at epoch 2 of 3): no copies, and
  the same update as the joint method's."""
  ds = fx.tiny_dataset()
  _, p0, _, _, p1, sc = fx.one_step(sgd_config(start=0.5), ds, 0)
  _, q0, _, _, q1, joint = fx.one_step(fx.tiny_config(**{
      "method": "joint", "student.optimizer.momentum": 0.0,
      "student.optimizer.weight_decay": 0.0}), ds, 0)
  assert sc["valuation/active"] == 0.0
  assert sc["valuation/copies/audio"] == sc["valuation/copies/image"] == 0.0
  assert sc["valuation/extra"] == 0.0
  assert sc["loss"] == pytest.approx(joint["loss"], rel=1e-6)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(q0)):
    np.testing.assert_array_equal(a, b)
  moved = False
  for a, b, a0 in zip(jax.tree.leaves(p1), jax.tree.leaves(q1),
                      jax.tree.leaves(p0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved |= not np.array_equal(a, a0)
  assert moved


def three_modality_dataset(n=96):
  rng = np.random.default_rng(3)
  splits = {}
  for s in ("train", "val", "test"):
    y = rng.integers(0, 4, n).astype(np.int32)
    inputs = {m: (rng.normal(size=(n, 5)) + w * y[:, None]).astype(
        np.float32) for m, w in (("a", 0.6), ("b", 0.3), ("c", 0.1))}
    splits[s] = base.Split(inputs=inputs, labels=y,
                           scales={m: 1.0 for m in inputs})
  return base.MultimodalDataset(
      "tiny_three_views", ("a", "b", "c"), splits, 4, "classification",
      base.make_fingerprint("tiny_three_views", {"seed": 3}, splits,
                            "classification"))


def test_three_modalities_value_with_the_general_shapley_weights():
  ds = three_modality_dataset()
  order = ("a", "b", "c")
  mlp = dict(kind="mlp", hidden_dims=(8,))
  cfg = fx.tiny_config(**{
      "method": "valuation", "valuation.window.start": 0.0,
      "model.encoders": ml_collections.ConfigDict({m: dict(mlp)
                                                   for m in order})})
  model, p0, bs0, batch, _, sc = fx.one_step(cfg, ds, 0)
  x = {m: jnp.asarray(v) for m, v in batch["inputs"].items()}
  y = np.asarray(batch["label"])
  biases = {m: np.asarray(p0["encoders"][m]["head"]["bias"]) for m in order}
  out, _ = steps.apply_model(model, p0, bs0, x, train=False)
  ml = {m: np.asarray(v) for m, v in out.modality_logits.items()}
  cache = {(): np.zeros(len(y), bool)}
  for r in (1, 2, 3):
    for t in itertools.combinations(order, r):
      cache[t] = np.argmax(late_logits(ml, biases, t, order), -1) == y
  # The authors' value |S| 1[correct] in BalanceBenchmark's k-modality sum.
  sized = {t: len(t) * c.astype(float) for t, c in cache.items()}
  phi = np.array([[benchmark_shapley(sized, list(order), i)[m]
                   for m in order] for i in range(len(y))])
  copies = np.vectorize(released_copies)(phi)
  for j, m in enumerate(order):
    assert sc[f"valuation/phi/{m}"] == pytest.approx(phi[:, j].mean(),
                                                     abs=1e-6)
    assert sc[f"valuation/copies/{m}"] == pytest.approx(copies[:, j].mean())
  train_out, _ = steps.apply_model(model, p0, bs0, x, train=True)
  tml = {m: np.asarray(v, np.float64) for m, v in
         train_out.modality_logits.items()}
  ce = lambda z: -np.log(softmax(z))[np.arange(len(y)), y]
  want = ce(np.asarray(train_out.logits, np.float64))
  for j, m in enumerate(order):
    want = want + copies[:, j] * ce(late_logits(tml, biases, (m,), order))
  assert sc["loss"] == pytest.approx(want.mean(), rel=1e-5)
