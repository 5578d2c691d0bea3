"""CML: the loss against a NumPy transcription of BalanceBenchmark's
CML_trainer.py (2 and 3 modalities, concat), the reduced predictions of
late and sum fusion against the model with those features zeroed, the
hinge's edge cases, the per-epoch removal order, one training step against
the gradient of an independent transcription, the pass-based reductions
(gated fusion, zeroed inputs), the window, bad configs and SMP composing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import cml
from g2d_jax.methods.base import StepContext
from g2d_jax.pipeline import build as build_lib
from g2d_jax.pipeline import steps
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")
softmax = fx.softmax


def ce(logits, y):
  return -np.mean(np.log(softmax(logits))[np.arange(len(y)), y])


def released_loss(feats, weight, bias, label, random_dict, lam):
  """CML_trainer.py training_step (inside the window), transcribed for
  concat fusion: `feats` {m: [B, D_m]} in modality order, `weight` the
  torch-layout fc_out.weight [C, sum D], `random_dict` the epoch's shuffled
  modality list (popped from its end)."""
  names = list(feats)
  k = len(names)
  uni, start = {}, 0
  for m in names:
    d = feats[m].shape[1]
    uni[m] = feats[m] @ weight[:, start:start + d].T + bias / k
    start += d
  out_s = sum(uni[m] for m in names)
  random_dict = list(random_dict)
  loss_c = 0.0
  for i in range(k - 1):
    removed = random_dict.pop()
    out_p = out_s - uni[removed] + bias / k
    conf_s = softmax(out_s).max(axis=1)
    conf_p = softmax(out_p).max(axis=1)
    if i == 0:
      loss = ce(out_s, label)
    loss += ce(out_p, label)
    loss_c += max(0, (conf_p - conf_s).sum())  # conf_loss
    out_s = out_p
  return loss / k + lam * loss_c


def concat_params(weight, bias):
  return {"fusion": {"fc_out": {"kernel": jnp.float32(weight.T),
                                "bias": jnp.float32(bias)}}}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("widths", [(6, 4), (5, 3, 7)])
def test_loss_matches_the_released_code(seed, widths):
  rng = np.random.default_rng(seed)
  names = ("audio", "image", "text")[:len(widths)]
  feats = {m: rng.normal(size=(8, d)) * 2 for m, d in zip(names, widths)}
  weight = rng.normal(size=(5, sum(widths)))
  bias = rng.normal(size=5)
  label = rng.integers(0, 5, 8)
  random_dict = list(rng.permutation(names))
  want = released_loss(feats, weight, bias, label, random_dict, 0.7)
  features = {m: jnp.float32(f) for m, f in feats.items()}
  fused = (jnp.float32(np.concatenate(list(feats.values()), 1))
           @ jnp.float32(weight.T) + jnp.float32(bias))
  # The release pops from the end: its removal order is the reverse.
  order = jnp.asarray([names.index(m) for m in reversed(random_dict)])
  contrib = cml.feature_contributions(concat_params(weight, bias), features,
                                      "concat", names)
  chain = [fused, *cml.reduction_logits(fused, contrib, order, names)]
  value, parts = cml.cml_objective(chain, label, 0.7)
  assert float(value) == pytest.approx(want, rel=1e-5)
  assert float(parts["penalty"]) >= 0.0


def test_sample_hinge_is_the_authors_per_sample_relu():
  """miwae/train.py's rank loss without its sign masks (epsilon 0)."""
  rng = np.random.default_rng(5)
  more, fewer = rng.uniform(size=16), rng.uniform(size=16)
  want = np.maximum(fewer - more, 0.0).sum()
  got = cml.confidence_hinge(jnp.float32(more), jnp.float32(fewer), "sample")
  assert float(got) == pytest.approx(want, rel=1e-5)
  batch = cml.confidence_hinge(jnp.float32(more), jnp.float32(fewer))
  assert float(batch) == pytest.approx(max(0.0, (fewer - more).sum()),
                                       rel=1e-5, abs=1e-6)


def test_batch_hinge_lets_rises_and_falls_cancel_and_ties_have_no_grad():
  more = jnp.float32([0.5, 0.5])
  fewer = jnp.float32([0.9, 0.1])  # one rise of 0.4, one fall of 0.4
  assert float(cml.confidence_hinge(more, fewer, "batch")) == 0.0
  assert float(cml.confidence_hinge(more, fewer, "sample")) == (
      pytest.approx(0.4))
  for hinge in cml.HINGES:
    # At exactly 0 (Python's max(0, t) returns the int 0): gradient 0.
    g = jax.grad(lambda f, h=hinge: cml.confidence_hinge(more, f, h))(more)
    np.testing.assert_array_equal(g, np.zeros(2))
  g = jax.grad(lambda f: cml.confidence_hinge(more, f, "batch"))(
      jnp.float32([0.9, 0.2]))
  np.testing.assert_array_equal(g, np.ones(2))


def test_equal_predictions_have_no_penalty_and_lam_zero_is_mean_ce():
  rng = np.random.default_rng(6)
  z = jnp.float32(rng.normal(size=(8, 4)))
  y = rng.integers(0, 4, 8)
  value, parts = cml.cml_objective([z, z, z], y, 5.0)
  assert float(parts["penalty"]) == 0.0
  assert float(value) == pytest.approx(ce(np.asarray(z), y), rel=1e-5)
  z1 = jnp.float32(rng.normal(size=(8, 4)) * 3)
  value, parts = cml.cml_objective([z, z1], y, 0.0)
  assert float(value) == pytest.approx(
      (ce(np.asarray(z), y) + ce(np.asarray(z1), y)) / 2, rel=1e-5)
  assert float(parts["penalty"]) > 0.0  # sharper logits, confidence rose


def test_removal_order_is_a_permutation_per_epoch():
  orders = [np.asarray(cml.removal_order(999, jnp.int32(e), 3))
            for e in range(30)]
  for o in orders:
    assert sorted(o.tolist()) == [0, 1, 2]
  np.testing.assert_array_equal(cml.removal_order(999, jnp.int32(4), 3),
                                orders[4])
  assert len({tuple(o) for o in orders}) > 1
  assert {int(o[0]) for o in orders} == {0, 1, 2}
  masks = cml.removed_masks(jnp.asarray([2, 0, 1]), 3)
  np.testing.assert_array_equal(masks[0], [0.0, 0.0, 1.0])
  np.testing.assert_array_equal(masks[1], [1.0, 0.0, 1.0])


def tiny_model(fusion, bias_shift=0.0):
  """(model, params, batch_stats, batch) of a tiny student; `bias_shift`
  is added to every bias (at init they are 0, so a zeroed input gives
  zero features)."""
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(method="cml", **{"model.fusion": fusion})
  model = build_lib.student_model(cfg, ds)
  params, bs = steps.init_variables(
      model, build_lib.example_inputs(ds.splits["train"], 2), 0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + bias_shift if "bias" in str(path[-1]) else x,
      params)
  return model, params, bs, fx.first_batch(ds, 16)


@pytest.mark.parametrize("fusion", ["late", "sum", "concat"])
def test_closed_form_is_the_model_with_the_features_zeroed(fusion):
  model, params, bs, batch = tiny_model(fusion, bias_shift=0.2)
  x = batch["inputs"]
  out, _ = steps.apply_model(model, params, bs, x, train=True)
  contrib = cml.feature_contributions(params, out.features, fusion, MODS)
  for first in (0, 1):
    (z1,) = cml.reduction_logits(out.logits, contrib,
                                 jnp.asarray([first, 1 - first]), MODS)
    scale = {m: jnp.full(out.features[m].shape[-1:], float(i != first))
             for i, m in enumerate(MODS)}
    want, _ = steps.apply_model(model, params, bs, x, train=True,
                                feature_scale=scale)
    np.testing.assert_allclose(z1, want.logits, rtol=1e-5, atol=1e-5)


def eager_update(method, model, params, bs, batch, epochs=(0,), lr=0.1):
  """One `method.update` on a hand-made context (plain SGD), jitted
  once: (loss, metrics, new params) at each of `epochs`."""

  def run(p, epoch):
    def forward(q, inputs=None, *, train=True, feature_scale=None):
      return steps.apply_model(model, q, bs,
                               batch["inputs"] if inputs is None else inputs,
                               train=train, feature_scale=feature_scale)

    def sgd(grads, q, opt_state, mask):
      del mask
      return jax.tree.map(lambda a, g: a - lr * g, q, grads), opt_state

    ctx = StepContext(batch=batch, epoch=epoch, step=jnp.int32(0),
                      rng=jax.random.key(0), params=p, opt_state=(),
                      batch_stats=bs, method_state=None, forward=forward,
                      optimizer_update=sgd)
    result = method.update(ctx)
    return result.loss, result.metrics, result.params

  jitted = jax.jit(run)
  return [jitted(params, jnp.int32(e)) for e in epochs]


@pytest.mark.parametrize("fusion,reduction", [("gated", "features"),
                                              ("concat", "inputs")])
def test_pass_based_reductions(fusion, reduction):
  """Gated fusion: a pass with the removed features zeroed; "inputs": a
  pass with the removed modality's input zeroed (the release's
  commented-out padded pass). Loss and SGD step against a transcription."""
  model, params, bs, batch = tiny_model(fusion, bias_shift=0.3)
  cfg = fx.tiny_config(**{"method": "cml", "model.fusion": fusion,
                          "cml.reduction": reduction, "cml.lam": 2.0,
                          "cml.hinge": "sample"})
  method = cml.build(cfg, "classification", modalities=MODS)
  gone = MODS[int(cml.removal_order(cfg.seed, jnp.int32(0), 2)[0])]
  y = batch["label"]

  def transcribed(p):
    full, _ = steps.apply_model(model, p, bs, batch["inputs"], train=True)
    if reduction == "inputs":
      x = dict(batch["inputs"], **{gone: np.zeros_like(
          batch["inputs"][gone])})
      fewer, _ = steps.apply_model(model, p, bs, x, train=True)
    else:
      scale = {m: jnp.full(full.features[m].shape[-1:], float(m != gone))
               for m in MODS}
      fewer, _ = steps.apply_model(model, p, bs, batch["inputs"],
                                   train=True, feature_scale=scale)
    q0 = jnp.max(jax.nn.softmax(full.logits), -1)
    q1 = jnp.max(jax.nn.softmax(fewer.logits), -1)
    return ((losses.cross_entropy(full.logits, y)
             + losses.cross_entropy(fewer.logits, y)) / 2
            + 2.0 * jnp.sum(jnp.maximum(q1 - q0, 0.0)))

  want, grads = jax.jit(jax.value_and_grad(transcribed))(params)
  ((loss, metrics, new),) = eager_update(method, model, params, bs, batch)
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  assert float(metrics["cml/penalty"]) > 0.0
  for a, p0, g in zip(jax.tree.leaves(new), jax.tree.leaves(params),
                      jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, p0 - 0.1 * g, rtol=1e-4, atol=1e-6)


def plain_sgd(**overrides):
  return fx.tiny_config(**{"method": "cml",
                           "student.optimizer.momentum": 0.0,
                           "student.optimizer.weight_decay": 0.0},
                        **overrides)


def test_training_step_descends_the_released_loss():
  """Concat fusion (the release's): SGD step = p - lr * grad of the
  transcribed loss, with the weights read in the release's layout."""
  ds = fx.tiny_dataset()
  cfg = plain_sgd(**{"model.fusion": "concat", "cml.lam": 3.0,
                     "cml.hinge": "sample"})
  model, params0, bs0, batch, new, metrics = fx.one_step(cfg, ds, 0)
  first = int(cml.removal_order(cfg.seed, jnp.int32(0), 2)[0])
  gone = MODS[first]
  assert metrics[f"cml/removed_first/{gone}"] == 1.0
  assert metrics[f"cml/removed_first/{MODS[1 - first]}"] == 0.0

  def transcribed(p):
    out, _ = steps.apply_model(model, p, bs0, batch["inputs"], train=True,
                               rng=jax.random.key(0))
    weight = p["fusion"]["fc_out"]["kernel"].T  # torch layout [C, sum D]
    bias = p["fusion"]["fc_out"]["bias"]
    na = out.features["audio"].shape[1]
    uni = {"audio": out.features["audio"] @ weight[:, :na].T + bias / 2,
           "image": out.features["image"] @ weight[:, na:].T + bias / 2}
    out_s = out.logits
    out_p = out_s - uni[gone] + bias / 2
    conf_s = jnp.max(jax.nn.softmax(out_s), 1)
    conf_p = jnp.max(jax.nn.softmax(out_p), 1)
    y = batch["label"]
    return ((losses.cross_entropy(out_s, y) + losses.cross_entropy(out_p, y))
            / 2 + 3.0 * jnp.sum(jax.nn.relu(conf_p - conf_s)))

  value, grads = jax.jit(jax.value_and_grad(transcribed))(params0)
  assert metrics["loss"] == pytest.approx(float(value), rel=1e-5)
  assert metrics["cml/active"] == 1.0
  assert metrics["cml/penalty"] > 0.0
  fx.assert_sgd_step(params0, grads, new, 0.05)


def test_outside_the_window_the_loss_is_the_fused_cross_entropy():
  model, params, bs, batch = tiny_model("concat", bias_shift=0.3)
  cfg = fx.tiny_config(**{"method": "cml", "model.fusion": "concat",
                          "cml.window.start_epoch": 1, "cml.lam": 3.0,
                          "cml.hinge": "sample"})
  method = cml.build(cfg, "classification", modalities=MODS)
  out, _ = steps.apply_model(model, params, bs, batch["inputs"], train=True)
  (loss, metrics, _), (inside, _, _) = eager_update(
      method, model, params, bs, batch, epochs=(0, 1))
  assert float(metrics["cml/active"]) == 0.0
  plain = ce(np.asarray(out.logits), batch["label"])
  assert float(loss) == pytest.approx(plain, rel=1e-5)
  assert float(metrics["cml/penalty"]) > 0.0  # still measured
  assert float(inside) > plain + 1e-3


def test_bad_configs_are_refused():
  with pytest.raises(ConfigError, match="classification only"):
    cml.build(fx.tiny_config(method="cml"), "regression")
  for field, value, match in [("cml.hinge", "mean", "hinge"),
                              ("cml.reduction", "heads", "reduction"),
                              ("cml.lam", -1.0, "lam")]:
    with pytest.raises(ConfigError, match=match):
      cml.build(fx.tiny_config(**{"method": "cml", field: value}),
                "classification", modalities=MODS)
  with pytest.raises(ConfigError, match="fusions"):
    cml.feature_contributions({}, {}, "film", MODS)
