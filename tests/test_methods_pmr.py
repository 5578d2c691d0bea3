"""PMR: prototype logits, the loss against a NumPy transcription of the
released code, the prototype update, and the epoch hook (including a resumed
run, whose prototypes come from the checkpoint)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.methods import pmr
from g2d_jax.methods.base import StepContext
from g2d_jax.models import MultimodalOutput
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx


softmax = fx.softmax


def ce(logits, y):
  return -np.mean(np.log(softmax(logits))[np.arange(len(y)), y])


def eu_dist(x1, x2):
  """main_Prototype_grad.py's EU_dist, transcribed."""
  return np.array([[np.sqrt(np.dot(a - b, a - b)) for b in x2] for a in x1])


def released_loss(out, a, v, a_proto, v_proto, label, alpha):
  audio_sim, visual_sim = -eu_dist(a, a_proto), -eu_dist(v, v_proto)
  score_a_p = sum(softmax(audio_sim)[i][label[i]] for i in range(len(label)))
  score_v_p = sum(softmax(visual_sim)[i][label[i]]
                  for i in range(len(label)))
  ratio_a_p = score_a_p / score_v_p
  beta, lam = (0, alpha) if ratio_a_p > 1 else (
      (alpha, 0) if ratio_a_p < 1 else (0, 0))
  return (ce(out, label) + beta * ce(audio_sim, label)
          + lam * ce(visual_sim, label))


def test_prototype_logits_are_negative_distances():
  rng = np.random.default_rng(0)
  f, p = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
  np.testing.assert_allclose(pmr.prototype_logits(jnp.float32(f),
                                                  jnp.float32(p)),
                             -eu_dist(f, p), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_loss_matches_the_released_code(seed):
  rng = np.random.default_rng(seed)
  a, v = rng.normal(size=(8, 6)), rng.normal(size=(8, 5)) * 1.5
  protos = {"audio": rng.normal(size=(4, 6)), "image": rng.normal(size=(4, 5))}
  out = rng.normal(size=(8, 4))
  y = rng.integers(0, 4, 8)
  loss = pmr.make_loss(fx.tiny_config(method="pmr"), "classification")
  outputs = MultimodalOutput(jnp.float32(out), {},
                             {"audio": jnp.float32(a), "image": jnp.float32(v)})
  state = jax.tree.map(jnp.float32, protos)
  value, parts = loss(outputs, StepContext.of_batch(
      {"label": y}, epoch=0, method_state=state))
  want = released_loss(out, a, v, protos["audio"], protos["image"], y, 2.0)
  assert float(value) == pytest.approx(want, rel=1e-5)
  assert sorted(float(parts[f"pmr/weight/{m}"]) for m in protos) == [0., 2.]
  # Outside the window (epochs 0..70) only the fused CE remains.
  late, _ = loss(outputs, StepContext.of_batch(
      {"label": y}, epoch=71, method_state=state))
  assert float(late) == pytest.approx(ce(out, y), rel=1e-5)


def test_prototype_update_ema_from_the_third_computation_and_absent_classes():
  old = {"audio": jnp.full((3, 2), 10.0)}
  sums = {"sum/audio": jnp.array([[2.0, 4.0], [0.0, 0.0], [3.0, 3.0]]),
          "count": jnp.array([2.0, 0.0, 1.0])}
  for epoch, mu_used in ((0, False), (1, False), (2, True)):
    new = pmr.update_prototypes(old, sums, np.int32(epoch), momentum=0.25)
    mean = np.array([[1.0, 2.0], [10.0, 10.0], [3.0, 3.0]])
    want = 0.75 * mean + 0.25 * 10.0 if mu_used else mean
    np.testing.assert_allclose(new["audio"], want, rtol=1e-6)


def test_epoch_hook_computes_class_means_in_inference_mode():
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="pmr")
  s = student_lib.build_student(cfg, ds, mesh)
  model, state = s.model, s.state
  assert jax.tree.map(np.shape, state.method_state) == {
      "audio": (4, 8), "image": (4, 16)}
  hook = student_lib.make_epoch_hook(s, ds.splits["train"], 32, cfg.seed,
                                     mesh)
  new = hook(state, 1)
  # 4 batches per epoch: max(1, 4 // 10) = 1 batch, the epoch's first.
  batch = next(loader.train_batches(ds.splits["train"], 32, seed=cfg.seed,
                                    epoch=1))
  out, _ = steps.apply_model(model, state.params, state.batch_stats,
                             batch["inputs"], train=False)
  for m in ("audio", "image"):
    f = np.asarray(out.features[m])
    for c in range(4):
      rows = f[batch["label"] == c]
      want = rows.mean(0) if len(rows) else np.zeros(f.shape[1])
      np.testing.assert_allclose(new.method_state[m][c], want, rtol=1e-5,
                                 atol=1e-6)


def test_resumed_training_equals_uninterrupted(tmp_path):
  cfg = fx.tiny_config(**{"method": "pmr", "student.epochs": 2,
                          "student.checkpoint_every_steps": 3})
  # Stop at step 6 (resume from the epoch-0 checkpoint: the hook reruns),
  # then at step 7 (resume mid-epoch 1 from the step-7 checkpoint: the
  # prototypes come from the checkpoint, the hook does not run).
  fx.assert_resume_exact(cfg, fx.tiny_dataset(), tmp_path, stops=(6, 3))
