"""Gradient Blending: the OGR weights against a transcription of the
released `super_epoch_origin`, the probe hook (student untouched, rounds
only every period, deterministic, the padded probe's inputs), the blended
loss, and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import StepContext
from g2d_jax.methods import gblending
from g2d_jax.models.multimodal import MultimodalOutput
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

MODS = ("audio", "image")


def released_weights(pre_train, now_train, pre_val, now_val):
  """BalanceBenchmark GBlendingTrainer.super_epoch_origin, transcribed."""
  weights = {}
  for p in range(len(pre_train)):
    g = now_val[p] - pre_val[p]
    o_pre = pre_val[p] - pre_train[p]
    o_now = now_val[p] - now_train[p]
    o = o_now - o_pre
    weights[p] = abs(g) / (o ** 2)
  sums = sum(weights.values())
  return np.array([weights[p] / sums for p in range(len(pre_train))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_match_the_released_rule(seed):
  rng = np.random.default_rng(seed)
  train = rng.uniform(5, 20, (4, 3)).astype(np.float32)   # 4 probe epochs
  val = rng.uniform(5, 20, (2, 3)).astype(np.float32)
  got = np.asarray(gblending.ogr_weights(train, val))
  want = released_weights(train[0], train[-1], val[0], val[-1])
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert got.sum() == pytest.approx(1.0, abs=1e-6)


def test_no_generalisation_change_gives_equal_weights_and_zero_o_dominates():
  train = np.float32([[10, 10], [8, 6]])
  flat = np.float32([[12, 12], [12, 12]])             # G = 0 for both
  np.testing.assert_allclose(gblending.ogr_weights(train, flat), [0.5, 0.5])
  # Probe 0: G = -2 with O = (10 - 8) - (12 - 10) = 0 -> all the weight.
  val = np.float32([[12, 12], [10, 11]])
  w = np.asarray(gblending.ogr_weights(train, val))
  assert w[0] == pytest.approx(1.0) and 0 < w[1] < 1e-12  # (1/9) / 2e12


def test_padding_zeroes_every_other_modality():
  x = {"audio": jnp.ones((2, 3)), "image": jnp.full((2, 4), 2.0)}
  out = gblending.pad_inputs(x, "image")
  assert float(jnp.sum(out["audio"])) == 0.0
  np.testing.assert_array_equal(out["image"], x["image"])


def test_period_is_a_fraction_of_the_run_at_least_two_epochs():
  cfg = fx.tiny_config(method="gblending", **{"student.epochs": 70})
  assert gblending.probe_epochs(cfg) == 10          # the release's 10 of 70
  cfg.student.epochs = 8
  assert gblending.probe_epochs(cfg) == 2           # round(8 / 7) = 1 -> 2
  cfg.gblending.period = 0.0
  with pytest.raises(ConfigError, match="period"):
    gblending.probe_epochs(cfg)


def test_blended_loss_is_the_weighted_sum():
  rng = np.random.default_rng(0)
  logits = {m: jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
            for m in MODS}
  fused = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 6))

  out = MultimodalOutput(logits=fused, modality_logits=logits, features={})
  w = jnp.float32([0.2, 0.3, 0.5])
  ctx = StepContext.of_batch({"label": labels},
                             method_state={"weights": w})
  cfg = fx.tiny_config(method="gblending")
  value, metrics = gblending.make_loss(cfg.gblending, MODS)(out, ctx)
  ce = lambda l: float(losses.cross_entropy(l, labels))
  want = 0.2 * ce(logits["audio"]) + 0.3 * ce(logits["image"]) + 0.5 * ce(
      fused)
  assert float(value) == pytest.approx(want, rel=1e-6)
  assert float(metrics["gblending/weight/fused"]) == pytest.approx(0.5)


def hook_for(cfg, ds, mesh):
  s = student_lib.build_student(cfg, ds, mesh)
  hook = student_lib.make_epoch_hook(
      s, ds.splits["train"], 32, cfg.seed, mesh, val=ds.splits["val"],
      probe_tx=student_lib.probe_optimizer(cfg, s.steps_per_epoch))
  return s, hook


def test_probe_rounds_leave_the_student_alone_and_are_deterministic():
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="gblending", **{"student.epochs": 4,
                                              "gblending.period": 0.5})
  s, hook = hook_for(cfg, ds, mesh)
  with pytest.raises(ValueError, match="probe"):
    student_lib.make_epoch_hook(s, ds.splits["train"], 32, cfg.seed, mesh)
  before = jax.device_get(s.state.params)
  first = hook(s.state, 0)
  again = hook(s.state, 0)
  for a, b in zip(jax.tree.leaves(before),
                  jax.tree.leaves(jax.device_get(first.params))):
    np.testing.assert_array_equal(a, b)
  w = np.asarray(first.method_state["weights"])
  np.testing.assert_array_equal(w, np.asarray(again.method_state["weights"]))
  assert w.shape == (3,) and w.sum() == pytest.approx(1.0, abs=1e-6)
  assert np.all(w >= 0) and not np.allclose(w, 1 / 3)
  # The weights are the rule applied to the recorded losses: two validation
  # batches of 32 of 4 classes, so sums near 2 ln 4 = 2.77 early on.
  np.testing.assert_allclose(w, gblending.ogr_weights(
      first.method_state["train"], first.method_state["val"]), rtol=1e-6)
  val = np.asarray(first.method_state["val"])
  assert np.all((val > 1.0) & (val < 2 * 3.0))
  # Period 2: no round at epoch 1, the state passes through.
  skipped = hook(first, 1)
  np.testing.assert_array_equal(skipped.method_state["weights"], w)


def test_the_fused_probe_matches_a_hand_written_probe():
  """Validation loss of the 'fused' probe after its first epoch, by hand:
  copy the student, one epoch of the probe's batches with a fresh
  constant-rate optimizer, masked mean CE per validation batch, summed."""
  ds = fx.tiny_dataset(n_val=40)
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="gblending", **{"student.epochs": 4,
                                              "gblending.period": 0.5})
  s, hook = hook_for(cfg, ds, mesh)
  got = hook(s.state, 0).method_state
  tx = student_lib.probe_optimizer(cfg, s.steps_per_epoch)
  params, stats = s.state.params, s.state.batch_stats
  opt = tx.init(params)
  j = 2  # the fused probe is the last of (audio, image, fused)
  stream = loader.epoch_seed(cfg.seed, 1_000_003 * 1 + j)
  rng = jax.random.key(stream)
  train_sum = 0.0
  for i, batch in enumerate(loader.train_batches(ds.splits["train"], 32,
                                                 seed=stream, epoch=0)):
    def fn(p, stats=stats, batch=batch, i=i):
      out, st = steps.apply_model(s.model, p, stats, batch["inputs"],
                                  train=True,
                                  rng=jax.random.fold_in(rng, i))
      return losses.cross_entropy(out.logits, batch["label"]), st
    (loss, stats), g = jax.value_and_grad(fn, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    params = jax.tree.map(lambda a, b: a + b, params, updates)
    train_sum += float(loss)
  val = ds.splits["val"]
  want = 0.0
  for start in (0, 32):
    b = val.batch(np.arange(start, min(start + 32, 40)))
    out, _ = steps.apply_model(s.model, params, stats,
                               {m: b[m] for m in MODS}, train=False)
    want += float(losses.cross_entropy(out.logits, b["label"]))
  assert float(got["val"][0, j]) == pytest.approx(want, rel=1e-4)
  assert float(got["train"][0, j]) == pytest.approx(train_sum, rel=1e-4)


def test_a_step_trains_the_blend():
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="gblending")
  s = student_lib.build_student(cfg, ds, mesh)
  state = s.state.replace(method_state=dict(
      s.state.method_state, weights=np.float32([0.0, 0.0, 1.0])))
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  batch["gate"] = s.gate.for_batch(batch, 0)
  _, metrics = s.step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                      jax.random.key(0))
  scalars = metrics["scalars"]
  # Only the fused term is weighted: the loss is the fused CE.
  assert float(scalars["loss"]) == pytest.approx(
      float(scalars["loss/student"]), rel=1e-6)
  assert float(scalars["gblending/weight/audio"]) == 0.0


def test_resumed_training_equals_uninterrupted(tmp_path):
  cfg = fx.tiny_config(**{"method": "gblending", "student.epochs": 4,
                          "gblending.period": 0.5,
                          "student.checkpoint_every_steps": 3})
  # Killed mid-epoch 2 (after its probe round), then one step after the
  # restart.
  fx.assert_resume_exact(cfg, fx.tiny_dataset(), tmp_path, stops=(9, 1))
