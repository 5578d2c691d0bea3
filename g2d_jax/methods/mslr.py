"""MSLR, modality-specific learning rates (Yao and Mihalcea, ACL Findings
2022, "Modality-specific Learning Rates for Effective Multimodal Additive
Late-fusion"), as released in the MLB repository (kkontras/MLB,
`agents/general_agent/helpers/Bias_Infusion.py`, `Bias_Infusion_MSLR`).

Only the fused cross-entropy is trained. At the start of every epoch e >= 1
(`epoch_hook` on the validation split, on the model epoch e - 1 left):

    acc_m   = validation accuracy of modality m's logits
    ratio_m = acc_m / mean(acc_m of the last K epochs)   if e > K, else 1
    (then acc_m joins the memory)

and every step inside the window multiplies the gradients of modality m's
encoder by `k_m = ratio_m * init_scale_m` before the optimizer: a modality
whose validation accuracy is rising relative to its recent past learns
faster, one that stalls or falls learns slower. That multiplier is the
modality-specific learning rate of the paper's dynamic strategy (a scale of
the gradient, not of the optimizer's rate: under SGD without momentum the
two are the same; with momentum or Adam the scale passes through the
optimizer state, as in the release).

Where we follow the released code rather than the paper:
- The paper picks per-modality base rates by a search on the unimodal
  models ("keep"/"smooth" strategies) and adapts them with a validation
  signal ("dynamic"); the release implements the dynamic rule above with
  base scales `init_learning_rate` (1, 1 by default), which `init_scales`
  holds in modality order (empty: all 1).
- acc_m is the accuracy of the modality's own logits. The release reads its
  model's unimodal predictions; here they are the fusion's per-modality
  logits (`outputs.modality_logits`: for late fusion each modality's head,
  whose mean is the fused output), so the fusion used must provide them.
- The memory holds the last `keep_memory` epochs (`keep_memory_epoch`, 5);
  the ratio stays 1 until epoch K + 1, and at epoch 0 nothing is measured
  (`current_epoch < 1: return`). A memory whose mean is 0 (a modality at 0%
  accuracy for K epochs) gives ratio 1, where the release divides by zero.
- Only the encoders are scaled (the release's `enc_<i>` / `mod<i>`
  parameters), not the fusion or heads.
- The release is written for two modalities; the rule is per modality, so
  k >= 2 modalities use it unchanged.

With SMP (`config.smp=True`) both act: k scales the gradient, the SMP gate
then each modality's update.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import schedule
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods import joint
from g2d_jax.methods.base import EpochHook
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import standard_update

Array = jax.Array


# The leaderboard's tuning grid: the memory length around the release's 5
# epochs, and the learning rate (the method rescales it per modality).
TUNING_GRID = {"keep_memory": (5, 3, 10),
               "student.optimizer.lr_scale": (1.0, 2.0)}

# The MLB repository trains every method it ships with one protocol: Adam,
# lr 1e-3, coupled L2 1e-4, constant rate (its warm restarts not reproduced).
RELEASED_OPTIMIZER = dict(name="adam", lr=1e-3, momentum=0.9, weight_decay=1e-4,
                          decay_fractions=(), decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # bias_infusion.keep_memory_epoch (default 5).
      keep_memory=5,
      # bias_infusion.init_learning_rate ({"c": 1, "g": 1}), in the
      # dataset's modality order; () means 1 for every modality.
      init_scales=(),
      # starting_epoch 0, ending_epoch 1500: always on.
      window=schedule.window_config(0.0, 1.0),
  ))


def mslr_ratios(acc_M: Array, memory_KxM: Array, epoch: Array,
                keep_memory: int) -> Array:
  """ratio_m = acc_m / mean(memory_m) once epoch > K, else 1 (and 1 where
  the memory's mean is 0)."""
  mean_M = jnp.mean(memory_KxM, axis=0)
  ratio = jnp.where(mean_M > 0, acc_M / jnp.where(mean_M > 0, mean_M, 1.0),
                    1.0)
  return jnp.where(jnp.asarray(epoch) > keep_memory, ratio, 1.0)


def mslr_state_update(state: dict[str, Array], acc_M: Array, epoch: Array,
                      keep_memory: int) -> dict[str, Array]:
  """The epoch-start update: nothing at epoch 0; from epoch 1 on, the new
  ratios from the memory *before* this epoch's accuracy joins it, then the
  accuracy pushed into the memory (a ring of the last K epochs)."""
  epoch = jnp.asarray(epoch)
  measured = epoch >= 1
  ratio = mslr_ratios(acc_M, state["memory"], epoch, keep_memory)
  slot = jnp.asarray(state["count"]) % keep_memory
  memory = jnp.asarray(state["memory"]).at[slot].set(acc_M)
  return {"ratio": jnp.where(measured, ratio, state["ratio"]),
          "memory": jnp.where(measured, memory, state["memory"]),
          "count": state["count"] + measured.astype(jnp.int32),
          "acc": jnp.where(measured, acc_M, state["acc"])}


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.mslr
  common.require_classification(task, "mslr")
  if modalities is None:
    raise ConfigError("config.method='mslr' needs the dataset's modality "
                      "order (build_method(..., modalities=...)).")
  order = tuple(modalities)
  keep = int(c.keep_memory)
  if keep < 1:
    raise ConfigError(f"config.mslr.keep_memory={c.keep_memory} must be a "
                      "whole number of epochs >= 1.")
  scales = tuple(c.init_scales) or (1.0,) * len(order)
  if len(scales) != len(order) or min(scales) <= 0:
    raise ConfigError(
        f"config.mslr.init_scales={tuple(c.init_scales)} must give one "
        f"positive scale per modality {order} (or be empty: all 1).")
  window = schedule.method_window(config, "mslr")

  def init_state(params, outputs) -> dict[str, Array]:
    del params, outputs
    m = len(order)
    return {"ratio": jnp.ones((m,), jnp.float32),
            "memory": jnp.zeros((keep, m), jnp.float32),
            "count": jnp.zeros((), jnp.int32),
            "acc": jnp.zeros((m,), jnp.float32)}

  def accumulate(outputs, batch):
    mask = batch["mask"].astype(jnp.float32)
    out = {"count": jnp.sum(mask)}
    for m in order:
      hit = jnp.argmax(outputs.modality_logits[m], -1) == batch["label"]
      out[f"correct/{m}"] = jnp.sum(mask * hit)
    return out

  def finish(state, sums, epoch):
    acc = jnp.stack([sums[f"correct/{m}"] for m in order]) / jnp.maximum(
        sums["count"], 1.0)
    return mslr_state_update(state, acc, epoch, keep)

  def modulate(grads, outputs, ctx):
    del outputs
    active = window.contains(ctx.epoch)
    ratio = ctx.method_state["ratio"]
    coeffs = {m: jnp.where(active, ratio[i] * scales[i], 1.0)
              for i, m in enumerate(order)}
    metrics = {f"mslr/coeff/{m}": coeffs[m] for m in order}
    metrics.update({f"mslr/val_acc/{m}": ctx.method_state["acc"][i]
                    for i, m in enumerate(order)})
    return common.scale_by_modality(grads, coeffs, order,
                                    encoders_only=True), metrics

  return Method("mslr", standard_update(joint.make_loss(config, task),
                                        modulate),
                init_state=init_state,
                epoch_hook=EpochHook(1.0, accumulate, finish, split="val"))
