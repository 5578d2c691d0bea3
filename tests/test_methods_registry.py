"""The method registry and its plumbing: config sub-dicts and presets, the
SMP default, SMP composing with every method, and the frozen-branch
skipping rule for methods that touch gradients."""

import jax
import numpy as np
import pytest

from g2d_jax import methods
from g2d_jax.errors import ConfigError
from g2d_jax.methods import base
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

TRAINED = ("joint", "umt", "ogm", "ogm_ge", "mlb", "mmpareto", "mla", "pmr",
           "mslr", "mmcosine", "opm", "agm", "reconboost", "greedy",
           "gblending", "inforeg", "relearning", "valuation", "mbsd", "cml",
           "lfm", "amco", "g2d")


def test_every_method_has_its_sub_config_and_the_smp_default():
  c = config_lib.base_config()
  assert config_lib.METHODS == methods.available()
  assert set(config_lib.METHODS) == set(TRAINED) | {"ume"}
  for name in config_lib.METHODS:
    assert name in c
  assert (c.ogm_ge.alpha, c.mlb.alpha, c.mlb.beta_max, c.mmpareto.gamma,
          c.pmr.alpha) == (0.8, 0.5, 10.0, 1.5, 2.0)
  # The releases' windows as fractions: epochs 0..50 and 0..70 of 100.
  assert (c.ogm_ge.window.start, c.ogm_ge.window.end, c.pmr.window.end,
          c.mlb.window.end) == (0.0, 0.51, 0.71, 1.0)
  assert c.smp is None
  for name in config_lib.METHODS:
    c.method = name
    assert methods.smp_enabled(c) == (name == "g2d")
  c.smp = True
  c.method = "joint"
  assert methods.smp_enabled(c)


def test_presets_select_the_method_and_optionally_its_optimizer():
  c = config_lib.base_config()
  methods.apply_preset(c, "mlb")
  assert c.method == "mlb" and c.student.optimizer.name == "sgd"
  assert config_lib.student_optimizer(c).lr == c.student.optimizer.lr
  methods.apply_preset(c, "mmpareto", method_optimizer=True)
  opt = config_lib.student_optimizer(c)
  assert (c.method, c.protocol, opt.lr, tuple(opt.decay_fractions),
          opt.decay_epochs) == ("mmpareto", "released", 2e-3, (), None)
  # The config's own optimizer is untouched: only the run's view changes.
  assert c.student.optimizer.lr == 1e-3
  with pytest.raises(Exception, match="unknown method"):
    methods.apply_preset(c, "magic")


def build(name, **overrides):
  return methods.build_method(fx.tiny_config(method=name, **overrides),
                              "classification", modalities=("audio", "image"),
                              steps_per_epoch=4)


def test_specs():
  built = {n: build(n) for n in TRAINED}
  assert {n for n, m in built.items() if m.spec.skip_frozen_exact} == {
      "joint", "umt", "pmr", "mmcosine", "opm", "reconboost", "gblending",
      "relearning", "valuation", "mbsd", "cml", "amco", "g2d"}
  assert {n: m.spec.updates_per_step for n, m in built.items()
          if m.spec.updates_per_step != 1} == {"mla": 2}
  assert {n: m.spec.heads.kind for n, m in built.items() if m.spec.heads} == {
      "mlb": "unimodal", "mmpareto": "unimodal", "mla": "shared",
      "reconboost": "shared"}
  assert {n: sorted(m.spec.teacher_outputs) for n, m in built.items()
          if m.spec.teacher_outputs} == {"umt": ["features"],
                                         "g2d": ["features", "logits"]}
  assert [n for n, m in built.items() if m.spec.masked_updates] == [
      "mla", "reconboost"]
  assert {n: getattr(m.epoch_hook, "split", "probe") for n, m in built.items()
          if m.epoch_hook} == {"pmr": "train", "mslr": "val",
                               "gblending": "probe", "relearning": "val"}
  assert {n for n, m in built.items()
          if getattr(m.epoch_hook, "reduce", "sum") == "concat"} == {
              "relearning"}
  assert {n for n, m in built.items() if m.init_state} == {
      "mla", "pmr", "mslr", "agm", "greedy", "gblending", "inforeg",
      "relearning", "lfm", "amco"}


def test_ume_is_selectable_but_builds_no_method():
  assert methods.trains_nothing("ume") and not methods.trains_nothing("g2d")
  with pytest.raises(ConfigError, match="trains no student"):
    build("ume")


def test_invalid_methods_fail_at_construction():
  update = base.standard_update(lambda out, ctx: (0.0, {}))
  with pytest.raises(ConfigError, match="teacher outputs"):
    base.Method("m", update, base.MethodSpec(
        teacher_outputs=frozenset({"attention"})))
  with pytest.raises(ConfigError, match="updates_per_step"):
    base.Method("m", update, base.MethodSpec(updates_per_step=0))
  with pytest.raises(ConfigError, match="heads kind"):
    base.Method("m", update, base.MethodSpec(heads=base.HeadsSpec("tree")))
  hook = base.EpochHook(0.1, lambda o, b: {}, lambda s, x, e: s)
  with pytest.raises(ConfigError, match="no init_state"):
    base.Method("m", update, epoch_hook=hook)
  with pytest.raises(ConfigError, match="fraction"):
    base.Method("m", update, init_state=lambda p, o: {},
                epoch_hook=base.EpochHook(0.0, hook.accumulate, hook.finish))
  with pytest.raises(ConfigError, match="reduce 'mean'.*sum.*concat"):
    base.Method("m", update, init_state=lambda p, o: {},
                epoch_hook=base.EpochHook(0.1, hook.accumulate, hook.finish,
                                          reduce="mean"))
  # A method that masks its updates needs the gated student optimizer.
  mla = build("mla")
  with pytest.raises(ConfigError, match="gated student optimizer"):
    steps.TrainStep(None, None, mla, "classification", gate=None)
  with pytest.raises(ConfigError, match="steps_per_epoch"):
    methods.build_method(fx.tiny_config(method="mla"), "classification",
                         modalities=("audio", "image"))


# Loss-only methods (joint, umt, g2d, gblending) compose through the same
# path as G2D, which tests/test_pipeline_steps.py covers; these are the ones
# with hooks, state or extra passes (InfoReg's and Re-learning's own files
# test theirs with their method state).
@pytest.mark.parametrize("name", ["ogm_ge", "mlb", "mmpareto", "mla", "pmr",
                                  "mslr", "mmcosine", "opm", "agm",
                                  "reconboost", "greedy", "valuation", "cml",
                                  "lfm", "amco"])
def test_smp_composes_with_every_method(name):
  """One step with SMP (audio trains alone): the image branch, including a
  method's own image head, does not move; the step compiles once, as the
  plain pattern when the method touches gradients."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  overrides = {"method": name, "smp": True}
  if name in ("ogm", "ogm_ge"):
    overrides[f"{name}.scope"] = "encoder"  # the tiny image encoder is an MLP
  if name == "opm":
    overrides["opm.p_exe"] = 1.0  # the feature drop runs on this step
  if name == "valuation":
    overrides["valuation.window.start"] = 0.0  # the extra losses run
  cfg = fx.tiny_config(**overrides)
  s = student_lib.build_student(cfg, ds, mesh)
  method, gate, step, state = s.method, s.gate, s.step, s.state
  hook = student_lib.make_epoch_hook(s, ds.splits["train"], 32, cfg.seed,
                                     mesh, val=ds.splits["val"])
  if hook is not None:
    state = hook(state, 0)
  before = jax.device_get(state.params)
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  batch["gate"] = gate.for_batch(batch, 0)
  assert batch["gate"]["pattern"] == 0
  new, metrics = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                      jax.random.key(0))
  metrics = metrics["scalars"]
  after = jax.device_get(new.params)
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["kappa/image"]) == 0.0
  frozen = [after["encoders"]["image"]] + (
      [after["aux"]["image"]] if "image" in after.get("aux", {}) else [])
  frozen0 = [before["encoders"]["image"]] + (
      [before["aux"]["image"]] if "image" in before.get("aux", {}) else [])
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen0)):
    np.testing.assert_array_equal(a, b)
  moved = any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(after["encoders"]["audio"]),
      jax.tree.leaves(before["encoders"]["audio"])))
  assert moved
  expect = 0 if method.spec.skip_frozen_exact else loader.ALL
  assert step.compiled_patterns() == {expect: 1}
