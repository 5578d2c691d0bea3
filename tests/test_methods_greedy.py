"""Greedy: the learning speeds and the trainer's state machine against a
transcription of BalanceBenchmark's Greedy_trainer.py, the edge cases, the
re-balancing step's gradient through the pipeline, SMP, one compilation,
and exact resumption (step level and through the checkpointed pipeline)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import greedy
from g2d_jax.pipeline import build
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from g2d_jax.pipeline import trainer
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

MODS = ("audio", "image")
SGD = {"student.optimizer.momentum": 0.0,
       "student.optimizer.weight_decay": 0.0}


class ReleasedGreedy:
  """GreedyTrainer (BalanceBenchmark), transcribed: the trainer state and
  `compute_learning_speed` over (name, weight, grad) triples; `step`
  is the part of `train_loop` after `training_step`."""

  def __init__(self, alpha, window_size, modalities):
    self.alpha, self.window_size, self.modalitys = (alpha, window_size,
                                                    modalities)
    self.M_bypass_modal_0 = self.M_bypass_modal_1 = 0
    self.M_main_modal_0 = self.M_main_modal_1 = 0
    self.curation_mode = False
    self.caring_modality = 0
    self.curation_step = self.window_size
    self.speed = 0

  def compute_learning_speed(self, named):
    wn_main, wn_bypass = [0] * 2, [0] * 2
    gn_main, gn_bypass = [0] * 2, [0] * 2
    for name, w, g in named:
      wn = float((np.float64(w) ** 2).sum())
      gn = float((np.float64(g) ** 2).sum())
      if "mmtm_layers" in name:
        shared = True
        for ind, modal in enumerate(self.modalitys):
          if modal in name:
            wn_bypass[ind] += wn
            gn_bypass[ind] += gn
            shared = False
        if shared:
          for ind in range(2):
            wn_bypass[ind] += wn
            gn_bypass[ind] += gn
      else:
        for ind, modal in enumerate(self.modalitys):
          if modal in name:
            wn_main[ind] += wn
            gn_main[ind] += gn
    self.M_bypass_modal_0 += gn_bypass[0] / wn_bypass[0]
    self.M_bypass_modal_1 += gn_bypass[1] / wn_bypass[1]
    self.M_main_modal_0 += gn_main[0] / wn_main[0]
    self.M_main_modal_1 += gn_main[1] / wn_main[1]
    bdr_0 = np.log10(self.M_bypass_modal_0 / self.M_main_modal_0)
    bdr_1 = np.log10(self.M_bypass_modal_1 / self.M_main_modal_1)
    return bdr_0 - bdr_1

  def step(self, named):
    if not self.curation_mode:
      self.speed = self.compute_learning_speed(named)
      if abs(self.speed) > self.alpha:
        biased_direction = np.sign(self.speed)
        self.curation_mode = True
        self.curation_step = 0
        if biased_direction == -1:
          self.caring_modality = 1
        elif biased_direction == 1:
          self.caring_modality = 0
      else:
        self.curation_mode = False
        self.caring_modality = 0
    else:
      self.curation_step += 1
      if self.curation_step == self.window_size:
        self.curation_mode = False


def random_tree(rng, scale_main=1.0):
  """Params/grads in the cross-attention layout: main leaves per modality,
  fusion leaves named after each modality (bypass) and fc_out (none)."""
  def arr(*shape, s=1.0):
    return jnp.float32(rng.normal(size=shape) * s)
  return {
      "encoders": {
          "audio": {"backbone": {"conv": {"kernel": arr(3, 3, 1, 4)}},
                    "proj": {"kernel": arr(4, 8), "bias": arr(8)}},
          "image": {"backbone": {"dense": {"kernel": arr(6, 8, s=scale_main),
                                           "bias": arr(8)}}}},
      "fusion": {"attn_audio": {"query": {"kernel": arr(8, 8)}},
                 "norm_audio": {"scale": arr(8)},
                 "attn_image": {"query": {"kernel": arr(8, 8)}},
                 "norm_image": {"scale": arr(8)},
                 "fc_out": {"kernel": arr(16, 4), "bias": arr(4)}}}


def released_names(tree):
  """BalanceBenchmark-style names for our leaves: fusion leaves named after
  a modality become MMTM ("bypass") parameters; fc_out a fusion_module
  parameter (in no group)."""
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [p.key for p in path]
    if keys[0] == "fusion":
      owner = any(k.endswith(("_audio", "_image")) for k in keys)
      names.append(("mmtm_layers." if owner else "fusion_module.")
                   + ".".join(keys[1:]))
    else:
      names.append("modality_encoder." + ".".join(keys[1:]))
  return names


def named(params, grads):
  return list(zip(released_names(params), jax.tree.leaves(params),
                  jax.tree.leaves(grads)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learning_speeds_match_the_released_rule(seed):
  rng = np.random.default_rng(seed)
  params, grads = random_tree(rng), random_tree(rng, scale_main=3.0)
  main, bypass = greedy.learning_speeds(grads, params, MODS)
  released = ReleasedGreedy(0.0, 5, MODS)
  d = released.compute_learning_speed(named(params, grads))
  assert float(main["audio"]) == pytest.approx(released.M_main_modal_0,
                                               rel=1e-5)
  assert float(main["image"]) == pytest.approx(released.M_main_modal_1,
                                               rel=1e-5)
  assert float(bypass["audio"]) == pytest.approx(released.M_bypass_modal_0,
                                                 rel=1e-5)
  assert float(bypass["image"]) == pytest.approx(released.M_bypass_modal_1,
                                                 rel=1e-5)
  got = greedy.speed_difference([main["audio"], main["image"]],
                                [bypass["audio"], bypass["image"]])
  assert float(got) == pytest.approx(d, rel=1e-4, abs=1e-6)


def test_parameter_groups_of_a_real_cross_attention_student():
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(method="greedy", **{"model.fusion": "cross_attention"})
  model = build.student_model(cfg, ds)
  x = build.example_inputs(ds.splits["train"], 2)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x,
                                             train=False))["params"]
  groups = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(p.key) for p in path)
    groups[name] = greedy.parameter_group(path, MODS)
  assert {g for n, g in groups.items() if n.startswith("encoders/audio")} == {
      ("main", "audio")}
  assert {g for n, g in groups.items() if n.startswith("encoders/image")} == {
      ("main", "image")}
  assert {g for n, g in groups.items()
          if n.startswith(("fusion/attn_image", "fusion/norm_image"))} == {
              ("bypass", "image")}
  assert {g for n, g in groups.items() if n.startswith("fusion/fc_out")} == {
      None}


def run_controller(mus, alpha, window_size, active=None):
  """Our controller over per-step (mu_main, mu_bypass) pairs: the mode each
  step ran in, its caring modality, and d after it."""
  state = greedy.init_state(None, None, window_size, MODS)
  modes, carings, ds = [], [], []
  step = jax.jit(lambda s, mm, mb, a: greedy.controller(
      s, mm, mb, MODS, alpha=alpha, window_size=window_size, active=a))
  for t, (mm, mb) in enumerate(mus):
    a = True if active is None else active[t]
    modes.append(bool(state["curation_mode"]) and a)
    carings.append(int(state["caring_modality"]))
    state = step(state, dict(zip(MODS, map(jnp.float32, mm))),
                 dict(zip(MODS, map(jnp.float32, mb))), jnp.bool_(a))
    ds.append(float(state["speed"]))
  return modes, carings, ds, state


@pytest.mark.parametrize("seed,alpha,window_size",
                         [(0, 0.001, 5), (1, 0.03, 3), (2, 0.05, 1),
                          (3, 0.02, 2)])
def test_controller_matches_the_released_trainer(seed, alpha, window_size):
  rng = np.random.default_rng(seed)
  n = 40
  # Per-step group speeds gn/wn; the transcription gets them as one-leaf
  # groups (w = 1, g = sqrt(mu)) with BalanceBenchmark's names.
  drift = np.linspace(1.0, 0.2, n)
  mus = [((rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5) * drift[t]),
          (rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5)))
         for t in range(n)]
  released = ReleasedGreedy(alpha, window_size, MODS)
  want_modes, want_caring, want_d = [], [], []
  for (mm, mb) in mus:
    want_modes.append(released.curation_mode)
    want_caring.append(released.caring_modality)
    released.step([("modality_encoder.audio.w", 1.0, np.sqrt(mm[0])),
                   ("modality_encoder.image.w", 1.0, np.sqrt(mm[1])),
                   ("mmtm_layers.fc_excites.audio.w", 1.0, np.sqrt(mb[0])),
                   ("mmtm_layers.fc_excites.image.w", 1.0, np.sqrt(mb[1]))])
    want_d.append(released.speed)
  modes, carings, ds, state = run_controller(mus, alpha, window_size)
  assert modes == want_modes
  assert carings == want_caring
  np.testing.assert_allclose(ds, want_d, rtol=1e-4, atol=1e-6)
  assert bool(state["curation_mode"]) == released.curation_mode
  assert int(state["curation_step"]) == released.curation_step
  # The case is not vacuous: normal and re-balancing steps both occur.
  assert any(modes) and not all(modes[1:])


def test_first_step_zero_gradients_ties_and_the_window_edge():
  zero = ((0.0, 0.0), (0.0, 0.0))
  # All-zero gradients: d = 0, never a re-balancing window, even alpha = 0.
  modes, _, ds, state = run_controller([zero] * 4, 0.0, 5)
  assert not any(modes) and ds == [0.0] * 4
  assert float(state["main"]["audio"]) == 0.0
  # A tie (equal speeds, bypass in neither modality: late fusion): d = 0.
  tie = ((0.3, 0.3), (0.0, 0.0))
  modes, _, ds, _ = run_controller([tie] * 4, 0.0, 5)
  assert not any(modes) and ds == [0.0] * 4
  # Image learns faster: d = log10(M_image / M_audio) > 0 on the first step,
  # which itself runs normal; the next window_size = 2 steps re-balance
  # audio (caring 0), then a normal step decides again.
  fast = ((0.1, 0.4), (0.0, 0.0))
  modes, carings, ds, _ = run_controller([fast] * 6, 0.001, 2)
  assert ds[0] == pytest.approx(np.log10(4.0), rel=1e-5)
  assert modes == [False, True, True, False, True, True]
  assert carings[1] == 0
  # Outside the window: every step is normal, the sums still grow, and an
  # open re-balancing window closes.
  modes, _, ds, state = run_controller([fast] * 4, 0.001, 5,
                                       active=[True, False, False, True])
  assert modes == [False, False, False, False]
  assert float(state["main"]["image"]) == pytest.approx(1.6, rel=1e-6)
  assert bool(state["curation_mode"])  # reopened by the last (active) step
  # The bypass term needs bypass speeds in both modalities.
  d = greedy.speed_difference([jnp.float32(1.0), jnp.float32(10.0)],
                              [jnp.float32(0.0), jnp.float32(5.0)])
  assert float(d) == pytest.approx(1.0, rel=1e-6)


def test_refusals():
  cfg = fx.tiny_config(method="greedy")
  with pytest.raises(ConfigError, match="exactly two modalities"):
    greedy.build(cfg, "classification", modalities=("a", "b", "c"))
  for field, value in (("greedy.alpha", -0.1), ("greedy.window_size", 0)):
    with pytest.raises(ConfigError, match=field.split(".")[1]):
      greedy.build(fx.tiny_config(method="greedy", **{field: value}),
                   "classification", modalities=MODS)


def with_mode(state, mesh, **fields):
  """A copy of `state` (host or device; the step donates its argument, so
  a state is never stepped twice) with method-state fields replaced."""
  host = jax.device_get(state)
  ms = dict(host.method_state)
  ms.update({k: np.asarray(v, np.asarray(ms[k]).dtype)
             for k, v in fields.items()})
  return mesh_lib.replicate(host.replace(method_state=ms), mesh)


def grads_fn(model, params, batch_stats, labels):
  """inputs -> d CE(fused) / d params (train mode), compiled once."""
  @jax.jit
  def grad(x):
    def loss(p):
      out, _ = steps.apply_model(model, p, batch_stats, x, train=True,
                                 rng=jax.random.key(0))
      return losses.cross_entropy(out.logits, labels)
    return jax.grad(loss)(params)
  return lambda x: jax.device_get(grad(x))


def test_training_steps_normal_and_rebalancing():
  """A normal step is SGD on the fused gradient and adds its speeds to the
  sums; a re-balancing step moves the caring branch by the gradient of the
  pass with the other input zeroed, freezes its bypass layers (cross-
  attention's attn_image, norm_image), and moves everything else (fc_out
  included) by the ordinary gradient."""
  caring = "image"
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="greedy", **{"model.fusion": "cross_attention"},
                       **SGD)
  s = student_lib.build_student(cfg, ds, mesh)
  batch = next(loader.train_batches(ds.splits["train"], 32, seed=0, epoch=0))
  batch["gate"] = s.gate.for_batch(batch, 0)
  sharded = mesh_lib.shard_batch(batch, mesh)
  host0 = jax.device_get(s.state)
  p0, bs0 = host0.params, host0.batch_stats
  grads_of = grads_fn(s.model, p0, bs0, batch["label"])
  full = grads_of(batch["inputs"])
  other = [m for m in MODS if m != caring][0]
  zeroed = dict(batch["inputs"], **{other: np.zeros_like(
      batch["inputs"][other])})
  alone = grads_of(zeroed)

  # Normal step.
  new, metrics = s.step(with_mode(host0, mesh), sharded, np.int32(0),
                        jax.random.key(0))
  new = jax.device_get(new)
  for a, b, g in zip(jax.tree.leaves(new.params), jax.tree.leaves(p0),
                     jax.tree.leaves(full)):
    np.testing.assert_allclose(a, b - 0.05 * g, rtol=1e-5, atol=1e-6)
  released = ReleasedGreedy(0.001, 5, MODS)
  d = released.compute_learning_speed(named(p0, full))
  assert float(new.method_state["speed"]) == pytest.approx(d, rel=1e-4)
  assert float(new.method_state["main"]["image"]) == pytest.approx(
      released.M_main_modal_1, rel=1e-4)
  assert float(new.method_state["bypass"]["audio"]) == pytest.approx(
      released.M_bypass_modal_0, rel=1e-4)
  assert float(metrics["scalars"]["greedy/rebalancing"]) == 0.0

  # Re-balancing step for `caring`.
  state = with_mode(host0, mesh, curation_mode=1, curation_step=0,
                    caring_modality=MODS.index(caring))
  new, metrics = s.step(state, sharded, np.int32(0), jax.random.key(0))
  new = jax.device_get(new)
  assert float(metrics["scalars"]["greedy/rebalancing"]) == 1.0
  assert float(metrics["scalars"][f"greedy/caring/{caring}"]) == 1.0
  assert int(new.method_state["curation_step"]) == 1
  moved = 0
  for path, g_full in jax.tree_util.tree_flatten_with_path(full)[0]:
    group = greedy.parameter_group(path, MODS)
    g = {("main", caring): None, ("bypass", caring): 0.0}.get(group, g_full)
    if g is None:
      g = alone
      for p in path:
        g = g[p.key]
    got, was = new.params, p0
    for p in path:
      got, was = got[p.key], was[p.key]
    np.testing.assert_allclose(got, was - 0.05 * np.asarray(g), rtol=1e-5,
                               atol=1e-6)
    moved += group == ("main", caring) and not np.allclose(g, g_full)
  assert moved  # the zeroed pass changes the caring branch's gradient
  # The sums do not grow on a re-balancing step.
  assert float(new.method_state["main"]["audio"]) == 0.0


def test_smp_composes_and_the_step_compiles_once():
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="greedy", smp=True)
  s = student_lib.build_student(cfg, ds, mesh)
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  batch["gate"] = s.gate.for_batch(batch, 0)
  assert batch["gate"]["pattern"] == 0  # audio trains alone
  before = jax.device_get(s.state.params)
  state = s.state
  for caring in (None, 1, 0):  # normal, re-balancing image, audio
    if caring is not None:
      state = with_mode(state, mesh, curation_mode=1, curation_step=0,
                        caring_modality=caring)
    state, metrics = s.step(state, mesh_lib.shard_batch(batch, mesh),
                            np.int32(0), jax.random.key(0))
    assert float(metrics["scalars"]["kappa/image"]) == 0.0
    assert np.isfinite(float(metrics["scalars"]["loss"]))
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(after["encoders"]["image"]),
                  jax.tree.leaves(before["encoders"]["image"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(after["encoders"]["audio"]),
      jax.tree.leaves(before["encoders"]["audio"])))
  # Three modes, one compilation of the plain (all-branches) step.
  assert s.step.compiled_patterns() == {loader.ALL: 1}


def test_resumed_state_continues_exactly():
  """2N steps straight equal N steps, a host copy of the state rebuilt on
  the mesh, and N more; the cut falls inside a re-balancing window."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="greedy", **{"greedy.window_size": 3})
  s = student_lib.build_student(cfg, ds, mesh)
  batches = list(loader.train_batches(ds.splits["train"], 32, seed=0,
                                      epoch=0))
  batches = [dict(b, gate=s.gate.for_batch(b, 0)) for b in batches]
  n = 2

  def run(state, todo):
    modes = []
    for b in todo:
      state, metrics = s.step(state, mesh_lib.shard_batch(b, mesh),
                              np.int32(0), jax.random.key(0))
      modes.append(float(metrics["scalars"]["greedy/rebalancing"]))
    return state, modes

  host0 = jax.device_get(s.state)
  straight, modes = run(mesh_lib.replicate(host0, mesh), batches[:2 * n])
  half, _ = run(mesh_lib.replicate(host0, mesh), batches[:n])
  host = jax.device_get(half)
  assert int(host.method_state["curation_mode"]) == 1  # inside a window
  rebuilt = mesh_lib.replicate(jax.tree.map(np.asarray, host), mesh)
  resumed, _ = run(rebuilt, batches[n:2 * n])
  assert modes == [0.0, 1.0, 1.0, 1.0]
  for a, b in zip(jax.tree.leaves(jax.device_get(straight)),
                  jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)


def test_pipeline_resume_from_a_checkpoint_equals_uninterrupted(tmp_path):
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "greedy", "student.epochs": 2,
                          "student.checkpoint_every_steps": 3,
                          "greedy.window_size": 2})
  # One student (one compiled step) for the three runs.
  s = student_lib.build_student(cfg, ds, mesh, init=False)
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  student_lib.train_student(cfg, ds, straight, mesh, student=s)
  with pytest.raises(trainer.Interrupted):
    student_lib.train_student(cfg, ds, resumed, mesh, stop_after_steps=5,
                              student=s)
  student_lib.train_student(cfg, ds, resumed, mesh, student=s)
  wa = jax.device_get(student_lib.load_student(cfg, ds, straight, mesh,
                                               student=s)[1])
  wb = jax.device_get(student_lib.load_student(cfg, ds, resumed, mesh,
                                               student=s)[1])
  for a, b in zip(jax.tree.leaves(wa), jax.tree.leaves(wb)):
    np.testing.assert_array_equal(a, b)
