"""UME, Uni-Modal Ensemble (Du et al., "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023).

UME trains no multimodal student: the unimodal teachers (trained by the
pipeline's teacher stage, the same ones every other method distils from or
is compared with) are combined at prediction time. So it is not a training
method but an evaluation of the teachers: the evaluation stage of every run
reports it as `summary["teacher_ensemble"]` (validation and test accuracy,
per modality, ECE), beside whatever student the run trained.
`--config.method=ume` still selects it by name: that run has no student
stage (and no SMP to gate) and its summary reports the ensemble alone.

No official code exists; the paper combines the unimodal models'
predictions. `combine="logits"` (default) averages logits, the same form as
the late-fusion head; `combine="probs"` averages probabilities (reported as
logits `log(mean p)`, so softmax and argmax give the averaged distribution).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax.errors import ConfigError

Array = jax.Array
COMBINE = ("logits", "probs")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      combine="logits",   # "logits" | "probs"
  ))


def ensemble_logits(teacher_logits: Mapping[str, Array],
                    combine: str = "logits") -> Array:
  """The ensemble's fused logits from {modality: [B, C] teacher logits}."""
  stacked = jnp.stack([l.astype(jnp.float32) for l in teacher_logits.values()])
  if combine == "logits":
    return jnp.mean(stacked, axis=0)
  if combine == "probs":
    probs = jnp.mean(jax.nn.softmax(stacked, axis=-1), axis=0)
    return jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny))
  raise ConfigError(f"config.ume.combine={combine!r} must be one of "
                    f"{COMBINE}.")


def check_config(config: ml_collections.ConfigDict, task: str) -> None:
  """Raises ConfigError for a combination the ensemble cannot evaluate."""
  if config.ume.combine not in COMBINE:
    raise ConfigError(f"config.ume.combine={config.ume.combine!r} must be "
                      f"one of {COMBINE}.")
  if task != "classification" and config.ume.combine == "probs":
    raise ConfigError("config.ume.combine='probs' needs classification; use "
                      "'logits' (averaged raw outputs) for regression.")
