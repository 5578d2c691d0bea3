"""UMT: fused cross-entropy plus alpha x the feature MSE to the teachers."""

import numpy as np
import pytest

from g2d_jax.methods import umt
from g2d_jax.methods.base import StepContext
from g2d_jax.models import MultimodalOutput
from tests import pipeline_fixtures as fx


@pytest.mark.parametrize("alpha,reduction", [(1.0, "mean"), (10.0, "mean"),
                                             (1.0, "sum_features")])
def test_loss_by_hand(alpha, reduction):
  logits = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
  y = np.array([0, 1])
  fs = {"audio": np.array([[1.0, 2.0], [0.0, 0.0]], np.float32),
        "image": np.array([[1.0], [3.0]], np.float32)}
  ft = {"audio": np.array([[0.0, 2.0], [1.0, 1.0]], np.float32),
        "image": np.array([[1.0], [1.0]], np.float32)}
  cfg = fx.tiny_config(**{"method": "umt", "umt.alpha": alpha,
                          "umt.feature_reduction": reduction})
  method = umt.build(cfg, "classification")
  assert method.spec.teacher_outputs == frozenset({"features"})
  value, parts = umt.make_loss(cfg, "classification")(
      MultimodalOutput(logits, {}, fs), StepContext.of_batch(
          {"label": y, "teacher": {"features": ft}}))
  ce = -np.mean([np.log(np.e / (np.e + 1)), np.log(0.5)])
  # Squared errors: audio 1 + 0 + 1 + 1 = 3 over 4 elements (per sample:
  # 1 and 2), image 0 + 4 over 2 elements (per sample: 0 and 4).
  feat = {"mean": 3 / 4 + 4 / 2, "sum_features": 3 / 2 + 4 / 2}[reduction]
  assert float(parts["student"]) == pytest.approx(ce, rel=1e-6)
  assert float(value) == pytest.approx(ce + alpha * feat, rel=1e-6)
