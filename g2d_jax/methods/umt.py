"""UMT, Uni-Modal Teacher (Du et al., "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023): feature distillation from
frozen unimodal teachers into a late-fusion student, plus the fused
objective: `L = L_S + alpha * sum_m MSE(f_s^m, f_t^m)` on the pooled encoder
features, with the teachers' features from the precomputed cache.

The UMT authors released no code. The loss follows BalanceBenchmark's
reimplementation and the G2D authors' feature-only KD preset
(`aTF+vTF-to-mS` in rAIson-Lab/G2D), which most likely served as the
paper's UMT (an inference: that code does not name it):
`feature_reduction="mean"` is their `F.mse_loss` over all B x D elements and
`alpha=1` their weight (BalanceBenchmark uses 10, for epochs 0-80).
"""

from __future__ import annotations

import ml_collections

from g2d_jax import losses
from g2d_jax.methods.base import LossFn
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import standard_update


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # G2D repo's feature-KD preset: weight 1, F.mse_loss (mean over B x D).
      # BalanceBenchmark's UMT trainer: scaling 10.
      alpha=1.0,
      feature_reduction="mean",   # "mean" | "sum_features" (per-sample |.|^2)
  ))


def make_loss(config: ml_collections.ConfigDict, task: str) -> LossFn:
  """L_S + alpha * sum_m MSE(f_s^m, f_t^m)."""
  c = config.umt

  def loss(outputs, ctx):
    value, parts = losses.g2d_loss(
        outputs.logits, outputs.features, None,
        ctx.batch["teacher"]["features"], ctx.labels, alpha=c.alpha, task=task,
        feature_reduction=c.feature_reduction)
    metrics = {"student": parts["student"]}
    metrics.update({f"feature/{m}": v for m, v in parts["feature"].items()})
    return value, metrics

  return loss


def build(config: ml_collections.ConfigDict, task: str, **unused) -> Method:
  del unused
  return Method("umt", standard_update(make_loss(config, task)), MethodSpec(
      teacher_outputs=frozenset({"features"}), skip_frozen_exact=True))
