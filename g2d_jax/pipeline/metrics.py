"""Metric sums as a typed pytree, accumulated over batches and summarised.

Steps (training and evaluation) return additive sums over their batch, with
one fixed layout, so that adding batches and summarising them are tree maps:

    {"count": n,                              # samples (unmasked)
     "correct": heads,                        # classification: right answers
     "abs_err": heads,                        # regression: sum |y_hat - y|
     "true_class_prob": heads,                # sum of p(true class)
     "ece_bins": {head: {"correct": [M], "conf": [M]}},
     "cosine": {m: sum},                      # student-teacher feature cosine
     "scalars": {name: value}}                # per-step values (training)

where `heads` = {"fused": x, "modality": {m: x}, "aux": {m: x}} (the fused
output, each modality's own logits inside the model, a method's extra
heads). Every entry but `count` is optional. `summarize` turns the sums into
rates named by their path, as the metrics files and summaries show them:
`accuracy/fused`, `accuracy/modality/audio`, `mae/fused`,
`true_class_prob/aux/image`, `ece/fused`, `cosine/audio`, and the scalars
averaged over the steps (`loss`, `kappa/audio`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from g2d_jax import calibration
from g2d_jax import losses

Array = jax.Array
Sums = dict[str, Any]

# sum name -> the rate it becomes (divided by the sample count).
PER_SAMPLE = {"correct": "accuracy", "abs_err": "mae",
              "true_class_prob": "true_class_prob", "cosine": "cosine"}


def head_logits(outputs: Any) -> dict[str, Any]:
  """The heads a model's outputs offer, in the `heads` layout."""
  heads = {"fused": outputs.logits, "modality": dict(outputs.modality_logits)}
  # A method's own unimodal heads (MLB, MMPareto): what their released code
  # reports as the modalities' accuracy.
  extra = getattr(outputs, "head_logits", None)
  if extra:
    heads["aux"] = dict(extra)
  return heads


def prediction_sums(outputs: Any, labels: Array, task: str,
                    mask: Array | None = None,
                    calibration_bins: int = 0) -> Sums:
  """Sums of one batch's predictions (jittable).

  Args:
    outputs: model outputs (`logits`, `modality_logits`, maybe
      `head_logits`).
    labels: [B] classes or targets.
    task: "classification" or "regression".
    mask: [B] 0/1 weights (padded evaluation batches); None counts all.
    calibration_bins: M > 0 also sums each head's true-class probability and
      its M-bin calibration sums (classification).
  """
  w = (jnp.ones(labels.shape, jnp.float32) if mask is None
       else mask.astype(jnp.float32))
  heads = head_logits(outputs)
  sums: Sums = {"count": jnp.sum(w)}
  if task == "regression":
    sums["abs_err"] = jax.tree.map(lambda l: jnp.sum(
        w * jnp.abs(losses.regression_prediction(l) - labels)), heads)
    return sums
  sums["correct"] = jax.tree.map(
      lambda l: jnp.sum(w * (jnp.argmax(l, -1) == labels)), heads)
  if calibration_bins:
    # Eq. 5's confidence of each head, for the paper's confidence-ratio
    # analysis (Fig. 6).
    def true_class_prob(l):
      p = jnp.take_along_axis(jax.nn.softmax(l.astype(jnp.float32), -1),
                              labels[:, None].astype(jnp.int32), -1)[:, 0]
      return jnp.sum(w * p)

    def bins(l):
      _, correct_M, conf_M = calibration.calibration_bins(
          l, labels, calibration_bins, mask_B=w)
      return {"correct": correct_M, "conf": conf_M}

    sums["true_class_prob"] = jax.tree.map(true_class_prob, heads)
    sums["ece_bins"] = jax.tree.map(bins, heads)
  return sums


def to_host(sums: Sums) -> Sums:
  """Device sums as float64 NumPy values (the host accumulates in float64)."""
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(sums))


def add(total: Sums | None, sums: Sums) -> Sums:
  """`total + sums`, leaf by leaf (host, float64); `total` None starts."""
  sums = to_host(sums)
  if total is None:
    return sums
  return jax.tree.map(np.add, total, sums)


def from_json(tree: Any) -> Any:
  """Sums as read back from JSON (a checkpoint's metadata): lists become
  arrays again."""
  if isinstance(tree, Mapping):
    return {k: from_json(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"<prefix>/<path>": leaf} of a nested dict."""
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
  return out


def summarize(sums: Sums | None, steps: int = 1) -> dict[str, float]:
  """Rates named by path (see the module docstring); scalars are averaged
  over `steps`."""
  if not sums:
    return {}
  count = float(sums.get("count", 0.0))
  out: dict[str, float] = {}
  for key, name in PER_SAMPLE.items():
    for path, v in flatten(sums.get(key, {}), name).items():
      out[path] = float(v) / count if count else 0.0
  for head, b in _flat_bins(sums.get("ece_bins", {})).items():
    # Summed in bin order, one bin at a time (reproducible to the last bit).
    gap = sum(abs(c - f) for c, f in zip(np.asarray(b["correct"]).tolist(),
                                         np.asarray(b["conf"]).tolist()))
    out[f"ece/{head}"] = gap / count if count else 0.0
  for name, v in sums.get("scalars", {}).items():
    out[name] = float(v) / max(1, steps)
  return out


def _flat_bins(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{head path: {"correct", "conf"}} of the nested `ece_bins` entry."""
  if "correct" in tree and "conf" in tree:
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_bins(v, f"{prefix}/{k}" if prefix else str(k)))
  return out
