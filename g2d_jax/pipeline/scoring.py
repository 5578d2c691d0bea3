"""Scoring a model on a split: the jitted evaluation step and its driver."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from g2d_jax import calibration
from g2d_jax.data.base import Split
from g2d_jax.pipeline import distributed
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import metrics as metrics_lib
from g2d_jax.pipeline import steps

Array = jax.Array

ECE_BINS = 15  # equal-width confidence bins of the evaluation ECE


def feature_cosine(student_BxD: Array, teacher_BxD: Array) -> Array:
  """Per-sample cosine similarity [B] of student and teacher features (the
  feature-alignment analysis of the paper's Fig. 5); 0 for a zero vector."""
  s = student_BxD.astype(jnp.float32)
  t = teacher_BxD.astype(jnp.float32)
  norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
  return jnp.sum(s * t, axis=-1) / jnp.maximum(norms, 1e-12)


def batch_sums(outputs: Any, batch: Mapping[str, Any], task: str
               ) -> metrics_lib.Sums:
  """An evaluation batch's sums: predictions per head with ECE bins and
  true-class probabilities, and, when the batch carries cached teacher
  features, the student-teacher feature cosine per modality."""
  sums = metrics_lib.prediction_sums(outputs, batch["label"], task,
                                     batch["mask"], calibration_bins=ECE_BINS)
  teacher = batch.get("teacher", {}).get("features", {})
  cosine = {m: jnp.sum(batch["mask"] * feature_cosine(outputs.features[m], t))
            for m, t in teacher.items()
            if m in outputs.features and outputs.features[m].shape == t.shape}
  if cosine:
    sums["cosine"] = cosine
  return sums


def make_eval_step(model: nn.Module, task: str) -> Callable[..., Any]:
  """`eval_step(params, batch_stats, batch) -> sums` (`batch_sums`) of the
  model in inference mode; a batch with `present` ({m: [B] 0/1}) is scored
  with those modalities missing."""

  def eval_step(params, batch_stats, batch):
    out, _ = steps.apply_model(model, params, batch_stats, batch["inputs"],
                               train=False, present=batch.get("present"))
    return batch_sums(out, batch, task)

  return jax.jit(eval_step)


def evaluate_split(eval_step: Any, params: Any, batch_stats: Any, split: Split,
                   batch_size: int, mesh: jax.sharding.Mesh,
                   teacher: Mapping[str, Any] | None = None,
                   present: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, float]:
  """Accuracy (or MAE), ECE and confidences of every head on a split.

  With `teacher` (the split's cached teacher outputs) the scores also hold
  the student-teacher feature cosine per modality (`cosine/<m>`). With
  `present` ({m: [N] 0/1}) the model is scored with missing modalities.
  """
  pending = []
  keys = frozenset({"features"}) if teacher else frozenset()
  for batch in loader.eval_batches(split, batch_size, teacher=teacher,
                                   teacher_keys=keys, present=present):
    pending.append(eval_step(params, batch_stats,
                             mesh_lib.shard_batch(batch, mesh)))
  total = None
  for sums in jax.device_get(pending):
    total = metrics_lib.add(total, sums)
  return metrics_lib.summarize(total)


def collect_logits(predict: Callable[..., Any], params: Any, batch_stats: Any,
                   split: Split, batch_size: int, mesh: jax.sharding.Mesh
                   ) -> dict[str, np.ndarray]:
  """Every head's logits on a split, {"fused" | "modality/<m>" | "aux/<m>":
  [N, C]} (host float32), from `predict(params, batch_stats, inputs) ->
  outputs` (jitted by the caller)."""
  parts: dict[str, list[np.ndarray]] = {}
  for k, batch in enumerate(loader.eval_batches(split, batch_size)):
    out = predict(params, batch_stats, mesh_lib.shard_batch(batch["inputs"],
                                                            mesh))
    heads = distributed.to_host(
        metrics_lib.flatten(metrics_lib.head_logits(out)))
    n = min(batch_size, len(split) - k * batch_size)  # the global batch's
    for h, v in heads.items():
      parts.setdefault(h, []).append(np.asarray(v, np.float32)[:n])
  return {h: np.concatenate(v) for h, v in parts.items()}


def temperature_scaling(predict: Callable[..., Any], params: Any,
                        batch_stats: Any, splits: Mapping[str, Split],
                        batch_size: int, mesh: jax.sharding.Mesh
                        ) -> dict[str, Any]:
  """Post-hoc temperature scaling of every head (`calibration`): T fitted
  on the validation split, ECE on test before and after.

  Returns:
    {"temperature", "test_ece", "test_ece_calibrated", "val_nll",
    "val_nll_calibrated"}, each {head: float}.
  """
  val = collect_logits(predict, params, batch_stats, splits["val"],
                       batch_size, mesh)
  test = collect_logits(predict, params, batch_stats, splits["test"],
                        batch_size, mesh)
  y_val, y_test = splits["val"].labels, splits["test"].labels
  out: dict[str, dict[str, float]] = {
      k: {} for k in ("temperature", "test_ece", "test_ece_calibrated",
                      "val_nll", "val_nll_calibrated")}
  ece = lambda logits: float(calibration.expected_calibration_error(
      jnp.asarray(logits), jnp.asarray(y_test), ECE_BINS))
  for head, logits in val.items():
    t = calibration.fit_temperature(logits, y_val)
    out["temperature"][head] = t
    out["val_nll"][head] = calibration.nll_at_temperature(logits, y_val, 1.0)
    out["val_nll_calibrated"][head] = calibration.nll_at_temperature(
        logits, y_val, t)
    out["test_ece"][head] = ece(test[head])
    out["test_ece_calibrated"][head] = ece(test[head] / t)
  return out
