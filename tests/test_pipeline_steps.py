"""The jitted student step: gating patterns, frozen-branch skipping, data
parallelism."""

import jax
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx


def batch_with_teacher(ds, logits_audio, logits_image, n=32, image_dim=16):
  b = next(loader.train_batches(ds.splits["train"], n, seed=0, epoch=0))
  rng = np.random.default_rng(1)
  b["teacher"] = {
      "logits": {"audio": np.tile(np.float32(logits_audio), (n, 1)),
                 "image": np.tile(np.float32(logits_image), (n, 1))},
      "features": {"audio": rng.normal(size=(n, 8)).astype(np.float32),
                   "image": rng.normal(size=(n, image_dim)).astype(
                       np.float32)}}
  b["label"] = np.zeros(n, np.int32)  # teacher confidence = p[0]
  return b


# Teacher logits giving: audio weaker (audio trains), image weaker.
AUDIO_WEAK = ([0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0])
IMAGE_WEAK = ([3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0])


def one_step(config, ds, batch, epoch, mesh):
  s = student_lib.build_student(config, ds, mesh)
  batch = dict(batch, gate=s.gate.for_batch(batch, epoch))
  new_state, metrics = s.step(s.state, mesh_lib.shard_batch(batch, mesh),
                              np.int32(epoch), jax.random.key(0))
  return jax.device_get(new_state), jax.device_get(metrics["scalars"])


@pytest.mark.parametrize("semantics", ["freeze", "reference"])
@pytest.mark.parametrize("teacher,epoch,expect", [
    (AUDIO_WEAK, 0, {"audio": 1.0, "image": 0.0}),
    (IMAGE_WEAK, 0, {"audio": 0.0, "image": 1.0}),
    (AUDIO_WEAK, 1, {"audio": 1.0, "image": 1.0}),
])
def test_skipping_frozen_backward_gives_identical_parameters(
    semantics, teacher, epoch, expect):
  # `reference` gates conv kernels only, so both encoders are CNNs here.
  ds = fx.tiny_dataset(image_map=True)
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  batch = batch_with_teacher(ds, *teacher, image_dim=8)
  results = {}
  for skip in (False, True):
    cfg = fx.tiny_config(**{"gating.skip_frozen_backward": skip,
                            "gating.semantics": semantics}, **fx.CNN_IMAGE)
    results[skip] = one_step(cfg, ds, batch, epoch, mesh)
  (plain, mp), (fast, mf) = results[False], results[True]
  assert {m: float(mp[f"kappa/{m}"]) for m in ("audio", "image")} == expect
  assert {m: float(mf[f"kappa/{m}"]) for m in ("audio", "image")} == expect
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fast)):
    np.testing.assert_array_equal(a, b)
  # And the frozen branch really did not move under "freeze".
  if semantics == "freeze":
    init = jax.device_get(student_lib.build_student(
        fx.tiny_config(**fx.CNN_IMAGE), ds, mesh).state.params)
    for m, k in expect.items():
      same = all(np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(init["encoders"][m]),
          jax.tree.leaves(fast.params["encoders"][m])))
      assert same == (k == 0.0), m


@pytest.mark.parametrize("semantics", ["freeze", "reference"])
def test_pattern_step_skips_the_frozen_branch_backward(semantics):
  """The step specialised to "only image trains" does strictly less work
  (XLA's FLOP count) than the plain gated step; under `freeze` the whole
  audio backward goes, so even less than under `reference`."""
  ds = fx.tiny_dataset(image_map=True)
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  batch = batch_with_teacher(ds, *IMAGE_WEAK, image_dim=8)
  flops = {}
  for sem in ("freeze", "reference"):
    cfg = fx.tiny_config(**{"gating.semantics": sem}, **fx.CNN_IMAGE)
    s = student_lib.build_student(cfg, ds, mesh)
    b = dict(batch, gate=s.gate.for_batch(batch, 0))
    pattern, b = s.step.split_pattern(b)
    assert pattern == 1        # image alone
    dev = mesh_lib.shard_batch(b, mesh)
    for pattern in (loader.ALL, 1):
      compiled = s.step.jitted(pattern).lower(
          s.state, dev, np.int32(0), jax.random.key(0)).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      flops[sem, pattern] = cost["flops"]
  assert flops[semantics, 1] < flops[semantics, loader.ALL]
  assert flops["freeze", 1] < flops["reference", 1]


def test_data_parallel_step_equals_single_device_step():
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config()
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  one, m1 = one_step(cfg, ds, batch, 1, mesh_lib.data_mesh(jax.devices()[:1]))
  four, m4 = one_step(cfg, ds, batch, 1, mesh_lib.data_mesh(jax.devices()[:4]))
  assert len(jax.devices()) == 4
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_compiles_once_across_epochs_and_gating_patterns():
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(cfg, ds, mesh)
  gate, step, state = s.gate, s.step, s.state
  patterns = []
  for epoch, teacher in [(0, AUDIO_WEAK), (0, IMAGE_WEAK), (1, AUDIO_WEAK),
                         (2, IMAGE_WEAK), (0, AUDIO_WEAK)]:
    batch = batch_with_teacher(ds, *teacher)
    batch["gate"] = gate.for_batch(batch, epoch)
    patterns.append(batch["gate"]["pattern"])
    state, _ = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(epoch),
                    jax.random.key(0))
  # audio (0) alone, image (1) alone, then all (-1): one compilation each.
  assert patterns == [0, 1, loader.ALL, loader.ALL, 0]
  assert step.compiled_patterns() == {0: 1, 1: 1, loader.ALL: 1}


def test_gate_partial_suppression_inside_window_only():
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(**{"gating.suppression": "partial",
                          "gating.partial_strength": 0.5})
  gate = loader.GateSpec(cfg, ds.modalities, "classification")
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  g = gate.for_batch(batch, 0)
  kappa, rho = g["kappa"], g["confidence"]
  assert g["pattern"] == loader.ALL  # fractional gates never skip
  p = lambda z: np.exp(z) / np.exp(z).sum()
  ra, ri = p(np.array(AUDIO_WEAK[0]))[0], p(np.array(AUDIO_WEAK[1]))[0]
  assert float(rho["audio"]) == pytest.approx(ra, rel=1e-5)
  assert float(kappa["image"]) == pytest.approx(1 - np.tanh(0.5 * ri / ra),
                                                rel=1e-5)
  assert float(kappa["audio"]) == 1.0
  kappa = gate.for_batch(batch, 1)["kappa"]
  assert float(kappa["image"]) == 1.0 and float(kappa["audio"]) == 1.0


BN_IMAGE = {"model.encoders.image": dict(kind="mlp", hidden_dims=(16,),
                                         use_batchnorm=True)}


@pytest.mark.parametrize("scope", ["branch", "encoder"])
@pytest.mark.parametrize("stats", ["update", "hold"])
def test_freeze_scope_and_frozen_batch_statistics(scope, stats):
  """Audio trains alone: what of the frozen image branch moves."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  runs = {}
  for skip in (False, True):
    cfg = fx.tiny_config(**{"gating.freeze_scope": scope,
                            "gating.frozen_batch_stats": stats,
                            "gating.skip_frozen_backward": skip}, **BN_IMAGE)
    runs[skip] = one_step(cfg, ds, batch, 0, mesh)
  (plain, metrics), (fast, _) = runs[False], runs[True]
  assert (float(metrics["kappa/audio"]), float(metrics["kappa/image"])) == (
      1.0, 0.0)
  # Skipping the frozen encoder's backward stays exact under either scope.
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fast)):
    np.testing.assert_array_equal(a, b)
  init = jax.device_get(student_lib.build_student(
      fx.tiny_config(**BN_IMAGE), ds, mesh).state)
  moved = lambda a, b: not all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(a), jax.tree.leaves(b)))
  image, image0 = fast.params["encoders"]["image"], init.params["encoders"][
      "image"]
  assert not moved(image["backbone"], image0["backbone"])
  assert moved(image["head"], image0["head"]) == (scope == "encoder")
  assert moved(fast.params["encoders"]["audio"], init.params["encoders"][
      "audio"])
  stats_moved = moved(fast.batch_stats["encoders"]["image"],
                      init.batch_stats["encoders"]["image"])
  assert stats_moved == (stats == "update")


def test_train_mode_feature_scale_cuts_a_modality_out_of_the_gradient():
  """`apply_model(train=True, feature_scale=...)` (what `ctx.forward`
  passes on): zeroing every pooled unit of audio leaves the loss blind to
  the audio encoder and head kernel (zero gradient; the late-fusion head's
  bias still counts) but not to the image encoder, while
  audio's BatchNorm statistics still move (the encoder still ran); a scale
  of ones is the plain pass."""
  from g2d_jax import losses  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import steps  # pylint: disable=g-import-not-at-top
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(fx.tiny_config(method="joint"), ds, mesh)
  batch = fx.first_batch(ds)
  params, stats = jax.device_get(s.state.params), s.state.batch_stats
  dim = jax.eval_shape(lambda: steps.apply_model(
      s.model, params, stats, batch["inputs"], train=False)[0]
      ).features["audio"].shape[-1]

  def grads(scale):
    def fn(p):
      out, new = steps.apply_model(s.model, p, stats, batch["inputs"],
                                   train=True, feature_scale=scale)
      return losses.cross_entropy(out.logits, batch["label"]), (out, new)
    return jax.grad(fn, has_aux=True)(params)

  g0, (out0, new0) = grads({"audio": np.zeros(dim, np.float32)})
  g1, (out1, _) = grads({"audio": np.ones(dim, np.float32)})
  gp, (outp, _) = grads(None)
  audio = dict(g0["encoders"]["audio"])
  head = audio.pop("head")
  assert sorted(audio) and all(float(np.max(np.abs(a))) == 0.0
                               for a in jax.tree.leaves(audio))
  assert float(np.max(np.abs(head["kernel"]))) == 0.0
  assert float(np.max(np.abs(head["bias"]))) > 0
  assert max(float(np.max(np.abs(a))) for a in
             jax.tree.leaves(g0["encoders"]["image"])) > 0
  np.testing.assert_array_equal(np.asarray(out0.features["audio"]), 0.0)
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
           zip(jax.tree.leaves(new0["encoders"]["audio"]),
               jax.tree.leaves(stats["encoders"]["audio"]))]
  assert max(moved) > 0
  np.testing.assert_allclose(np.asarray(out1.logits), np.asarray(outp.logits),
                             rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(gp)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)


def test_bfloat16_activations_keep_float32_parameters_and_losses():
  """model.dtype="bfloat16": the convolutions and matmuls run in bfloat16,
  while parameters, gradients' updates, BatchNorm statistics and the
  outputs the losses see stay float32, and one step lands near the float32
  step (bfloat16 keeps 8 bits of mantissa: relative error ~0.4%)."""
  ds = fx.tiny_dataset()
  runs = {}
  for dtype in ("float32", "bfloat16"):
    cfg = fx.tiny_config(method="joint", **{"model.dtype": dtype})
    runs[dtype] = fx.one_step(cfg, ds, 0)
  model, params0, bs0, batch, params1, metrics = runs["bfloat16"]
  assert model.compute_dtype == "bfloat16"
  jaxpr = str(jax.make_jaxpr(lambda p: steps.apply_model(
      model, p, bs0, batch["inputs"], train=True)[0])(params0))
  convs = [line for line in jaxpr.splitlines()
           if "conv_general_dilated" in line or "dot_general" in line]
  assert convs and all("bf16" in line for line in convs), convs
  out, new_bs = steps.apply_model(model, params0, bs0, batch["inputs"],
                                  train=True)
  assert {x.dtype for x in jax.tree.leaves(out)} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(new_bs)} == {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(params1)} == {np.dtype("float32")}
  ref = runs["float32"]
  np.testing.assert_allclose(metrics["loss"], ref[5]["loss"], rtol=2e-2)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(ref[4])):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-3)
  with pytest.raises(ConfigError, match="config.model.dtype='float16'"):
    config_lib.validate(fx.tiny_config(**{"model.dtype": "float16"}), 1,
                        ("audio", "image"))


def test_step_donates_its_state_and_never_touches_the_host():
  """The jitted step consumes the state it is given (donated buffers: no
  second copy of parameters and optimizer state) and, with its arguments
  on the device, moves nothing between host and device (transfer guard).
  Runs on whatever backend the suite runs on (experiments/device_check.sh
  runs it on a GPU)."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(fx.tiny_config(), ds, mesh)
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  batch["gate"] = s.gate.for_batch(batch, 1)
  args = (mesh_lib.shard_batch(batch, mesh),
          jax.device_put(np.int32(1), mesh_lib.replicated(mesh)),
          jax.device_put(jax.random.key(0), mesh_lib.replicated(mesh)))
  warm, _ = s.step(s.state, *args)   # compiles (compilation may transfer)
  old = jax.tree.leaves(warm)
  with jax.transfer_guard("disallow"):
    new, metrics = s.step(warm, *args)
    jax.block_until_ready((new, metrics))
  assert all(x.is_deleted() for x in old if isinstance(x, jax.Array))
  assert not any(x.is_deleted() for x in jax.tree.leaves(new))
