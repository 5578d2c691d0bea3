"""Teacher confidence rho_m (paper Sec. 3.2, Eq. 5)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from g2d_jax import losses

Array = jax.Array


def true_class_probability(logits_BxC: Array, labels_B: Array) -> Array:
  """softmax(logits)[i, y_i] for every sample, [B]."""
  p_BxC = jax.nn.softmax(logits_BxC.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(p_BxC, labels_B[:, None].astype(jnp.int32),
                             axis=-1)[:, 0]


def teacher_confidence(teacher_logits: Mapping[str, Array], labels: Array, *,
                       task: str = "classification") -> dict[str, Array]:
  """Batch confidence of each frozen teacher (Eq. 5).

  Classification: `rho_m = mean_i softmax(l_t^m(x_i))[y_i]`, the teacher's
  average probability of the true class over the batch (the official code sums
  instead of averaging; the ranking is the same).

  Regression analogue: `rho_m = 1 - mean_i |sigmoid(l_t^m(x_i)) - y_i|` with
  targets y in [0, 1]. Like Eq. 5 it lies in [0, 1] and is 1 for a perfect
  teacher, so the same ranking rule (least confident first) applies.

  Args:
    teacher_logits: {modality: [B, C]} (or [B] / [B, 1] for regression).
    labels: [B] integer labels, or float targets in [0, 1] for regression.
    task: "classification" or "regression".

  Returns:
    {modality: scalar float32}.
  """
  if task == "classification":
    return {m: jnp.mean(true_class_probability(l, labels))
            for m, l in teacher_logits.items()}
  if task == "regression":
    y_B = labels.astype(jnp.float32)
    return {m: 1.0 - jnp.mean(jnp.abs(losses.regression_prediction(l) - y_B))
            for m, l in teacher_logits.items()}
  raise ValueError(f"task={task!r} is not one of {losses.TASKS}.")
