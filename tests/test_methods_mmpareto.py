"""MMPareto: the min-norm weights and the per-tensor combination against a
NumPy transcription of the released code, and the two-backward gradient
computation against separate gradients of each loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.methods import mmpareto
from g2d_jax.methods.base import StepContext
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")


def released_from2(v1v1, v1v2, v2v2):
  """MinNormSolver._min_norm_element_from2, transcribed."""
  if v1v2 >= v1v1:
    return 0.999
  if v1v2 >= v2v2:
    return 0.001
  return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def released_combine(g_mm, g_uni, gamma=1.5):
  """code/MMPareto.py for one modality: {name: tensor} -> {name: tensor}."""
  flat_mm = np.concatenate([g.ravel() for g in g_mm.values()])
  flat_uni = np.concatenate([g.ravel() for g in g_uni.values()])
  cos = flat_mm @ flat_uni / (np.linalg.norm(flat_mm) *
                              np.linalg.norm(flat_uni))
  if cos > 0:
    k = (0.5, 0.5)
  else:
    c = released_from2(flat_mm @ flat_mm, flat_mm @ flat_uni,
                       flat_uni @ flat_uni)
    k = (c, 1 - c)
  out = {}
  for name in g_mm:
    three_norm = np.linalg.norm(g_mm[name] + g_uni[name])
    new = 2 * k[0] * g_mm[name] + 2 * k[1] * g_uni[name]
    diff = three_norm / np.linalg.norm(new)
    out[name] = diff * new * gamma if diff > 1 else new * gamma
  return out, k


def test_min_norm_weight_cases():
  assert float(mmpareto.min_norm_weight(1.0, 2.0, 5.0)) == pytest.approx(.999)
  assert float(mmpareto.min_norm_weight(5.0, 2.0, 1.0)) == pytest.approx(.001)
  # |c v1 + (1-c) v2|^2 is minimal at c = (1 + 1) / (4 + 1 + 2) = 2/7.
  assert float(mmpareto.min_norm_weight(4.0, -1.0, 1.0)) == pytest.approx(
      2 / 7, rel=1e-6)


def tree(rng, flip=1.0):
  g = lambda *s: rng.normal(size=s).astype(np.float32)
  return {"encoders": {m: {"backbone": {"c": g(3, 3, 2, 4), "b": g(4)},
                           "head": {"kernel": g(4, 3)}} for m in MODS},
          "fusion": {"w": g(2, 3)}}


def test_pareto_grads_match_the_released_loop():
  rng = np.random.default_rng(0)
  g_mm = tree(rng)
  g_uni = tree(rng)
  # audio: unimodal gradient mostly opposite (conflict); image: aligned.
  a_mm = g_mm["encoders"]["audio"]["backbone"]
  g_uni["encoders"]["audio"]["backbone"] = {
      k: -0.5 * v + 0.1 * g_uni["encoders"]["audio"]["backbone"][k]
      for k, v in a_mm.items()}
  i_mm = g_mm["encoders"]["image"]["backbone"]
  g_uni["encoders"]["image"]["backbone"] = {
      k: v + 0.3 * g_uni["encoders"]["image"]["backbone"][k]
      for k, v in i_mm.items()}
  out, weights = mmpareto.pareto_grads(g_mm, g_uni, MODS, 1.5)
  for m, conflict in (("audio", True), ("image", False)):
    want, k = released_combine(g_mm["encoders"][m]["backbone"],
                               g_uni["encoders"][m]["backbone"])
    assert (k[0] != 0.5) == conflict
    assert float(weights[m][0]) == pytest.approx(k[0], rel=1e-5)
    for name, w in want.items():
      np.testing.assert_allclose(out["encoders"][m]["backbone"][name], w,
                                 rtol=1e-4, atol=1e-5)
    if not conflict:  # no conflict: exactly 1.5 x the summed gradient
      np.testing.assert_allclose(
          out["encoders"][m]["backbone"]["c"],
          1.5 * (g_mm["encoders"][m]["backbone"]["c"]
                 + g_uni["encoders"][m]["backbone"]["c"]), rtol=1e-5)
    # Heads keep the plain sum.
    np.testing.assert_allclose(
        out["encoders"][m]["head"]["kernel"],
        g_mm["encoders"][m]["head"]["kernel"]
        + g_uni["encoders"][m]["head"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(out["fusion"]["w"],
                             g_mm["fusion"]["w"] + g_uni["fusion"]["w"])


def test_update_applies_the_pareto_gradient_of_the_separate_losses():
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="mmpareto")
  s = student_lib.build_student(cfg, ds, mesh)
  model, method, state = s.model, s.method, s.state
  params = jax.device_get(state.params)
  batch = next(loader.train_batches(ds.splits["train"], 32, seed=0, epoch=0))
  y = batch["label"]
  forward = lambda p, inputs=None: steps.apply_model(
      model, p, state.batch_stats,
      batch["inputs"] if inputs is None else inputs, train=True)
  ce = lambda l: -jnp.mean(jax.nn.log_softmax(l)[jnp.arange(32), y])
  g_mm = jax.grad(lambda p: ce(forward(p)[0].logits))(params)
  g_uni = jax.grad(lambda p: sum(ce(l) for l in
                                 forward(p)[0].head_logits.values()))(params)
  applied = []

  def optimizer_update(grads, p, opt_state, mask):
    assert mask is None
    applied.append(grads)
    return p, opt_state

  ctx = StepContext(batch=batch, epoch=np.int32(0), step=np.int32(0),
                    rng=jax.random.key(0), params=params, opt_state=None,
                    batch_stats=state.batch_stats, method_state=None,
                    forward=forward, optimizer_update=optimizer_update)
  res = method.update(ctx)
  loss, parts, (grads,) = res.loss, res.metrics, applied
  assert float(loss) == pytest.approx(
      float(ce(forward(params)[0].logits))
      + sum(float(parts[f"unimodal/{m}"]) for m in MODS), rel=1e-6)
  for m in MODS:
    enc = lambda t, m=m: jax.tree.map(np.asarray,
                                      t["encoders"][m]["backbone"])
    flat = lambda t, enc=enc: {jax.tree_util.keystr(p): v for p, v in
                               jax.tree_util.tree_flatten_with_path(
                                   enc(t))[0]}
    want, k = released_combine(flat(g_mm), flat(g_uni))
    assert float(parts[f"mmpareto/k_mm/{m}"]) == pytest.approx(k[0], rel=1e-4)
    for name, w in want.items():
      np.testing.assert_allclose(flat(grads)[name], w, rtol=2e-4, atol=1e-6)
  # Everything else is the plain sum, e.g. the unimodal heads.
  np.testing.assert_allclose(grads["aux"]["audio"]["kernel"],
                             g_mm["aux"]["audio"]["kernel"]
                             + g_uni["aux"]["audio"]["kernel"], rtol=1e-5,
                             atol=1e-7)
