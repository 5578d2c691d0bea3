"""Scoring a model on a split: accuracy and ECE accumulated over padded
batches, true-class probabilities, teacher-feature cosines and a method's
own heads, each against NumPy on the same predictions."""

import jax
import numpy as np
import pytest

from g2d_jax import calibration
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import scoring
from tests import pipeline_fixtures as fx


def scored(method, teacher_features=False):
  """A fresh student of `method` on the tiny test split: (scores of
  `evaluate_split` in batches of 24, the 64 samples, the model outputs on
  them in one batch, the teacher features given, scores without them)."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  model, state = fx.student(fx.tiny_config(method=method), ds, mesh)
  x = ds.splits["test"].batch(np.arange(64))
  out = model.apply({"params": state.params,
                     "batch_stats": state.batch_stats},
                    {m: x[m] for m in ds.modalities}, train=False)
  rng = np.random.default_rng(3)
  teacher = {m: {"features": rng.normal(size=np.shape(out.features[m]))
                 .astype(np.float32)} for m in ds.modalities}
  score = lambda t: scoring.evaluate_split(
      scoring.make_eval_step(model, ds.task), state.params,
      state.batch_stats, ds.splits["test"], 24, mesh, teacher=t)
  res = score(teacher if teacher_features else None)
  return res, x, out, teacher, (score(None) if teacher_features else res)



def test_evaluation_accumulates_ece_over_padded_batches():
  """`evaluate_split` (batches of 24 over 64 examples, the last one padded)
  reports the ECE of all the split's predictions at once, per head."""
  res, x, out, _, _ = scored("joint")
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
  res, x, out, teacher, plain = scored("joint", teacher_features=True)
  for head, logits in [("fused", out.logits),
                       ("modality/image", out.modality_logits["image"])]:
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.mean(p[np.arange(64), x["label"]])
    assert res[f"true_class_prob/{head}"] == pytest.approx(want, rel=1e-5)
  for m in ("audio", "image"):
    s_, t_ = np.asarray(out.features[m], np.float64), teacher[m]["features"]
    cos = np.sum(s_ * t_, -1) / (np.linalg.norm(s_, axis=-1)
                                 * np.linalg.norm(t_, axis=-1))
    assert res[f"cosine/{m}"] == pytest.approx(np.mean(cos), abs=1e-5)
  assert not any(k.startswith("cosine/") for k in plain)


def test_method_unimodal_heads_are_scored_as_aux():
  """MLB's own unimodal heads (what its released code reports) are scored
  beside the fusion's per-modality logits."""
  res, x, out, _, _ = scored("mlb")
  for m in ("audio", "image"):
    want = np.mean(np.argmax(out.head_logits[m], -1) == x["label"])
    assert res[f"accuracy/aux/{m}"] == pytest.approx(want)
