"""G2D's objective (paper Eq. 4) over precomputed teacher outputs.

With SMP on (the default for this method: `config.smp` unset or True) the
step adds SMP gating, which makes this the full G2D method; with
`config.smp=False` it is the "G2D loss" row of the paper's Table 4.
"""

from __future__ import annotations

import ml_collections

from g2d_jax import losses
from g2d_jax.methods.base import Method


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Paper Eq. 4 and the official code: all weights 1, T = 1,
      # F.mse_loss features ("mean"); "sum_features" is the paper's Eq. 2.
      alpha=1.0, beta=1.0, temperature=1.0, feature_reduction="mean"))


def build(config: ml_collections.ConfigDict, task: str, **unused) -> Method:
  del unused
  c = config.g2d
  use_feat, use_logit = c.alpha != 0, c.beta != 0

  def loss(outputs, batch):
    teacher = batch["teacher"]
    value, parts = losses.g2d_loss(
        outputs.logits, outputs.features,
        teacher["logits"] if use_logit else None,
        teacher["features"] if use_feat else None,
        batch["label"], alpha=c.alpha, beta=c.beta,
        temperature=c.temperature, task=task,
        feature_reduction=c.feature_reduction)
    metrics = {"student": parts["student"]}
    metrics.update({f"feature/{m}": v for m, v in parts["feature"].items()})
    metrics.update({f"logit/{m}": v for m, v in parts["logit"].items()})
    return value, metrics

  needs = set()
  if use_feat:
    needs.add("features")
  if use_logit:
    needs.add("logits")
  return Method(name="g2d", loss=loss, teacher_outputs=frozenset(needs),
                smp_default=True)
