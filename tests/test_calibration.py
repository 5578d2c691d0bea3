"""Expected calibration error: the core function against a hand-computed
example, and its batch-wise accumulation in evaluation."""

import jax
import numpy as np
import pytest

from g2d_jax import calibration
from g2d_jax.pipeline import common
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import metrics as metrics_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

# Five predictions over 3 classes, 5 equal-width bins (0.2 wide):
#   sample  max prob  predicted  label  correct  bin
#     0       0.9        0         0       1      (0.8, 1.0] -> 4
#     1       0.7        1         0       0      (0.6, 0.8] -> 3
#     2       0.6        2         2       1      (0.4, 0.6] -> 2 (0.6 is the
#                                                   bin's closed upper edge)
#     3       0.8        0         0       1      (0.6, 0.8] -> 3
#     4       0.5        1         2       0      (0.4, 0.6] -> 2
# bin 2: 2 samples, acc 1/2, conf (0.6 + 0.5)/2 = 0.55 -> 2/5 * 0.05 = 0.02
# bin 3: 2 samples, acc 1/2, conf 0.75              -> 2/5 * 0.25 = 0.10
# bin 4: 1 sample,  acc 1,   conf 0.9               -> 1/5 * 0.10 = 0.02
# ECE = 0.14
PROBS = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.2, 0.2, 0.6],
                  [0.8, 0.1, 0.1], [0.25, 0.5, 0.25]], np.float32)
LABELS = np.array([0, 0, 2, 0, 2], np.int32)


def test_ece_of_a_hand_computed_example():
  ece = calibration.expected_calibration_error(PROBS, LABELS, num_bins=5,
                                               from_logits=False)
  assert float(ece) == pytest.approx(0.14, abs=1e-6)
  count, correct, conf = map(np.asarray, calibration.calibration_bins(
      PROBS, LABELS, 5, from_logits=False))
  np.testing.assert_allclose(count, [0, 0, 2, 2, 1])
  np.testing.assert_allclose(correct, [0, 0, 1, 1, 1])
  np.testing.assert_allclose(conf, [0, 0, 1.1, 1.5, 0.9], rtol=1e-6)
  # Logits whose softmax is PROBS give the same value.
  from_logits = calibration.expected_calibration_error(np.log(PROBS), LABELS,
                                                       num_bins=5)
  assert float(from_logits) == pytest.approx(0.14, abs=1e-6)


def test_perfectly_calibrated_and_masked_predictions():
  # Confidence 1 and always right: ECE 0; masking out the wrong sample of a
  # two-sample batch leaves a perfect one.
  probs = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
  labels = np.array([0, 1], np.int32)
  assert float(calibration.expected_calibration_error(
      probs, labels, from_logits=False)) == pytest.approx(0.5)
  bins = calibration.calibration_bins(probs, labels, 15, from_logits=False,
                                      mask_B=np.array([1.0, 0.0]))
  assert float(calibration.ece_from_bins(*bins)) == 0.0
  assert float(calibration.ece_from_bins(*calibration.calibration_bins(
      probs, labels, 15, from_logits=False, mask_B=np.zeros(2)))) == 0.0


def test_evaluation_accumulates_ece_over_padded_batches():
  """`evaluate_split` (batches of 24 over 64 examples, the last one padded)
  reports the ECE of all the split's predictions at once, per head."""
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(method="joint")
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  model, tx, method, _, _ = student_lib.build(cfg, ds, 4)
  state = student_lib.new_state(cfg, ds, model, tx, method, mesh)
  res = common.evaluate_split(steps.make_eval_step(model, ds.task),
                              state.params, state.batch_stats,
                              ds.splits["test"], 24, mesh, ds.task)
  x = ds.splits["test"].batch(np.arange(64))
  out = model.apply({"params": state.params,
                     "batch_stats": state.batch_stats},
                    {m: x[m] for m in ds.modalities}, train=False)
  for head, logits in [("fused", out.logits),
                       ("modality/audio", out.modality_logits["audio"])]:
    want = calibration.expected_calibration_error(logits, x["label"])
    assert res[f"ece/{head}"] == pytest.approx(float(want), abs=1e-6)
    acc = np.mean(np.argmax(logits, -1) == x["label"])
    assert res[f"accuracy/{head}"] == pytest.approx(acc)
  assert not any(k.startswith("ece_bins/") for k in res)


def test_evaluation_reports_true_class_prob_and_teacher_feature_cosine():
  """Per head, the mean softmax probability of the true class; with cached
  teacher features, the mean student-teacher cosine per modality (NumPy)."""
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(method="joint")
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  model, tx, method, _, _ = student_lib.build(cfg, ds, 4)
  state = student_lib.new_state(cfg, ds, model, tx, method, mesh)
  x = ds.splits["test"].batch(np.arange(64))
  out = model.apply({"params": state.params,
                     "batch_stats": state.batch_stats},
                    {m: x[m] for m in ds.modalities}, train=False)
  rng = np.random.default_rng(3)
  teacher = {m: {"features": rng.normal(size=np.shape(out.features[m]))
                 .astype(np.float32)} for m in ds.modalities}
  res = common.evaluate_split(steps.make_eval_step(model, ds.task),
                              state.params, state.batch_stats,
                              ds.splits["test"], 24, mesh, ds.task,
                              teacher=teacher)
  for head, logits in [("fused", out.logits),
                       ("modality/image", out.modality_logits["image"])]:
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.mean(p[np.arange(64), x["label"]])
    assert res[f"true_class_prob/{head}"] == pytest.approx(want, rel=1e-5)
  for m in ds.modalities:
    s_, t_ = np.asarray(out.features[m], np.float64), teacher[m]["features"]
    cos = np.sum(s_ * t_, -1) / (np.linalg.norm(s_, axis=-1)
                                 * np.linalg.norm(t_, axis=-1))
    assert res[f"cosine/{m}"] == pytest.approx(np.mean(cos), abs=1e-5)
  plain = common.evaluate_split(steps.make_eval_step(model, ds.task),
                                state.params, state.batch_stats,
                                ds.splits["test"], 24, mesh, ds.task)
  assert not any(k.startswith("cosine/") for k in plain)


def test_summarize_counts_turns_bins_into_ece():
  sums = {"count": 5.0, "correct/fused": 3.0}
  _, correct, conf = calibration.calibration_bins(PROBS, LABELS, 5,
                                                  from_logits=False)
  for b in range(5):
    sums[f"ece_bins/fused/correct/{b:02d}"] = float(correct[b])
    sums[f"ece_bins/fused/conf/{b:02d}"] = float(conf[b])
  out = metrics_lib.summarize_counts(sums, steps=1)
  assert out == pytest.approx({"accuracy/fused": 0.6, "ece/fused": 0.14})
