"""Joint training: the fused cross-entropy (or regression MSE) alone."""

import numpy as np
import pytest

from g2d_jax.methods import joint
from g2d_jax.models import MultimodalOutput
from tests import pipeline_fixtures as fx


def test_loss_is_the_fused_cross_entropy():
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], np.float32)
  y = np.array([0, 1])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = -np.mean(np.log([p[0, 0], p[1, 1]]))  # 1.1386...
  method = joint.build(fx.tiny_config(method="joint"), "classification")
  value, parts = method.loss(MultimodalOutput(logits, {}, {}), {"label": y})
  assert float(value) == pytest.approx(want, rel=1e-6)
  assert parts == {"student": value}
  assert method.skip_frozen_exact and not method.smp_default


def test_regression_uses_mse_of_sigmoid_outputs():
  out = np.array([[0.0], [2.0]], np.float32)
  y = np.array([0.25, 1.0], np.float32)
  method = joint.build(fx.tiny_config(method="joint"), "regression")
  value, _ = method.loss(MultimodalOutput(out, {}, {}), {"label": y})
  s = 1 / (1 + np.exp(-2.0))
  assert float(value) == pytest.approx(((0.5 - 0.25) ** 2 + (s - 1) ** 2) / 2,
                                       rel=1e-6)
