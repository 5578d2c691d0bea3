"""G2D's objective (paper Eq. 4) over precomputed teacher outputs.

With SMP on (the default for this method: `config.smp` unset or True) the
step adds SMP gating, which makes this the full G2D method; with
`config.smp=False` it is the "G2D loss" row of the paper's Table 4.
"""

from __future__ import annotations

import ml_collections

from g2d_jax import losses
from g2d_jax.methods.base import LossFn
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import standard_update

# G2D is its loss plus SMP: SMP is on unless --config.smp=False (the "G2D
# loss" row of Table 4).
SMP_DEFAULT = True


# The leaderboard's tuning grid: the paper's Table 12 weights, (alpha,
# beta) of the feature and logit terms.
TUNING_GRID = {"alpha": (1.0, 0.0), "beta": (1.0, 0.5, 2.0)}

# The official config: SGD 1e-3, StepLR(200) of 300 epochs.
RELEASED_OPTIMIZER = dict(name="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4,
                          decay_fractions=(2 / 3,), decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Paper Eq. 4 and the official code: all weights 1, T = 1,
      # F.mse_loss features ("mean"); "sum_features" is the paper's Eq. 2.
      alpha=1.0, beta=1.0, temperature=1.0, feature_reduction="mean"))


def teacher_outputs(config: ml_collections.ConfigDict) -> frozenset[str]:
  """The teacher outputs the loss reads: a term weighted 0 needs none."""
  c = config.g2d
  return frozenset(({"features"} if c.alpha != 0 else set())
                   | ({"logits"} if c.beta != 0 else set()))


def distillation_loss(task: str, *, alpha: float = 1.0, beta: float = 1.0,
                      temperature: float = 1.0,
                      feature_reduction: str = "mean",
                      teacher_outputs: frozenset[str] = frozenset(
                          {"features", "logits"})) -> LossFn:
  """Eq. 4 over the cached teacher outputs named in `teacher_outputs` (the
  others' terms are left out); metrics `student`, `feature/<m>`,
  `logit/<m>`. UMT is this loss with features only."""

  def loss(outputs, ctx):
    teacher = ctx.batch.get("teacher", {})
    value, parts = losses.g2d_loss(
        outputs.logits, outputs.features,
        teacher["logits"] if "logits" in teacher_outputs else None,
        teacher["features"] if "features" in teacher_outputs else None,
        ctx.labels, alpha=alpha, beta=beta, temperature=temperature,
        task=task, feature_reduction=feature_reduction)
    metrics = {"student": parts["student"]}
    metrics.update({f"feature/{m}": v for m, v in parts["feature"].items()})
    metrics.update({f"logit/{m}": v for m, v in parts["logit"].items()})
    return value, metrics

  return loss


def make_loss(config: ml_collections.ConfigDict, task: str) -> LossFn:
  """Eq. 4 with `config.g2d`'s weights."""
  c = config.g2d
  return distillation_loss(
      task, alpha=c.alpha, beta=c.beta, temperature=c.temperature,
      feature_reduction=c.feature_reduction,
      teacher_outputs=teacher_outputs(config))


def build(config: ml_collections.ConfigDict, task: str, **unused) -> Method:
  del unused
  return Method("g2d", standard_update(make_loss(config, task)), MethodSpec(
      teacher_outputs=teacher_outputs(config), skip_frozen_exact=True))
