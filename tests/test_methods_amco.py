"""AMCo: the ramp, the unit mask and its rescale, the shares and latching
flags against a NumPy transcription of BalanceBenchmark's AMCo trainer and
model, and training steps through the pipeline (the masked modality's
encoder, the epoch reset, the window, SMP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.methods import amco
from g2d_jax.models import MultimodalOutput
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")
LR = 0.05  # tiny_config's student learning rate

softmax = fx.softmax


# --- BalanceBenchmark, transcribed (AMCo_trainer.py @2603a98 train_loop and
# training_step; avclassify_model.py @05e0e81 AVClassifierModel.forward) ---

def released_ramp(eps, units, epoch, n_batches):
  """train_loop: (pt, N) of each batch of an epoch."""
  l_t, out = 0, []
  for _ in range(n_batches):
    pt = np.sin(np.pi / 2 * (min(eps, l_t) / eps))
    out.append((pt, int(pt * units)))
    l_t += epoch / 10
  return out


def released_masked(a, mask, pt):
  """forward: the dependent modality's features."""
  a = a * mask
  if abs(pt - 1) > 0.1:
    return a * 1 / (1 - pt)
  return a * 10


def released_flags(outs, sigma, flags, names):
  """training_step: the softmax shares and the if/elif flag update."""
  label_len, c = outs[0].shape
  sft = softmax(np.concatenate(outs, 1))
  shares = [np.sum(sft[:, i * c:(i + 1) * c]) / label_len
            for i in range(len(outs))]
  flags = dict(flags)
  for name, share in zip(names, shares):
    if share >= sigma:
      flags[name] = True
      break
  return shares, flags


def released_dependent(flags, names):
  """forward: `if audio ... elif visual ... elif text`."""
  for name in names:
    if flags[name]:
      return name
  return None


def ce(logits, y):
  return -np.mean(np.log(softmax(logits))[np.arange(len(y)), y])


# --- the rule, unit by unit ---

@pytest.mark.parametrize("eps", [0.3, 0.25, 1.0])
def test_ramp_matches_the_released_schedule(eps):
  for epoch in range(5):
    want = released_ramp(eps, 512, epoch, 12)
    for j, (pt, _) in enumerate(want):
      got = amco.amco_ramp(j, epoch, 0.1, eps)
      assert float(got) == pytest.approx(pt, rel=1e-6, abs=1e-7)
      for units in (8, 16, 512):
        n_want = int(pt * units)
        n_got = int(amco.amco_num_masked(got, units))
        if abs(pt * units - round(pt * units)) > 1e-4:
          assert n_got == n_want
        else:  # float32 against float64 on a whole number: one unit apart
          assert abs(n_got - n_want) <= 1
  # Epoch 0 never masks; epoch 1 (eps 0.3) saturates at its 4th batch.
  assert [n for _, n in released_ramp(0.3, 8, 0, 6)] == [0] * 6
  assert [n for _, n in released_ramp(0.3, 8, 1, 5)] == [0, 4, 6, 8, 8]
  assert [int(amco.amco_num_masked(amco.amco_ramp(j, 1, 0.1, 0.3), 8))
          for j in range(5)] == [0, 4, 6, 8, 8]


def test_unit_mask_has_exactly_n_zeros_at_uniform_positions():
  pt = jnp.float32(0.4)  # N = floor(0.4 * 8) = 3
  keys = jax.random.split(jax.random.key(0), 600)
  masks = np.asarray(jax.vmap(lambda k: amco.amco_unit_mask(k, pt, 8))(keys))
  assert set(np.unique(masks)) == {0.0, 1.0}
  assert (np.sum(masks == 0, axis=1) == 3).all()
  # Every unit is masked in about 3/8 of the draws (600 draws: +-0.08).
  np.testing.assert_allclose(np.mean(masks == 0, axis=0), 3 / 8, atol=0.08)
  assert len({m.tobytes() for m in masks[:10]}) > 1
  ones = amco.amco_unit_mask(keys[0], jnp.float32(0.0), 8)
  zeros = amco.amco_unit_mask(keys[0], jnp.float32(1.0), 8)
  np.testing.assert_array_equal(ones, np.ones(8))
  np.testing.assert_array_equal(zeros, np.zeros(8))


@pytest.mark.parametrize("pt", [0.0, 0.3, 0.5, 0.866, 0.95, 1.0])
def test_feature_scale_is_the_released_mask_and_rescale(pt):
  rng = np.random.default_rng(int(pt * 100))
  a = rng.normal(size=(5, 8)).astype(np.float32)
  v = rng.normal(size=(5, 16)).astype(np.float32)
  pt32 = jnp.float32(pt)
  key = jax.random.key(3)
  dep = {"audio": jnp.bool_(True), "image": jnp.bool_(False)}
  units = {"audio": 8, "image": 16}
  scale = amco.amco_feature_scale(key, pt32, dep, units, jnp.bool_(True))
  mask = np.asarray(amco.amco_unit_mask(jax.random.fold_in(key, 0), pt32, 8))
  np.testing.assert_allclose(a * np.asarray(scale["audio"]),
                             released_masked(a, mask, pt), rtol=1e-5)
  assert np.sum(mask == 0) == int(float(pt32) * 8)
  np.testing.assert_array_equal(scale["image"], np.ones(16))
  np.testing.assert_array_equal(v * np.asarray(scale["image"]), v)
  # Outside the window nothing is masked, flag or not.
  off = amco.amco_feature_scale(key, pt32, dep, units, jnp.bool_(False))
  for m in MODS:
    np.testing.assert_array_equal(off[m], np.ones(units[m]))


def test_rescale_edges():
  for pt, want in ((0.0, 1.0), (0.5, 2.0), (0.75, 4.0), (0.95, 10.0),
                   (1.0, 10.0)):
    assert float(amco.amco_rescale(jnp.float32(pt))) == pytest.approx(
        want, rel=1e-5)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shares_and_flags_match_the_released_rule(k, seed):
  rng = np.random.default_rng(seed)
  names = ("audio", "visual", "text")[:k]
  outs = [(rng.normal(size=(6, 4)) * (1 + 2 * i)).astype(np.float32)
          for i in range(k)]
  sigma = 0.5 if k == 2 else 0.4
  for start in ({m: False for m in names},
                {m: m == names[-1] for m in names}):
    shares, want = released_flags(outs, sigma, start, names)
    got_shares = amco.amco_shares(dict(zip(names, map(jnp.asarray, outs))),
                                  names)
    np.testing.assert_allclose([float(got_shares[m]) for m in names], shares,
                               rtol=1e-5)
    got = amco.amco_update_flags({m: jnp.int32(start[m]) for m in names},
                                 got_shares, sigma, names)
    assert {m: bool(got[m]) for m in names} == want
    dep = amco.amco_first(got, names)
    assert [m for m in names if bool(dep[m])] == (
        [released_dependent(want, names)]
        if released_dependent(want, names) else [])


def test_a_tie_flags_the_first_modality_and_flags_latch():
  same = jnp.zeros((4, 3))
  shares = amco.amco_shares({"audio": same, "image": same}, MODS)
  assert float(shares["audio"]) == pytest.approx(0.5)
  flags = amco.amco_update_flags({m: jnp.int32(0) for m in MODS}, shares,
                                 0.5, MODS)
  assert (int(flags["audio"]), int(flags["image"])) == (1, 0)
  # The image leads later: it is flagged too, but audio (first in order)
  # stays the masked one, as the model's `if audio ... elif visual`.
  lead = amco.amco_shares({"audio": same, "image": same.at[:, 0].set(5.0)},
                          MODS)
  flags = amco.amco_update_flags(flags, lead, 0.5, MODS)
  assert (int(flags["audio"]), int(flags["image"])) == (1, 1)
  dep = amco.amco_first(flags, MODS)
  assert (bool(dep["audio"]), bool(dep["image"])) == (True, False)
  # Nobody reaches sigma: nothing is flagged.
  none = amco.amco_update_flags({m: jnp.int32(0) for m in MODS}, shares,
                                0.6, MODS)
  assert (int(none["audio"]), int(none["image"])) == (0, 0)


def test_loss_adds_the_unimodal_terms_inside_the_window():
  rng = np.random.default_rng(0)
  out, a, v = (rng.normal(size=(8, 4)) for _ in range(3))
  y = rng.integers(0, 4, 8)
  outputs = MultimodalOutput(jnp.float32(out), {"audio": jnp.float32(a),
                                                "image": jnp.float32(v)}, {})
  value, parts = amco.amco_loss(outputs, y, jnp.bool_(True), MODS)
  assert float(value) == pytest.approx(ce(out, y) + ce(a, y) + ce(v, y),
                                       rel=1e-5)
  assert float(parts["unimodal/image"]) == pytest.approx(ce(v, y), rel=1e-5)
  off, _ = amco.amco_loss(outputs, y, jnp.bool_(False), MODS)
  assert float(off) == pytest.approx(ce(out, y), rel=1e-5)


@pytest.mark.parametrize("fusion", ["sum", "film", "gated", "cross_attention"])
def test_fusions_without_the_released_unimodal_logits_are_refused(fusion):
  cfg = fx.tiny_config(method="amco", **{"model.fusion": fusion})
  with pytest.raises(ConfigError, match="fusion= one of .'late', 'concat'."):
    amco.build(cfg, "classification", modalities=MODS)


@pytest.mark.parametrize("field,value", [("eps", 0.0), ("sigma", 1.5),
                                         ("ramp_rate", -0.1)])
def test_bad_values_are_refused(field, value):
  cfg = fx.tiny_config(method="amco", **{f"amco.{field}": value})
  with pytest.raises(ConfigError, match=f"config.amco.{field}"):
    amco.build(cfg, "classification", modalities=MODS)


def test_regression_is_refused():
  with pytest.raises(ConfigError, match="classification"):
    amco.build(fx.tiny_config(method="amco"), "regression", modalities=MODS)


# --- through the pipeline ---

def plain_sgd_config(**overrides):
  return fx.tiny_config(**{"method": "amco",
                           "student.optimizer.momentum": 0.0,
                           "student.optimizer.weight_decay": 0.0,
                           **overrides})


def reference_step(model):
  """Jitted (SGD update, per-modality logits) of CE(fused) + sum_m CE(l_m)
  on the forward pass with the features multiplied by `scale`."""
  def loss(p, batch_stats, inputs, y, scale):
    out, _ = steps.apply_model(model, p, batch_stats, inputs, train=True,
                               rng=jax.random.key(0), feature_scale=scale)
    nll = lambda l: -jnp.mean(jax.nn.log_softmax(l)[jnp.arange(len(y)), y])
    value = nll(out.logits) + sum(nll(out.modality_logits[m]) for m in MODS)
    return value, out.modality_logits

  def run(params, batch_stats, inputs, y, scale):
    grads, logits = jax.grad(loss, has_aux=True)(params, batch_stats, inputs,
                                                 y, scale)
    return jax.tree.map(lambda p, g: p - LR * g, params, grads), logits

  return jax.jit(run)


def test_training_steps_follow_the_ramp_and_mask_the_dependent_modality():
  """Epoch 1, batches 0..3 (eps 0.3: p_t = 0, 1/2, 0.87, 1), then epoch 2
  (outside the window): each step's mask and rescale are the release's for
  the flags the previous steps latched, the update is SGD on the masked
  loss, a fully masked encoder does not move, and a new epoch clears the
  flags."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(
      plain_sgd_config(**{"amco.window.end_epoch": 1}), ds, mesh)
  state, reference = s.state, reference_step(s.model)
  units = {"audio": 8, "image": 16}
  assert jax.tree.map(np.shape, state.method_state["scale"]) == {
      m: (d,) for m, d in units.items()}
  ramp = released_ramp(0.3, 1, 1, 4)
  batches = loader.train_batches(ds.splits["train"], 32, seed=0, epoch=1)
  flags = {m: False for m in MODS}  # fresh epoch
  for j, batch in enumerate(batches):
    pt = ramp[j][0]
    batch["gate"] = s.gate.for_batch(batch, 1)
    before = jax.device_get(state)
    state, metrics = s.step(state, mesh_lib.shard_batch(batch, mesh),
                            np.int32(1), jax.random.key(j))
    after = jax.device_get(state)
    metrics = {k: float(v) for k, v in metrics["scalars"].items()}
    scale = after.method_state["scale"]
    dep = released_dependent(flags, MODS)
    for m in MODS:
      got = np.asarray(scale[m])
      if m == dep:
        mask = (got != 0).astype(np.float64)
        assert np.sum(mask == 0) == int(pt * units[m])
        np.testing.assert_allclose(got, released_masked(np.ones(units[m]),
                                                        mask, pt), rtol=1e-5)
      else:
        np.testing.assert_array_equal(got, np.ones(units[m]))
      assert metrics[f"amco/dependent/{m}"] == float(m == dep)
    assert metrics["amco/pt"] == pytest.approx(pt, abs=1e-6)
    # The update: SGD on the masked loss; the flags, the release's update
    # from this step's (masked) per-modality logits.
    want, logits = reference(before.params, before.batch_stats,
                             batch["inputs"], batch["label"], scale)
    shares, flags = released_flags([np.asarray(logits[m]) for m in MODS],
                                   0.5, flags, MODS)
    assert {m: bool(after.method_state["flags"][m]) for m in MODS} == flags
    for m, share in zip(MODS, shares):
      assert metrics[f"amco/share/{m}"] == pytest.approx(share, rel=1e-5)
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    if j == 3:  # p_t = 1: every unit masked, no gradient reaches the encoder
      assert dep is not None
      for a, b in zip(jax.tree.leaves(after.params["encoders"][dep]
                                      ["backbone"]),
                      jax.tree.leaves(before.params["encoders"][dep]
                                      ["backbone"])):
        np.testing.assert_array_equal(a, b)
  assert int(after.method_state["batch"]) == 4
  # Epoch 2 starts afresh, and outside the window (epochs 0..1): no mask,
  # no unimodal loss, and its steps set no flag (inside they always would:
  # two shares add up to 1 >= 2 sigma).
  for j, batch in enumerate(loader.train_batches(ds.splits["train"], 32,
                                                 seed=0, epoch=2)):
    if j == 2:
      break
    batch["gate"] = s.gate.for_batch(batch, 2)
    state, metrics = s.step(state, mesh_lib.shard_batch(batch, mesh),
                            np.int32(2), jax.random.key(9 + j))
    new = jax.device_get(state.method_state)
    metrics = {k: float(v) for k, v in metrics["scalars"].items()}
    assert (int(new["epoch"]), int(new["batch"])) == (2, j + 1)
    assert metrics["amco/active"] == 0.0
    assert metrics["loss"] == pytest.approx(metrics["loss/student"],
                                            rel=1e-6)
    for m in MODS:
      np.testing.assert_array_equal(new["scale"][m], np.ones(units[m]))
      assert int(new["flags"][m]) == 0
      assert metrics[f"amco/dependent/{m}"] == 0.0
