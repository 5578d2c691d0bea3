"""UME, Uni-Modal Ensemble (Du et al., "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023).

No multimodal student is trained: the unimodal teachers (trained by the
pipeline's teacher stage, the same ones every other method distils from or
is compared with) are combined at prediction time. The pipeline reports UME
like a student whose fused logits are the combination of the teachers'
logits and whose per-modality logits are each teacher's own, evaluated on the
same validation and test splits (`pipeline.student` records the validation
scores, `pipeline.evaluate` the test scores and ECE). `config.smp` does not
apply (there is no training to gate).

No official code exists (see the reference notes); the paper combines the
unimodal models' predictions. `combine="logits"` (default) averages logits,
the same form as the late-fusion head; `combine="probs"` averages
probabilities (reported as logits `log(mean p)`, so softmax and argmax give
the averaged distribution).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax.errors import ConfigError
from g2d_jax.methods import joint
from g2d_jax.methods.base import Method

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


def build(config: ml_collections.ConfigDict, task: str, **unused) -> Method:
  del unused
  if config.ume.combine not in COMBINE:
    raise ConfigError(f"config.ume.combine={config.ume.combine!r} must be "
                      f"one of {COMBINE}.")
  if task != "classification" and config.ume.combine == "probs":
    raise ConfigError("config.ume.combine='probs' needs classification; use "
                      "'logits' (averaged raw outputs) for regression.")

  def loss(outputs, batch):  # never trained; kept for a uniform interface
    value = joint.supervised_loss(outputs.logits, batch["label"], task)
    return value, {"student": value}

  return Method(name="ume", loss=loss, trains_student=False)
