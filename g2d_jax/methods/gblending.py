"""Gradient Blending (Wang, Tran and Feiszli, CVPR 2020, "What Makes Training
Multi-modal Classification Networks Hard?"), as released in GeWu-Lab/
BalanceBenchmark (`balancemm/trainer/GBlending_trainer.py`, the "online"
variant).

The objective blends each modality's unimodal loss with the fused loss,

    L = sum_m w_m CE(l_m) + w_fused CE(fused logits),

with weights from the overfitting-to-generalisation ratio (OGR, paper
Eq. 9-11) measured by short probe trainings. At the start of every
`period`-th epoch (`ProbeHook`), for each probe p in (each modality, then
"fused"), a copy of the student trains for `period` epochs on CE(fused
logits) of its inputs, where probe m zeroes every other modality's input
("padding"), and

    T_0, T_N: sum over batches of the batch-mean training loss of the first
              and the last probe epoch,
    V_0, V_N: the same sum over the validation split after those epochs,
    G = V_N - V_0,   O = (V_N - T_N) - (V_0 - T_0),
    w_p = |G| / O^2, normalised to sum to 1.

Where we follow the released code rather than the paper:
- The paper trains a separate unimodal network per modality and measures
  the OGR on held-out data; the release probes the fused output of the
  multimodal network with the other inputs zeroed, from a copy of the
  current student, and uses sums (not means) of the per-batch losses; its
  validation split is the loader it is given (BalanceBenchmark passes the
  test loader when no validation split exists: here it is always `val`).
- Each probe starts from a fresh optimizer at the initial learning rate
  (the release reloads `temp_optimizer_origin`); the probe's batch order is
  its own seeded stream.
- The unimodal losses l_m are the fusion's per-modality logits
  (`unimodal_heads="fusion"`, the release's `Uni_res`); "separate" trains
  unimodal heads of their own (the paper's unimodal classifiers).
- `period` is a fraction of the run (the release's `super_epoch` 10 of its
  70 epochs, 1/7), resolved to at least 2 epochs: with one probe epoch the
  release compares the first epoch's losses with zeros. `period=1.0` is the
  "offline" variant (one probe round at epoch 0, as long as the run).
- Before the first round (and where every |G| is 0) the weights are equal;
  O = 0 gives an infinite weight in the release (a division by zero), here
  O^2 is floored at 1e-12, so that probe takes (almost) all the weight.
- The probes cost (k + 1) probe epochs per epoch of the run on top of the
  run itself, as in the release.

k >= 3 modalities work unchanged (one probe each). With SMP the blended
loss is a loss like any other; the probes train without the gate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods import heads
from g2d_jax.methods.base import LossFn
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import ProbeHook
from g2d_jax.methods.base import standard_update

Array = jax.Array
FUSED = "fused"


# The leaderboard's tuning grid: the probe period around the release's 1/7
# of the run, and the unimodal logits (the release's fusion slices, or the
# paper's separate heads).
TUNING_GRID = {"period": (1 / 7, 0.25, 0.5),
               "unimodal_heads": ("fusion", "separate")}

# BalanceBenchmark's protocol for every method: AdamW (wd 0.01), StepLR(10)
# of 70 epochs (x0.1) (configs/user_default.yaml: 30 epochs, steps 10, 20).
RELEASED_OPTIMIZER = dict(name="adamw", lr=1e-3, momentum=0.9,
                          weight_decay=1e-2, decay_fractions=(1 / 3, 2 / 3),
                          decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # trainer_config.yaml GBlending: super_epoch 10, max_epochs 70.
      period=1 / 7,
      # "fusion" (the release's Uni_res) | "separate" (the paper's heads).
      unimodal_heads="fusion",
  ))


def ogr_weights(train_NxP: Array, val_2xP: Array) -> Array:
  """w_p = |G_p| / O_p^2 normalised (equal where every G is 0).

  Args:
    train_NxP: per probe epoch (rows) and probe (columns), the summed
      training loss; only the first and last rows are used.
    val_2xP: the summed validation loss after the first and last epoch.

  Returns:
    [P] weights summing to 1.
  """
  g = val_2xP[-1] - val_2xP[0]
  o = (val_2xP[-1] - train_NxP[-1]) - (val_2xP[0] - train_NxP[0])
  w = jnp.abs(g) / jnp.maximum(o * o, 1e-12)
  total = jnp.sum(w)
  equal = jnp.full_like(w, 1.0 / w.shape[0])
  return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), equal)


def pad_inputs(inputs: Mapping[str, Array], keep: str) -> dict[str, Array]:
  """Every modality's input but `keep` replaced by zeros."""
  return {m: x if m == keep else jnp.zeros_like(x) for m, x in inputs.items()}


def probe_epochs(config: ml_collections.ConfigDict) -> int:
  """The probe period in epochs: the fraction of the run, rounded half up,
  at least 2."""
  period = float(config.gblending.period)
  if not 0.0 < period <= 1.0:
    raise ConfigError(f"config.gblending.period={period} must be a fraction "
                      "of the run in (0, 1].")
  epochs = int(config.student.epochs)
  return max(2, int(period * epochs + 0.5))


def make_loss(c: ml_collections.ConfigDict, order: Sequence[str]) -> LossFn:
  """sum_m w_m CE(l_m) + w_fused CE(fused), the weights from the state."""

  def loss(outputs, ctx):
    labels = ctx.labels
    w = ctx.method_state["weights"]
    uni = heads.unimodal_logits(outputs, c.unimodal_heads)
    terms = {m: losses.cross_entropy(uni[m], labels) for m in order}
    fused = losses.cross_entropy(outputs.logits, labels)
    value = w[-1] * fused + sum(w[i] * terms[m] for i, m in enumerate(order))
    metrics = {"student": fused, **{f"unimodal/{m}": v
                                    for m, v in terms.items()}}
    metrics.update({f"gblending/weight/{p}": w[i]
                    for i, p in enumerate((*order, FUSED))})
    return value, metrics

  return loss


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.gblending
  common.require_classification(task, "gblending")
  if modalities is None:
    raise ConfigError("config.method='gblending' needs the dataset's "
                      "modality order (build_method(..., modalities=...)).")
  order = tuple(modalities)
  probes = (*order, FUSED)
  spec = heads.multi_loss_heads("gblending", c.unimodal_heads)
  period = probe_epochs(config)

  def init_state(params, outputs) -> dict[str, Array]:
    del params, outputs
    p = len(probes)
    return {"weights": jnp.full((p,), 1.0 / p, jnp.float32),
            "train": jnp.zeros((2, p), jnp.float32),
            "val": jnp.zeros((2, p), jnp.float32)}

  def probe_inputs(probe, inputs):
    return inputs if probe == FUSED else pad_inputs(inputs, probe)

  def probe_loss(probe, outputs, labels):
    del probe
    return losses.per_sample_cross_entropy(outputs.logits, labels)

  def finish(state, results, epoch):
    del epoch
    train = jnp.stack([results[p]["train"] for p in probes], axis=1)
    val = jnp.stack([results[p]["val"] for p in probes], axis=1)
    return dict(state, weights=ogr_weights(train, val),
                train=jnp.stack([train[0], train[-1]]), val=val)

  return Method("gblending", standard_update(make_loss(c, order)),
                MethodSpec(heads=spec, skip_frozen_exact=True),
                init_state=init_state,
                epoch_hook=ProbeHook(period, period, probes, probe_inputs,
                                     probe_loss, finish))
