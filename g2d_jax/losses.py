"""The G2D objective (paper Sec. 3.1, Eq. 1-4) as pure functions.

Every function takes plain arrays (or dicts of arrays keyed by modality name)
and returns scalars; nothing here knows about models, configs or I/O, so these
can be lifted into any JAX training loop.

Shapes: B batch, C classes (or 1 output for regression), D feature width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

TASKS = ("classification", "regression")
FEATURE_REDUCTIONS = ("mean", "sum_features")


def per_sample_cross_entropy(logits_BxC: Array, labels_B: Array) -> Array:
  """Softmax cross-entropy of each sample with integer labels, [B]."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BxC, labels_B[:, None].astype(jnp.int32),
                              axis=-1)[:, 0]


def cross_entropy(logits_BxC: Array, labels_B: Array) -> Array:
  """Mean softmax cross-entropy with integer labels (Eq. 1, classification)."""
  return jnp.mean(per_sample_cross_entropy(logits_BxC, labels_B))


def regression_prediction(logits: Array) -> Array:
  """Maps raw model outputs [B] or [B, 1] to predictions in [0, 1] (sigmoid)."""
  return jax.nn.sigmoid(_squeeze_regression(logits).astype(jnp.float32))


def regression_mse(logits: Array, targets_B: Array) -> Array:
  """Eq. 1 for regression: MSE of sigmoid(outputs) and targets in [0, 1]."""
  pred_B = regression_prediction(logits)
  return jnp.mean((pred_B - targets_B.astype(jnp.float32)) ** 2)


def supervised_loss(logits: Array, labels_B: Array,
                    task: str = "classification") -> Array:
  """L_S (Eq. 1): cross-entropy of the logits, or for regression the MSE
  between their sigmoid and targets in [0, 1]."""
  if task == "classification":
    return cross_entropy(logits, labels_B)
  if task == "regression":
    return regression_mse(logits, labels_B)
  raise ValueError(f"task={task!r} is not one of {TASKS}.")


def feature_distillation(student_BxD: Array, teacher_BxD: Array,
                         reduction: str = "mean") -> Array:
  """Feature distillation L_feat^m (Eq. 2).

  Args:
    student_BxD: student features of one modality.
    teacher_BxD: the frozen teacher's features (gradient is stopped).
    reduction: "mean" averages the squared error over all B*D elements (the
      official code's `F.mse_loss`); "sum_features" sums over features and
      averages over the batch, i.e. the paper's E||f_s - f_t||^2, which is D
      times larger.

  Returns:
    A scalar.
  """
  if student_BxD.shape != teacher_BxD.shape:
    raise ValueError(
        f"student features {student_BxD.shape} and teacher features "
        f"{teacher_BxD.shape} differ in shape; the student encoder's output "
        "width must equal the teacher's (use the same encoder for both).")
  diff = (student_BxD.astype(jnp.float32)
          - jax.lax.stop_gradient(teacher_BxD).astype(jnp.float32))
  sq = diff.reshape(diff.shape[0], -1) ** 2
  if reduction == "mean":
    return jnp.mean(sq)
  if reduction == "sum_features":
    return jnp.mean(jnp.sum(sq, axis=-1))
  raise ValueError(f"feature_reduction={reduction!r} is not one of "
                   f"{FEATURE_REDUCTIONS}.")


def logit_distillation(student_logits_BxC: Array, teacher_logits_BxC: Array,
                       temperature: float = 1.0) -> Array:
  """Logit distillation L_logit^m (Eq. 3), Hinton direction.

  `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, summed over
  classes and averaged over the batch (PyTorch `kl_div(..., 'batchmean')`).
  """
  t = jnp.asarray(temperature, jnp.float32)
  logq_BxC = jax.nn.log_softmax(student_logits_BxC.astype(jnp.float32) / t,
                                axis=-1)
  logp_BxC = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits_BxC).astype(jnp.float32) / t,
      axis=-1)
  p_BxC = jnp.exp(logp_BxC)
  # p * (log p - log q), with 0 log 0 = 0 where the teacher puts no mass.
  kl_B = jnp.sum(jnp.where(p_BxC > 0, p_BxC * (logp_BxC - logq_BxC), 0.0),
                 axis=-1)
  return t * t * jnp.mean(kl_B)


def regression_logit_distillation(student_logits: Array,
                                  teacher_logits: Array) -> Array:
  """Logit distillation for regression: MSE between the two predictions.

  A regression teacher outputs a point estimate, not a distribution over
  classes, so there is no KL to take. We match predictions on the task's own
  scale: `mean_i (sigmoid(l_s(x_i)) - sigmoid(l_t(x_i)))^2`, i.e. the same
  loss as L_S with the teacher's prediction as the target.
  """
  return jnp.mean((regression_prediction(student_logits)
                   - jax.lax.stop_gradient(
                       regression_prediction(teacher_logits))) ** 2)


def g2d_loss(
    student_logits: Array,
    student_features: Mapping[str, Array],
    teacher_logits: Mapping[str, Array] | None,
    teacher_features: Mapping[str, Array] | None,
    labels: Array,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    task: str = "classification",
    feature_reduction: str = "mean",
) -> tuple[Array, dict[str, Any]]:
  """The G2D loss (Eq. 4):
  `L_S + alpha * sum_m L_feat^m + beta * sum_m L_logit^m`.

  Every teacher distils into the same fused student logits (as the official
  code does); per-modality cross-entropy terms are not part of the objective.

  Args:
    student_logits: fused student outputs, [B, C] (classification) or [B] /
      [B, 1] raw (pre-sigmoid) outputs (regression).
    student_features: {modality: [B, D]} pooled student encoder features.
    teacher_logits: {modality: [B, C]} frozen teacher outputs; modalities
      absent here get no logit term. None or {} disables the logit terms.
    teacher_features: {modality: [B, D]} frozen teacher features; modalities
      absent here get no feature term. None or {} disables the feature terms
      (UMT uses features only; "logit-only" KD uses logits only).
    labels: [B] integer classes, or [B] float targets in [0, 1] (regression).
    alpha: weight of the feature terms.
    beta: weight of the logit terms.
    temperature: KD temperature T (classification only).
    task: "classification" or "regression".
    feature_reduction: "mean" (official code) or "sum_features" (paper Eq. 2);
      see `feature_distillation`.

  Returns:
    (loss, parts) where parts = {"student": L_S, "feature": {m: L_feat^m},
    "logit": {m: L_logit^m}} holds the unweighted terms.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r} is not one of {TASKS}.")
  if feature_reduction not in FEATURE_REDUCTIONS:
    raise ValueError(f"feature_reduction={feature_reduction!r} is not one of "
                     f"{FEATURE_REDUCTIONS}.")
  teacher_logits = dict(teacher_logits or {})
  teacher_features = dict(teacher_features or {})
  missing = sorted(set(teacher_features) - set(student_features))
  if missing:
    raise ValueError(f"teacher_features has modalities {missing} that are "
                     f"not in student_features {sorted(student_features)}.")

  student_term = supervised_loss(student_logits, labels, task)
  if task == "classification":
    logit_terms = {
        m: logit_distillation(student_logits, t, temperature)
        for m, t in teacher_logits.items()
    }
  else:
    if temperature != 1.0:
      raise ValueError("temperature has no meaning for regression (the logit "
                       "term is an MSE between predictions); leave it at 1.0.")
    logit_terms = {
        m: regression_logit_distillation(student_logits, t)
        for m, t in teacher_logits.items()
    }
  feature_terms = {
      m: feature_distillation(student_features[m], t, feature_reduction)
      for m, t in teacher_features.items()
  }
  loss = student_term
  if feature_terms:
    loss = loss + alpha * sum(feature_terms.values())
  if logit_terms:
    loss = loss + beta * sum(logit_terms.values())
  return loss, {"student": student_term, "feature": feature_terms,
                "logit": logit_terms}


def _squeeze_regression(logits: Array) -> Array:
  if logits.ndim == 2 and logits.shape[-1] == 1:
    return logits[:, 0]
  if logits.ndim != 1:
    raise ValueError(f"regression outputs must be [B] or [B, 1], got "
                     f"{logits.shape}.")
  return logits
