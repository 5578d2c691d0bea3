"""Joint training: the fused objective alone (the paper's "Joint-Train"; the
GeWu-Lab family's `one_joint_loss.py`)."""

from __future__ import annotations

import ml_collections

from g2d_jax import losses
from g2d_jax.methods.base import Method


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict()  # no hyperparameters


def supervised_loss(logits, labels, task: str):
  """Eq. 1: CE on fused logits, or MSE of sigmoid outputs for regression."""
  if task == "regression":
    return losses.regression_mse(logits, labels)
  return losses.cross_entropy(logits, labels)


def build(config: ml_collections.ConfigDict, task: str, **unused) -> Method:
  del config, unused

  def loss(outputs, batch):
    value = supervised_loss(outputs.logits, batch["label"], task)
    return value, {"student": value}

  return Method(name="joint", loss=loss)
