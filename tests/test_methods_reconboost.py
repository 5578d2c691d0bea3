"""ReconBoost: the schedule against a transcription of the released loops,
the boosting and GA losses against NumPy transcriptions of the released
formulas, real steps of every phase against plain SGD computed
independently, the frozen learner's untouched optimizer state and the
per-phase optimizer reset, SMP composing, three modalities, and a resumed
run equal to an uninterrupted one."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from g2d_jax import gating
from g2d_jax.data import base as data_base
from g2d_jax.errors import ConfigError
from g2d_jax.methods import reconboost
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

MODS = ("audio", "image")
LR = 0.05  # tiny_config's student rate
PLAIN_SGD = {"student.optimizer.momentum": 0.0,
             "student.optimizer.weight_decay": 0.0,
             "student.optimizer.decay_epochs": ()}


softmax = fx.softmax


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def released_boosting_loss(out_obj, out_join, lbl, n_class, w1, w2):
  """train.py's boosting loss, transcribed (out_join already detached)."""
  target = np.zeros((len(lbl), n_class))
  target[np.arange(len(lbl)), lbl] = 1
  loss = (-w1 * (target * log_softmax(out_obj)).mean(-1)
          + w2 * (target * softmax(out_join) * log_softmax(out_obj)).mean(-1))
  return loss.mean()


def released_schedule(k, n_mod, n_ens, num_steps):
  """train.py's stage loop, one entry per optimizer step: (phase,
  modality, stage, first step of its phase, learners added so far)."""
  out, added, stage = [], [], 0
  while len(out) < num_steps:
    m = stage % k  # schedule_model, fixed mode
    for i in range(n_mod):
      out.append(("modality", m, stage, i == 0, tuple(sorted(added))))
    if m not in added:
      added.append(m)  # net_ensemble.add(model, model_name)
    for i in range(n_ens):
      out.append(("ensemble", None, stage, i == 0, tuple(sorted(added))))
    stage += 1
  return out[:num_steps]


@pytest.mark.parametrize("k,n_mod,n_ens", [(2, 3, 2), (3, 1, 1), (3, 2, 0),
                                           (2, 1, 4)])
def test_schedule_matches_the_released_loops(k, n_mod, n_ens):
  want = released_schedule(k, n_mod, n_ens, 40)
  ph = reconboost.reconboost_phase(np.arange(40, dtype=np.int32), n_mod,
                                   n_ens, k)  # elementwise over steps
  members = np.stack(reconboost.ensemble_members(ph, k, grow=True), -1)
  for step, (kind, m, stage, first, added) in enumerate(want):
    assert bool(ph.in_modality[step]) == (kind == "modality"), step
    assert int(ph.stage[step]) == stage, step
    assert bool(ph.start[step]) == first, step
    if m is not None:
      assert int(ph.modality[step]) == m
    assert tuple(np.flatnonzero(members[step])) == added, step
  assert all(bool(x) for x in reconboost.ensemble_members(ph, k, False))


def test_phase_lengths_are_fractions_of_the_run():
  cfg = fx.tiny_config(**{"method": "reconboost", "student.epochs": 100})
  # 100 epochs of 8 steps: 0.005 of 800 steps = 4 steps per phase.
  assert reconboost.phase_lengths(cfg, 8) == (4, 4)
  # Short runs: at least one step (the smoke presets).
  assert reconboost.phase_lengths(cfg, 1) == (1, 1)
  cfg = fx.tiny_config(**{"method": "reconboost", "student.epochs": 10,
                          "reconboost.modality_fraction": 0.25,
                          "reconboost.ensemble_fraction": 0.0})
  assert reconboost.phase_lengths(cfg, 2) == (5, 0)
  with pytest.raises(ConfigError, match="modality_fraction=0"):
    reconboost.phase_steps(0.0, 10, "modality_fraction")
  with pytest.raises(ConfigError, match="must be in"):
    reconboost.phase_steps(1.5, 10, "ensemble_fraction", minimum=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_boosting_loss_matches_the_released_formula(seed):
  rng = np.random.default_rng(seed)
  b, c = 8, 5
  out_obj = rng.normal(size=(b, c)) * 2
  out_join = rng.normal(size=(b, c)) * 3
  y = rng.integers(0, c, b)
  w1, w2 = (5.0, 1.0) if seed % 2 == 0 else (4.0, 2.5)
  value, weight = reconboost.boosting_loss(
      jnp.float32(out_obj), jnp.float32(out_join), y, w1, w2)
  want = released_boosting_loss(out_obj, out_join, y, c, w1, w2)
  assert float(value) == pytest.approx(want, rel=1e-5)
  q = softmax(out_join)[np.arange(b), y]
  assert float(weight) == pytest.approx(np.mean(w1 - w2 * q), rel=1e-5)
  # Stage 0 from scratch: out_join is the scalar c0 as a [B, 1] tensor, its
  # softmax is 1 for every sample (broadcast against the one-hot target).
  c0 = rng.random()
  value, weight = reconboost.boosting_loss(
      jnp.float32(out_obj), jnp.float32(out_join), y, w1, w2,
      others_present=False)
  want = released_boosting_loss(out_obj, np.full((b, 1), c0), y, c, w1, w2)
  assert float(value) == pytest.approx(want, rel=1e-5)
  assert float(weight) == pytest.approx(w1 - w2)


def test_boosting_gradient_flows_into_the_learner_only():
  rng = np.random.default_rng(5)
  f, g = jnp.float32(rng.normal(size=(6, 4))), jnp.float32(
      rng.normal(size=(6, 4)))
  y = rng.integers(0, 4, 6)
  grad_f, grad_g = jax.grad(
      lambda a, b: reconboost.boosting_loss(a, b, y, 5.0, 1.0)[0],
      argnums=(0, 1))(f, g)
  assert np.all(np.asarray(grad_g) == 0) and np.any(np.asarray(grad_f) != 0)
  # w1 == w2 with q = 1 (the first phase): the loss and its gradient vanish.
  value, grad = jax.value_and_grad(lambda a: reconboost.boosting_loss(
      a, g, y, 2.0, 2.0, others_present=False)[0])(f)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ga_loss_is_the_detached_mse_of_the_release(seed):
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
  want = np.mean((softmax(a) - softmax(b)) ** 2)  # nn.MSELoss()
  for gradient in (False, True):
    assert float(reconboost.ga_loss(jnp.float32(a), jnp.float32(b),
                                    gradient)) == pytest.approx(want, rel=1e-5)
  fn = lambda x, z, grad: reconboost.ga_loss(x, z, grad)
  ga, gb = jax.grad(fn, argnums=(0, 1))(jnp.float32(a), jnp.float32(b), False)
  assert np.all(np.asarray(ga) == 0) and np.all(np.asarray(gb) == 0)
  ga, gb = jax.grad(fn, argnums=(0, 1))(jnp.float32(a), jnp.float32(b), True)
  assert np.all(np.asarray(gb) == 0)
  # Central differences of the NumPy formula in float64.
  num = np.zeros_like(a)
  for idx in np.ndindex(a.shape):
    e = np.zeros_like(a)
    e[idx] = 1e-5
    num[idx] = (np.mean((softmax(a + e) - softmax(b)) ** 2)
                - np.mean((softmax(a - e) - softmax(b)) ** 2)) / 2e-5
  np.testing.assert_allclose(ga, num, rtol=1e-3, atol=1e-7)


def test_ensemble_logits_sum_the_members():
  l1, l2 = jnp.ones((2, 3)), 2 * jnp.ones((2, 3))
  out = reconboost.ensemble_logits([l1, l2], [jnp.bool_(True),
                                             jnp.bool_(False)], 0.5)
  np.testing.assert_array_equal(out, 0.5 * np.ones((2, 3)))
  out = reconboost.ensemble_logits([l1, l2], [jnp.bool_(True)] * 2, 1.0)
  np.testing.assert_array_equal(out, 3 * np.ones((2, 3)))


def test_reset_moments_keeps_counters():
  state = {"trace": jnp.ones(3), "count": jnp.int32(7)}
  out = reconboost.reset_moments(state, jnp.bool_(True))
  assert int(out["count"]) == 7 and np.all(np.asarray(out["trace"]) == 0)
  out = reconboost.reset_moments(state, jnp.bool_(False))
  np.testing.assert_array_equal(out["trace"], np.ones(3))


def test_bad_settings_fail_with_the_fix():
  def build(mods=MODS, spe=4, **overrides):
    cfg = fx.tiny_config(**{"method": "reconboost", **overrides})
    return reconboost.build(cfg, "classification", modalities=mods,
                            steps_per_epoch=spe)
  assert build().spec.heads.kind == "shared"
  assert build().spec.heads.fusion_weights == (1.0, 1.0)
  assert build(**{"reconboost.learners": "fusion_heads"}).spec.heads is None
  with pytest.raises(ConfigError, match="semantics=freeze"):
    build(**{"gating.semantics": "reference"})
  with pytest.raises(ConfigError, match="fusion=late"):
    build(**{"reconboost.learners": "fusion_heads",
             "model.fusion": "concat"})
  with pytest.raises(ConfigError, match="at least two modalities"):
    build(mods=("audio",))
  with pytest.raises(ConfigError, match="steps_per_epoch"):
    build(spe=None)
  with pytest.raises(ConfigError, match="learners"):
    build(**{"reconboost.learners": "mlp"})
  with pytest.raises(ConfigError, match="classification"):
    reconboost.build(fx.tiny_config(method="reconboost"), "regression",
                     modalities=MODS, steps_per_epoch=4)


# -- Real steps through the pipeline ----------------------------------------
# Each student compiles one step (a few seconds); the fixtures share them.


@dataclasses.dataclass
class Setup:
  ds: object
  mesh: object
  student: object
  host: object      # the initial TrainState on the host
  batch: dict       # a training batch with its gate (kappa = 1)
  grads: dict = dataclasses.field(default_factory=dict)  # jitted, by name


def setup(dataset=None, **overrides):
  ds = dataset or fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "reconboost", **overrides})
  s = student_lib.build_student(cfg, ds, mesh)
  batch = next(loader.train_batches(ds.splits["train"], 32, seed=0, epoch=0))
  batch = with_gate(s, batch, ds.modalities)
  return Setup(ds, mesh, s, jax.device_get(s.state), batch)


def with_gate(student, batch, mods, teacher=AUDIO_WEAK, epoch=1):
  """The batch with teacher logits and its gate: at epoch 1 SMP (taus 1)
  is past its window, kappa = 1 everywhere."""
  b = dict(batch)
  n = len(b["label"])
  logits = dict(zip(("audio", "image"), teacher))
  b["teacher"] = {"logits": {m: np.tile(np.float32(logits.get(
      m, teacher[0])), (n, 1)) for m in mods}}
  b["gate"] = student.gate.for_batch(b, epoch)
  return b


def run(su, host, step_number=None, pattern=loader.ALL, batch=None):
  """One step from a host state (at `step_number` if given): the new host
  state and the metrics."""
  if step_number is not None:
    host = host.replace(step=np.int32(step_number))
  state = mesh_lib.replicate(host, su.mesh)
  b = su.batch if batch is None else batch
  _, b = su.student.step.split_pattern(b)
  new, metrics = su.student.step.jitted(pattern)(
      state, mesh_lib.shard_batch(b, su.mesh), np.int32(0), jax.random.key(0))
  return jax.device_get(new), jax.device_get(metrics["scalars"])


def model_outputs(su, host):
  out, _ = jax.jit(lambda p, b: steps.apply_model(
      su.student.model, p, b, su.batch["inputs"], train=True))(
          host.params, host.batch_stats)
  return out


def gradient(su, host, loss_fn, name=None):
  """d loss_fn(outputs, labels) / d params, from the model directly (the
  jitted function is kept under `name`, to call it again)."""
  model, y = su.student.model, su.batch["label"]
  grad = su.grads.get(name)
  if grad is None:
    grad = jax.jit(lambda params, bs: jax.grad(lambda p: loss_fn(
        steps.apply_model(model, p, bs, su.batch["inputs"], train=True)[0],
        y))(params))
    if name is not None:
      su.grads[name] = grad
  return jax.device_get(grad(host.params, host.batch_stats))


def sgd_expectation(su, host, loss_fn, wd=0.0, trained=None):
  """One step of torch SGD from zero momentum, p - lr (g + wd p), on the
  shared parameters and the `trained` modalities' (default: all); the
  others' are not in the step's optimizer."""
  g = gradient(su, host, loss_fn)
  mods = su.ds.modalities

  def step(path, p, x):
    m = gating.leaf_modality(path, mods)
    if trained is not None and m is not None and m not in trained:
      return p
    return p - LR * (x + wd * p)

  return jax.tree_util.tree_map_with_path(step, host.params, g)


def hand_boost(out, y, learner, others, w1=5.0, w2=1.0):
  f = out.modality_logits
  c = f[learner].shape[-1]
  logp = jax.nn.log_softmax(f[learner])[jnp.arange(len(y)), y]
  if others:
    z = jax.lax.stop_gradient(sum(f[o] for o in others))
    q = jax.nn.softmax(z)[jnp.arange(len(y)), y]
  else:
    q = 1.0
  return -jnp.mean((w1 - w2 * q) * logp) / c


def hand_ensemble(out, y, members):
  z = sum(out.modality_logits[m] for m in members)
  return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])


def branch(params, m):
  return [params["encoders"][m]] + (
      [params["aux"][m]] if m in params.get("aux", {}) else [])


def moved(a, b):
  return any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a),
                                                      jax.tree.leaves(b)))


def assert_same(a, b):
  for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, z)


def assert_close(a, b):
  for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, z, rtol=2e-5, atol=1e-6)


@pytest.fixture(scope="module")
def plain():
  """Plain SGD (no momentum or decay), SMP on; 12 steps of training, so
  one step per phase (0.005 of 12 rounds up to 1)."""
  return setup(**PLAIN_SGD, smp=True)


def test_every_phase_is_plain_sgd_on_its_released_loss(plain):
  su, host = plain, plain.host
  out = model_outputs(su, host)
  # Step 0: audio's modality phase, empty ensemble (q = 1); step 1: stage
  # 0's ensemble (audio only); step 2: image's phase, audio in the
  # ensemble; step 3: both learners' ensemble phase.
  cases = [
      (0, lambda o, y: hand_boost(o, y, "audio", []), ["image"]),
      (1, lambda o, y: hand_ensemble(o, y, ["audio"]), ["image"]),
      (2, lambda o, y: hand_boost(o, y, "image", ["audio"]), ["audio"]),
      (3, lambda o, y: hand_ensemble(o, y, MODS), []),
  ]
  metrics = {}
  for step_number, loss_fn, frozen in cases:
    new, metrics[step_number] = run(su, host, step_number)
    if step_number != 1:  # a partial ensemble: the three-modality test
      assert_close(new.params, sgd_expectation(su, host, loss_fn))
    for m in MODS:
      assert moved(branch(new.params, m), branch(host.params, m)) == (
          m not in frozen), (step_number, m)
    # The shared head trains in every phase, as the release's common head.
    assert moved(new.params["aux"]["shared_head"],
                 host.params["aux"]["shared_head"])
    if step_number != 2:  # step 2 adds the GA term, checked below
      assert float(metrics[step_number]["loss"]) == pytest.approx(
          float(loss_fn(out, su.batch["label"])), rel=1e-5)
  # GA is reported from stage 1 on but adds no gradient (the release's
  # detached term): step 2's update above is the boosting loss alone.
  p = {m: jax.nn.softmax(out.modality_logits[m]) for m in MODS}
  ga = float(jnp.mean((p["image"] - p["audio"]) ** 2))
  m0, m2 = metrics[0], metrics[2]
  assert float(m2["loss/ga"]) == pytest.approx(ga, rel=1e-4)
  assert float(m2["loss"]) == pytest.approx(
      float(m2["loss/boost"]) + 0.5 * ga, rel=1e-5)
  assert float(m0["loss"]) == pytest.approx(float(m0["loss/boost"]))
  assert float(m0["reconboost/weight"]) == pytest.approx(4.0)
  assert [float(metrics[i]["reconboost/phase"]) for i in range(4)] == [
      0.0, 2.0, 1.0, 2.0]
  assert [float(metrics[i]["reconboost/members"]) for i in range(4)] == [
      0.0, 1.0, 1.0, 2.0]


def test_smp_composes_and_skipping_frozen_backward_is_exact(plain):
  su = plain
  batch = batch_with_teacher(su.ds, *AUDIO_WEAK)  # labels 0: audio weaker
  batch["gate"] = su.student.gate.for_batch(batch, 0)
  assert batch["gate"]["pattern"] == 0  # SMP: audio trains alone
  # Step 3 (both learners' ensemble phase), where ReconBoost alone moves
  # the image branch (previous test): SMP holds it.
  results = {p: run(su, su.host, 3, pattern=p, batch=batch)
             for p in (loader.ALL, 0)}
  new, metrics = results[loader.ALL]
  assert float(metrics["kappa/image"]) == 0.0
  assert_same(branch(new.params, "image"), branch(su.host.params, "image"))
  assert moved(new.params["encoders"]["audio"],
               su.host.params["encoders"]["audio"])
  # The step specialised to "audio alone" (image behind stop_gradient)
  # gives the same update.
  assert_same(results[0][0].params, new.params)
  assert_same(results[0][0].opt_state, new.opt_state)
  assert su.student.method.spec.skip_frozen_exact
  # Image's own phase under SMP: only the shared head moves.
  new, _ = run(su, su.host, 2, batch=batch)
  for m in MODS:
    assert_same(branch(new.params, m), branch(su.host.params, m))
  assert moved(new.params["aux"]["shared_head"],
               su.host.params["aux"]["shared_head"])


PHASED = {"student.epochs": 25, "student.optimizer.decay_epochs": (),
          "student.optimizer.weight_decay": 1e-3,
          "reconboost.modality_fraction": 0.03,
          "reconboost.ensemble_fraction": 0.02}


@pytest.fixture(scope="module")
def phased():
  """Momentum 0.9, weight decay 1e-3, constant rate; 100 steps of
  training: 3-step modality and 2-step ensemble phases."""
  su = setup(**PHASED)
  assert reconboost.phase_lengths(
      fx.tiny_config(method="reconboost", **PHASED), 4) == (3, 2)
  return su


def trajectory(su, n):
  states = [su.host]
  for _ in range(n):
    states.append(run(su, states[-1])[0])
  return states


def trace(before, after, get):
  """The SGD momentum buffer a step used: (before - after) / lr."""
  return jax.tree.map(lambda a, b: (a - b) / LR, get(before), get(after))


def test_optimizer_resets_at_every_phase_and_frozen_learners_stay(phased):
  wd, su = 1e-3, phased
  states = trajectory(su, 10)
  p = [s.params for s in states]  # p[i]: before step i
  audio = lambda t: t["encoders"]["audio"]
  # Steps 5-7 (image's phase): audio does not move, not even by decay.
  for i in (5, 6, 7):
    assert_same(audio(p[i + 1]), audio(p[i]))
  # Step 8 starts the ensemble phase: a fresh optimizer (the release's new
  # SGD), p - lr (g + wd p), though audio and the head have momentum.
  ens = lambda o, y: hand_ensemble(o, y, MODS)
  g8 = gradient(su, states[8], ens, "ensemble")
  assert_close(p[9], jax.tree.map(lambda w, g: w - LR * (g + wd * w), p[8],
                                  g8))
  # Step 9, inside the phase: momentum builds on step 8's buffer.
  g9 = gradient(su, states[9], ens, "ensemble")
  t8 = trace(p[8], p[9], lambda t: t)
  assert_close(p[10], jax.tree.map(
      lambda w, g, t: w - LR * (g + wd * w + 0.9 * t), p[9], g9, t8))


def test_resumed_steps_equal_uninterrupted_and_compile_once(phased):
  """8 steps on the devices vs 4 steps, the state to the host, a new
  student (a restarted process), 4 more: the same parameters, optimizer
  state and BatchNorm statistics (the split falls inside a phase)."""
  su = phased
  batches = [b for e in range(2) for b in loader.train_batches(
      su.ds.splits["train"], 32, seed=0, epoch=e)]
  n = 4

  def train(student, state, chunk):
    for b in chunk:
      b = with_gate(student, b, MODS)
      state, _ = student.step(state, mesh_lib.shard_batch(b, su.mesh),
                              np.int32(0), jax.random.key(0))
    return state

  straight = jax.device_get(train(su.student, su.student.initial_state(),
                                  batches[:2 * n]))
  half = jax.device_get(train(su.student, su.student.initial_state(),
                              batches[:n]))
  restarted = student_lib.build_student(
      fx.tiny_config(method="reconboost", **PHASED), su.ds, su.mesh,
      init=False)
  resumed = jax.device_get(train(
      restarted,
      mesh_lib.replicate(jax.tree.map(np.array, half), su.mesh),
      batches[n:2 * n]))
  assert int(resumed.step) == int(straight.step) == 2 * n
  assert_same(resumed.params, straight.params)
  assert_same(resumed.opt_state, straight.opt_state)
  assert_same(resumed.batch_stats, straight.batch_stats)
  # Every phase ran (both modalities and the ensemble) in one compiled step.
  assert su.student.step.compiled_patterns() == {loader.ALL: 1}


def three_modality_dataset():
  """tiny_dataset plus a 5-d 'text' vector (made up, for tests)."""
  two = fx.tiny_dataset()
  rng = np.random.default_rng(3)
  splits = {}
  for name, split in two.splits.items():
    y = split.labels
    t = (rng.normal(size=(len(y), 5)) + 0.2 * y[:, None]).astype(np.float32)
    splits[name] = data_base.Split(
        inputs={**split.inputs, "text": t}, labels=y,
        scales={**split.scales, "text": 1.0})
  mods = ("audio", "image", "text")
  return data_base.MultimodalDataset(
      "tiny_test_data_3", mods, splits, 4, "classification",
      data_base.make_fingerprint("tiny_test_data_3", {"seed": 3}, splits,
                                 "classification"))


THREE = ("audio", "image", "text")
WD = 1e-3


@pytest.fixture(scope="module")
def three():
  """Three modalities; late fusion's heads as learners with the GA
  gradient on (alpha 50) and one optimizer for the run (no reset); momentum
  0.9, weight decay 1e-3, constant rate; one step per phase."""
  encoders = ml_collections.ConfigDict(dict(
      audio=dict(kind="cnn", channels=(4, 8), downsample="stride"),
      image=dict(kind="mlp", hidden_dims=(16,)),
      text=dict(kind="mlp", hidden_dims=(8,))))
  return setup(three_modality_dataset(), **{
      "model.encoders": encoders, "student.optimizer.decay_epochs": (),
      "student.optimizer.weight_decay": WD,
      "reconboost.learners": "fusion_heads", "reconboost.ga_gradient": True,
      "reconboost.alpha": 50.0, "reconboost.reset_optimizer": False})


def with_ga(o, y, m, others, prev):
  p, r = (jax.nn.softmax(o.modality_logits[x]) for x in (m, prev))
  return hand_boost(o, y, m, others) + 50.0 * jnp.mean(
      (p - jax.lax.stop_gradient(r)) ** 2)


def test_three_modalities_cycle_and_ga_pairs_with_the_previous_stage(three):
  su, host = three, three.host
  assert "aux" not in host.params  # the learners are the late heads
  out = model_outputs(su, host)
  p = {m: np.asarray(jax.nn.softmax(out.modality_logits[m])) for m in THREE}
  # One step per phase: modality j at step 2j, ensemble at 2j + 1; the
  # ensemble of the others holds the modalities trained before (the
  # release's DynamicNet grows); GA pairs with the previous stage's one.
  for j, m in enumerate(THREE):
    new, metrics = run(su, host, 2 * j)
    for other in THREE:
      assert moved(branch(new.params, other), branch(host.params, other)) == (
          other == m), (m, other)
    prev = THREE[(j - 1) % 3]
    assert float(metrics["loss/ga"]) == pytest.approx(
        float(np.mean((p[m] - p[prev]) ** 2)), rel=1e-4)
  # Text's phase: q from audio + image, and the GA gradient toward image.
  new, _ = run(su, host, 4)
  assert_close(new.params, sgd_expectation(su, host, lambda o, y: with_ga(
      o, y, "text", ["audio", "image"], "image"), WD, trained=["text"]))
  # Stage 1's ensemble phase: audio and image are in it, text is not yet;
  # F is the sum of the late heads (3 times the fused output).
  new, metrics = run(su, host, 3)
  assert float(metrics["reconboost/members"]) == 2.0
  assert_same(branch(new.params, "text"), branch(host.params, "text"))
  assert_close(new.params, sgd_expectation(su, host, lambda o, y: (
      hand_ensemble(o, y, ["audio", "image"])), WD, ["audio", "image"]))


def test_without_reset_a_frozen_learner_keeps_its_momentum(three):
  """reset_optimizer=False (one optimizer for the run, as BalanceBenchmark):
  while image trains (step 2) audio gets no update, not even weight decay,
  and its momentum is held, not decayed (the release's untouched
  parameters); at step 3 it resumes from the buffer of its step 1."""
  su = three
  states = trajectory(su, 4)
  p = [s.params for s in states]  # p[i]: before step i
  audio = lambda t: t["encoders"]["audio"]
  assert_same(audio(p[3]), audio(p[2]))
  g3 = gradient(su, states[3], lambda o, y: hand_ensemble(
      o, y, ["audio", "image"]))
  t1 = trace(p[1], p[2], audio)
  assert_close(audio(p[4]), jax.tree.map(
      lambda w, g, t: w - LR * (g + WD * w + 0.9 * t), audio(p[3]),
      audio(g3), t1))
