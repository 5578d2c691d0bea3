"""MLA: the GS projection against the OWM formula in NumPy, the sub-update
masks, and one batch's two sub-updates against two sequential plain SGD
steps computed independently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.methods import heads
from g2d_jax.methods import mla
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")


def test_gs_alpha_and_owm_update():
  assert float(mla.gs_alpha(0, 10)) == pytest.approx(0.1)
  assert float(mla.gs_alpha(5, 10)) == pytest.approx(0.1 ** 1.5, rel=1e-6)
  rng = np.random.default_rng(0)
  h = rng.normal(size=(6, 4)).astype(np.float32)
  p0 = np.eye(4) + 0.1 * np.ones((4, 4))
  # OWM: r = mean(h), k = P r^T, P - k k^T / (alpha + r k), then / |P|_F.
  r = h.mean(0, keepdims=True).astype(np.float64)
  k = p0 @ r.T
  p = p0 - (k @ k.T) / (0.05 + (r @ k)[0, 0])
  p /= np.linalg.norm(p)
  np.testing.assert_allclose(mla.gs_update(jnp.float32(p0), h, 0.05), p,
                             rtol=1e-5, atol=1e-6)
  # On a Flax kernel (D, C), torch's grad_W @ P^T is P @ grad_kernel.
  g = rng.normal(size=(4, 3)).astype(np.float32)
  np.testing.assert_allclose(mla.project_kernel_grad(jnp.float32(p), g),
                             (g.T @ p.T).T, rtol=1e-5)


def test_sub_update_masks():
  assert mla.sub_update_masks(("a", "b", "c"), True) == [
      {"a": 1, "b": 0, "c": 0}, {"a": 1, "b": 1, "c": 0},
      {"a": 1, "b": 1, "c": 1}]
  assert mla.sub_update_masks(("a", "b"), False) == [
      {"a": 1, "b": 0}, {"a": 0, "b": 1}]


def setup(**overrides):
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "mla", **overrides})
  s = student_lib.build_student(cfg, ds, mesh)
  model, method, gate, step, state = s.model, s.method, s.gate, s.step, s.state
  batch = next(loader.train_batches(ds.splits["train"], 32, seed=0, epoch=0))
  batch["gate"] = gate.for_batch(batch, 0)
  return ds, mesh, model, method, step, state, batch


def test_two_sub_updates_equal_two_sequential_sgd_steps():
  _, mesh, model, method, step, state, batch = setup(**{
      "mla.gs_projection": False, "mla.released_zero_grads": False,
      "student.optimizer.momentum": 0.0,
      "student.optimizer.weight_decay": 0.0})
  assert method.spec.updates_per_step == 2
  p = jax.device_get(state.params)
  # The tiny encoders' widths differ (8 vs 16): image is projected to 8.
  assert p["aux"]["image"]["proj"]["kernel"].shape == (16, 8)
  y = batch["label"]

  def sub_loss(params, m):
    out, _ = steps.apply_model(model, params, state.batch_stats,
                               batch["inputs"], train=True)
    head = params["aux"]["shared_head"]
    logits = heads.linear(head, out.head_inputs[m])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), y])

  for m in MODS:  # audio first, then image with the updated head
    g = jax.grad(sub_loss)(p, m)
    p = jax.tree.map(lambda a, b: a - 0.05 * b, p, g)
  new, metrics = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                      jax.random.key(0))
  for a, b in zip(jax.tree.leaves(jax.device_get(new.params)),
                  jax.tree.leaves(p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(new.method_state["count"]) == 2
  metrics = metrics["scalars"]
  assert float(metrics["loss"]) == pytest.approx(
      0.5 * float(metrics["loss/unimodal/audio"])
      + 0.5 * float(metrics["loss/unimodal/image"]), rel=1e-6)


def test_projection_skips_the_first_sub_step_then_projects_the_head():
  _, mesh, model, method, step, state, batch = setup()
  out, _ = steps.apply_model(model, jax.device_get(state.params),
                             state.batch_stats, batch["inputs"], train=True)
  new, _ = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                jax.random.key(0))
  # Sub-step 1 (audio) is the first of training: P stays I; sub-step 2
  # (image) updates it with the image head inputs and alpha_0 = 0.1.
  h = np.asarray(out.head_inputs["image"], np.float64)
  r = h.mean(0, keepdims=True)
  k = r.T
  want = np.eye(8) - (k @ k.T) / (0.1 + (r @ k)[0, 0])
  want /= np.linalg.norm(want)
  np.testing.assert_allclose(new.method_state["P"], want, rtol=1e-4,
                             atol=1e-6)


def test_fused_logits_are_the_weighted_shared_head_logits():
  ds, _, model, _, _, state, _ = setup(**{"mla.fusion_weights": (0.7, 0.3)})
  x = ds.splits["test"].batch(np.arange(8))
  out = model.apply({"params": state.params,
                     "batch_stats": state.batch_stats},
                    {m: x[m] for m in MODS}, train=False)
  head = state.params["aux"]["shared_head"]
  for m in MODS:
    np.testing.assert_allclose(out.modality_logits[m],
                               heads.linear(head, out.head_inputs[m]),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.logits, 0.7 * out.modality_logits["audio"]
                             + 0.3 * out.modality_logits["image"],
                             rtol=1e-5, atol=1e-6)


def test_released_zero_grads_give_the_earlier_modality_a_decay_only_step():
  """torch 1.8.1 semantics: in the image sub-step the audio parameters have
  zero gradients and still get weight decay (here without momentum)."""
  results = {}
  for released in (False, True):
    _, mesh, _, _, step, state, batch = setup(**{
        "mla.gs_projection": False, "mla.released_zero_grads": released,
        "student.optimizer.momentum": 0.0,
        "student.optimizer.weight_decay": 0.01})
    new, _ = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                  jax.random.key(0))
    results[released] = jax.device_get(new.params)
  plain, released = results[False], results[True]
  for a, b in zip(jax.tree.leaves(plain["encoders"]["audio"]),
                  jax.tree.leaves(released["encoders"]["audio"])):
    np.testing.assert_allclose(b, a * (1 - 0.05 * 0.01), rtol=1e-6,
                               atol=1e-8)
  for key in ("image", "shared_head"):
    for a, b in zip(jax.tree.leaves(plain["aux"][key]),
                    jax.tree.leaves(released["aux"][key])):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_reference_gating_semantics_are_refused():
  with pytest.raises(Exception, match="semantics='freeze'"):
    setup(**{"gating.semantics": "reference"})


def test_encoder_freeze_scope_keeps_the_sub_update_masks_on_the_branch():
  """MLA masks whole branches per sub-update; with freeze_scope=encoder
  (a separate optimizer group for each modality's non-encoder leaves) the
  mask still covers them, so without SMP the result is the same."""
  results = {}
  for scope in ("branch", "encoder"):
    _, mesh, _, _, step, state, batch = setup(**{"gating.freeze_scope":
                                                 scope})
    new, _ = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                  jax.random.key(0))
    results[scope] = jax.device_get(new.params)
  for a, b in zip(jax.tree.leaves(results["branch"]),
                  jax.tree.leaves(results["encoder"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
