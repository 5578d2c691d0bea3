"""Joint training: the fused cross-entropy (or regression MSE) alone."""

import numpy as np
import pytest

from g2d_jax import methods
from g2d_jax.methods import joint
from g2d_jax.methods.base import StepContext
from g2d_jax.models import MultimodalOutput
from tests import pipeline_fixtures as fx


def test_loss_is_the_fused_cross_entropy():
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], np.float32)
  y = np.array([0, 1])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = -np.mean(np.log([p[0, 0], p[1, 1]]))  # 1.1386...
  cfg = fx.tiny_config(method="joint")
  loss = joint.make_loss(cfg, "classification")
  value, parts = loss(MultimodalOutput(logits, {}, {}),
                      StepContext.of_batch({"label": y}))
  assert float(value) == pytest.approx(want, rel=1e-6)
  assert parts == {"student": value}
  method = joint.build(cfg, "classification")
  assert method.spec.skip_frozen_exact and not methods.smp_default("joint")


def test_regression_uses_mse_of_sigmoid_outputs():
  out = np.array([[0.0], [2.0]], np.float32)
  y = np.array([0.25, 1.0], np.float32)
  loss = joint.make_loss(fx.tiny_config(method="joint"), "regression")
  value, _ = loss(MultimodalOutput(out, {}, {}),
                  StepContext.of_batch({"label": y}))
  s = 1 / (1 + np.exp(-2.0))
  assert float(value) == pytest.approx(((0.5 - 0.25) ** 2 + (s - 1) ** 2) / 2,
                                       rel=1e-6)
