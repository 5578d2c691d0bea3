"""Joint training: the fused objective alone (the paper's "Joint-Train"; the
GeWu-Lab family's `one_joint_loss.py`)."""

from __future__ import annotations

import ml_collections

from g2d_jax import losses
from g2d_jax.methods.base import LossFn
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import standard_update


# The leaderboard's tuning grid (experiments/leaderboard.py): joint
# training has no hyperparameter of its own, so it tunes the learning rate.
TUNING_GRID = {"student.optimizer.lr_scale": (1.0, 0.5, 2.0)}

# The released optimizer (OGM-GE family, CREMA-D): SGD 1e-3, StepLR(70)
# of 100 epochs.
RELEASED_OPTIMIZER = dict(name="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4,
                          decay_fractions=(0.7,), decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict()  # no hyperparameters


def make_loss(config: ml_collections.ConfigDict, task: str) -> LossFn:
  """L_S (Eq. 1) of the fused logits."""
  del config

  def loss(outputs, ctx):
    value = losses.supervised_loss(outputs.logits, ctx.labels, task)
    return value, {"student": value}

  return loss


def build(config: ml_collections.ConfigDict, task: str, **unused) -> Method:
  del unused
  return Method("joint", standard_update(make_loss(config, task)),
                MethodSpec(skip_frozen_exact=True))
