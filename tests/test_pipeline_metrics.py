"""Metric sums: the typed layout of one batch by hand, accumulation over
batches, and the summary (rates, ECE from the bins, averaged scalars)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.methods.heads import MethodOutput
from g2d_jax.models import MultimodalOutput
from g2d_jax.pipeline import metrics

# The calibration example of test_calibration.py (ECE 0.14 over 5 bins).
PROBS = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.2, 0.2, 0.6],
                  [0.8, 0.1, 0.1], [0.25, 0.5, 0.25]], np.float32)
LABELS = np.array([0, 0, 2, 0, 2], np.int32)


def outputs(with_aux=False):
  logits = jnp.log(PROBS)
  audio = jnp.log(PROBS[::-1])            # right on samples 2 and 4
  image = jnp.zeros((5, 3)).at[:, 0].set(1.0)   # always class 0
  if with_aux:
    return MethodOutput(logits, {"audio": audio, "image": image}, {}, {},
                        {"audio": image, "image": audio})
  return MultimodalOutput(logits, {"audio": audio, "image": image}, {})


def test_batch_sums_by_hand():
  s = metrics.prediction_sums(outputs(), LABELS, "classification",
                              mask=jnp.array([1, 1, 1, 1, 0]),
                              calibration_bins=5)
  assert set(s) == {"count", "correct", "true_class_prob", "ece_bins"}
  assert float(s["count"]) == 4
  # fused right on 0, 2, 3 (4 is masked); audio's reversed rows: argmax of
  # rows 4,3,2,1,0 = 1,0,2,1,0 vs labels 0,0,2,0,2 -> 1, 2 right; image
  # says 0: right on 0, 1, 3.
  assert jax_tree_float(s["correct"]) == {
      "fused": 3.0, "modality": {"audio": 2.0, "image": 3.0}}
  assert float(s["true_class_prob"]["fused"]) == pytest.approx(
      0.9 + 0.2 + 0.6 + 0.8, rel=1e-6)
  assert s["ece_bins"]["modality"]["audio"]["conf"].shape == (5,)
  with_aux = metrics.prediction_sums(outputs(True), LABELS, "classification")
  assert float(with_aux["correct"]["aux"]["image"]) == 2.0   # audio's rows
  assert float(with_aux["correct"]["aux"]["audio"]) == 3.0
  assert "ece_bins" not in with_aux


def test_regression_sums_absolute_errors_of_the_sigmoid():
  out = MultimodalOutput(jnp.array([[0.0], [2.0]]), {"a": jnp.zeros((2, 1))},
                         {})
  s = metrics.prediction_sums(out, jnp.array([0.25, 1.0]), "regression")
  sig = 1 / (1 + np.exp(-2.0))
  assert float(s["abs_err"]["fused"]) == pytest.approx(0.25 + (1 - sig),
                                                       rel=1e-6)
  assert float(s["abs_err"]["modality"]["a"]) == pytest.approx(0.25 + 0.5)
  assert metrics.summarize(s)["mae/fused"] == pytest.approx(
      (0.25 + 1 - sig) / 2, rel=1e-6)


def test_accumulated_sums_summarize_to_rates_ece_and_mean_scalars():
  first = metrics.prediction_sums(outputs(), LABELS[:5], "classification",
                                  calibration_bins=5)
  first["scalars"] = {"loss": jnp.float32(2.0), "kappa/audio": jnp.float32(1)}
  second = dict(first, scalars={"loss": jnp.float32(4.0),
                                "kappa/audio": jnp.float32(0)})
  total = metrics.add(metrics.add(None, first), second)
  assert float(total["count"]) == 10
  out = metrics.summarize(total, steps=2)
  assert out["accuracy/fused"] == pytest.approx(0.6)
  assert out["accuracy/modality/image"] == pytest.approx(0.6)
  assert out["accuracy/modality/audio"] == pytest.approx(0.4)
  assert out["ece/fused"] == pytest.approx(0.14, abs=1e-6)
  assert out["true_class_prob/fused"] == pytest.approx(
      (0.9 + 0.2 + 0.6 + 0.8 + 0.25) / 5, rel=1e-6)
  assert (out["loss"], out["kappa/audio"]) == (3.0, 0.5)
  assert not any(k.startswith(("ece_bins", "correct", "count")) for k in out)
  # A checkpoint stores the sums as JSON; read back they add up the same.
  back = metrics.from_json(json.loads(json.dumps(
      jax_tree_float(total, as_list=True))))
  assert metrics.summarize(metrics.add(back, second), steps=3)["loss"] == (
      pytest.approx((2 + 4 + 4) / 3))
  assert metrics.summarize(None) == {}


def jax_tree_float(tree, as_list=False):
  if isinstance(tree, dict):
    return {k: jax_tree_float(v, as_list) for k, v in tree.items()}
  arr = np.asarray(tree, np.float64)
  return arr.tolist() if as_list else float(arr)
