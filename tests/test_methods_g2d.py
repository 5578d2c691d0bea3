"""G2D as a method: the alpha = 0 / beta = 0 switches that drop teacher
outputs, and one whole training step (SMP gate, Eq. 4 loss, gated SGD) on a
tiny model against a NumPy derivation by hand."""

import jax
import ml_collections
import numpy as np
import pytest

from g2d_jax.data import base
from g2d_jax.methods import g2d
from g2d_jax.methods.base import StepContext
from g2d_jax.models import MultimodalOutput
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")


@pytest.mark.parametrize("alpha,beta,needs", [
    (1.0, 1.0, {"features", "logits"}), (0.0, 1.0, {"logits"}),
    (1.0, 0.0, {"features"}), (0.0, 0.0, set())])
def test_zero_weights_drop_their_teacher_outputs(alpha, beta, needs):
  cfg = fx.tiny_config(**{"g2d.alpha": alpha, "g2d.beta": beta})
  method = g2d.build(cfg, "classification")
  assert method.spec.teacher_outputs == frozenset(needs)
  # The loss runs on a batch holding only what the spec asked for.
  logits = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
  feats = {m: np.ones((2, 3), np.float32) for m in MODS}
  teacher = {}
  if "logits" in needs:
    teacher["logits"] = {m: np.zeros((2, 2), np.float32) for m in MODS}
  if "features" in needs:
    teacher["features"] = {m: np.zeros((2, 3), np.float32) for m in MODS}
  batch = {"label": np.array([0, 1])}
  if teacher:
    batch["teacher"] = teacher
  value, parts = g2d.make_loss(cfg, "classification")(
      MultimodalOutput(logits, {}, feats), StepContext.of_batch(batch))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  ce = -np.mean(np.log([p[0, 0], p[1, 1]]))
  # KL(uniform || p) per sample, batch mean; feature MSE to zeros is 1.
  kl = np.mean(np.sum(0.5 * (np.log(0.5) - np.log(p)), -1))
  want = ce + alpha * 2 * 1.0 * ("features" in needs) + (
      beta * 2 * kl * ("logits" in needs))
  assert float(value) == pytest.approx(want, rel=1e-5)
  assert {k.split("/")[0] for k in parts} == {"student"} | {
      {"features": "feature", "logits": "logit"}[n] for n in needs}


def tiny_mlp_dataset():
  rng = np.random.default_rng(0)
  splits = {}
  for s in ("train", "val", "test"):
    splits[s] = base.Split(
        inputs={"audio": rng.normal(size=(8, 4)).astype(np.float32),
                "image": rng.normal(size=(8, 2)).astype(np.float32)},
        labels=rng.integers(0, 3, 8).astype(np.int32),
        scales={"audio": 1.0, "image": 1.0})
  return base.MultimodalDataset(
      "tiny_g2d_step", MODS, splits, 3, "classification",
      base.make_fingerprint("tiny_g2d_step", {}, splits, "classification"))


def numpy_g2d_step(p, x, y, t_logits, t_feats, lr, wd, alpha, beta, trains):
  """Eq. 4's loss and one SGD (+ weight decay) step on the modalities in
  `trains`, with the gradients derived by hand for h = relu(x W + b),
  l_m = h V + c, logits = (l_a + l_i) / 2."""
  b = len(y)
  onehot = np.eye(3)[y]
  h, pre, l = {}, {}, {}
  for m in MODS:
    enc = p["encoders"][m]
    pre[m] = x[m] @ enc["backbone"]["dense0"]["kernel"] + enc["backbone"][
        "dense0"]["bias"]
    h[m] = np.maximum(pre[m], 0.0)
    l[m] = h[m] @ enc["head"]["kernel"] + enc["head"]["bias"]
  z = (l["audio"] + l["image"]) / 2
  q = np.exp(z - z.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  pt = {m: np.exp(t_logits[m]) / np.exp(t_logits[m]).sum(-1, keepdims=True)
        for m in MODS}
  loss = -np.mean(np.log(q[np.arange(b), y]))
  loss += alpha * sum(np.mean((h[m] - t_feats[m]) ** 2) for m in MODS)
  loss += beta * sum(np.mean(np.sum(pt[m] * (np.log(pt[m]) - np.log(q)), -1))
                     for m in MODS)
  # dL/dz: CE gives (q - onehot) / B, each KL(p_m || q) gives (q - p_m) / B.
  dz = (q - onehot + beta * sum(q - pt[m] for m in MODS)) / b
  new = jax.tree.map(np.array, p)
  for m in MODS:
    enc = p["encoders"][m]
    dl = dz / 2
    dh = dl @ enc["head"]["kernel"].T + alpha * 2 * (h[m] - t_feats[m]) / (
        h[m].size)
    dpre = dh * (pre[m] > 0)
    grads = {"head": {"kernel": h[m].T @ dl, "bias": dl.sum(0)},
             "backbone": {"dense0": {"kernel": x[m].T @ dpre,
                                     "bias": dpre.sum(0)}}}
    if m in trains:
      new["encoders"][m] = jax.tree.map(
          lambda w, g: w - lr * (g + wd * w), enc, grads)
  return loss, new


def test_one_g2d_training_step_equals_the_hand_derived_update():
  ds = tiny_mlp_dataset()
  mlp = dict(kind="mlp", hidden_dims=(3,))
  cfg = fx.tiny_config(**{
      "model.encoders": ml_collections.ConfigDict({m: dict(mlp) for m in MODS}),
      "student.batch_size": 8, "student.optimizer.lr": 0.1,
      "student.optimizer.momentum": 0.9,
      "student.optimizer.weight_decay": 1e-3, "g2d.alpha": 0.7,
      "g2d.beta": 1.3})
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(cfg, ds, mesh)
  params0 = jax.tree.map(np.asarray, jax.device_get(s.state.params))
  rng = np.random.default_rng(5)
  x = {m: ds.splits["train"].inputs[m] for m in MODS}
  y = ds.splits["train"].labels
  # The audio teacher is barely right, the image teacher sure: audio is the
  # least confident and trains alone in epoch 0 (tau_1 = 1).
  t_logits = {"audio": rng.normal(size=(8, 3)).astype(np.float32) * 0.1,
              "image": 4.0 * np.eye(3, dtype=np.float32)[y]}
  t_feats = {m: rng.normal(size=(8, 3)).astype(np.float32) for m in MODS}
  batch = {"index": np.arange(8, dtype=np.int32), "label": y, "inputs": x,
           "teacher": {"logits": t_logits, "features": t_feats}}
  batch["gate"] = s.gate.for_batch(batch, 0)
  assert batch["gate"]["pattern"] == 0          # audio alone
  new, metrics = s.step(s.state, mesh_lib.shard_batch(batch, mesh),
                        np.int32(0), jax.random.key(0))
  want_loss, want = numpy_g2d_step(params0, x, y, t_logits, t_feats, lr=0.1,
                                   wd=1e-3, alpha=0.7, beta=1.3,
                                   trains=("audio",))
  scalars = jax.device_get(metrics["scalars"])
  assert float(scalars["loss"]) == pytest.approx(want_loss, rel=1e-5)
  assert (float(scalars["kappa/audio"]), float(scalars["kappa/image"])) == (
      1.0, 0.0)
  got = jax.device_get(new.params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The frozen image branch did not move at all.
  for a, b in zip(jax.tree.leaves(got["encoders"]["image"]),
                  jax.tree.leaves(params0["encoders"]["image"])):
    np.testing.assert_array_equal(a, b)
  assert int(new.step) == 1
