"""AMCo: adaptive mask co-optimization (Zhou, Liang, Zheng, Xuan & Kumada,
ICASSP 2023, "Adaptive Mask Co-optimization for Modal Dependence in
Multimodal Learning").

The paper's text was not available here (only its abstract: an adaptive
mask makes the modality the model depends on harder to learn, and the
co-optimization keeps its performance from degrading); the rule is read
from GeWu-Lab/BalanceBenchmark, which cites the paper for AMCo:
`balancemm/trainer/AMCo_trainer.py` (`AMCoTrainer.train_loop` and
`training_step`, commit 2603a98) with the model that applies the mask,
`balancemm/models/avclassify_model.py` (`AVClassifierModel.forward` for two
modalities, `AVTClassifierModel.forward` for three, commit 05e0e81), and
`configs/trainer_config.yaml` (`AMCo`).

Per training batch j of epoch e (0-indexed), inside the epoch window, with
f_m [B, D_m] the pooled features of modality m, l_m its logits in the
fusion and modalities in the dataset's order:

1. The ramp. l_t restarts at 0 every epoch and grows by `ramp_rate * e`
   (the release's `current_epoch / 10`) after every batch, so at batch j
   of the epoch l_t = j * e * ramp_rate, and

       p_t = sin(pi/2 * min(eps, l_t) / eps),   N_m = floor(p_t * D_m).

2. The mask: a 0/1 vector M_m of length D_m with exactly N_m zeros at
   uniformly random positions (the release shuffles U - N ones and N
   zeros), one vector shared by the whole batch, drawn afresh each batch.
3. The dependent modality d: the first modality in order whose flag is set
   (the model's `if audio ... elif visual ... elif text`). Its features are
   masked and rescaled before its head and the fusion see them,

       f~_d = f_d * M_d * s_t,  s_t = 1 / (1 - p_t) if |p_t - 1| > 0.1 else 10,

   and every other modality's features are left alone. Without a flag
   nothing is masked.
4. The loss (co-optimization): L = CE(fused) + sum_m CE(l_m, y), every
   term of the masked forward pass (the release backpropagates the fused
   loss and each unimodal loss in turn: their sum).
5. The flags, after the step (so they act from the next batch): the shares
   of the concatenated per-modality softmax,

       share_m = (1/B) sum_i sum_{c} softmax([l_1(x_i), ..., l_k(x_i)])[m, c],

   and the first modality in order with share_m >= sigma gets its flag set
   (`if ... elif`: at most one per batch). Flags only ever turn on within
   an epoch and all reset at its start.

Outside the window the loss is CE(fused) of the unmasked features (joint
training) and the flags do not change.

Where we follow the released code:
- BalanceBenchmark has two AMCo versions. We follow the one that masks
  pooled feature units (trainer 2603a98 with the `AVClassifierModel` /
  `AVTClassifierModel` forward of 05e0e81), which is how AMCo is usually
  summarised ("dynamically masks features of the dominant modality"). The
  later refactor (trainer and
  `BaseClassifierAMCoModel` at c1ce5a88) instead masks the dependent
  modality's unimodal *logits* (a mask of length n_classes, no
  rescale), adds a trainable C x C layer (`linear_star`) on the sum of the
  per-modality logits as the fused output, recomputes every flag each batch
  (`share > sigma`, any number of them) instead of latching the first, and
  expands its mask to [2, C] (apparently for DataParallel's scatter over
  two GPUs). It needs a head the library's fusions do not have and is not
  implemented.
- The ramp is in absolute epochs, as released (it is a rate, not a window):
  at epoch 0 p_t = 0 (nothing is masked, s_t = 1), and from epoch e >= 1
  p_t reaches 1 after ceil(eps / (e * ramp_rate)) batches of the epoch
  (3, 2, 1, ... batches for eps = 0.3). At p_t = 1 every unit is masked:
  the dependent modality's features are zero for the rest of the epoch, so
  its encoder gets no gradient and its logits are its bias; the released
  rule in effect drops the flagged modality once the epoch is a few batches
  old. We keep this (the configuration's eps and ramp_rate give a slower
  ramp).
- The flags latch: once set, a flag stays for the rest of the epoch, and
  the first flagged modality in order is the one masked, even if a later
  one is flagged after it (the release's `dependent_modality` dict lives
  for the epoch; the model's `if ... elif` picks the first). With two
  modalities and sigma = 0.5 the shares add up to 1, so every batch sets a
  flag (the first modality's on a tie).
- U: the release's `U: 512` must equal the feature width (the mask
  multiplies [B, 512] features); here each modality's mask has its own
  feature width D_m, so there is no U to set.
- The window: `modulation_starts 0`, `modulation_ends 80` (inclusive) of
  `max_epochs 70`: the whole run, (0, 1). `alpha` and `method` in the
  release's AMCo config are not read by its trainer.
- The unimodal logits are the fusion's own per-modality outputs (late
  fusion: each modality's head; concat: its slice of the fused layer with
  bias / k, the release's `AVCalculate`). Other fusions are refused (an
  error names the fix): sum fusion's reported modality logits carry bias / k
  where the release's carry the full bias, and for FiLM and gated the
  release's "unimodal" logits are the fused output itself.
- The training accuracy reported for a step is that of the masked forward
  pass (the release's); evaluation uses the model's ordinary output.
Differences on purpose: p_t, N_m and s_t are computed in float32 (the
release: float64), so where p_t * D_m is a whole number in exact arithmetic
and float64 lands just below it (p_t = 0.49999999999999994 at epoch 1,
batch 10 with eps = 3), N_m can be one unit above the release's (we match
it at epoch 1, batch 1 with eps = 0.3, where float64 lands above); the
random positions come from the step's key, one draw per modality.

k >= 3 modalities: the release's three-modality branch (audio, visual,
text) is the same rule over 3C concatenated logits with the `elif` chain in
modality order; any k works the same way. With sigma = 0.5 a modality is
flagged only while its share of the joint softmax is at least half.

With SMP (`config.smp=True`), `ctx.apply` is the SMP-gated optimizer: the
loss's gradient goes through it unchanged. AMCo is a loss (on masked
features) plus state, so skipping a frozen branch's backward gives the same
update (`skip_frozen_exact`).

The state (the epoch it belongs to, the batch counter j, the flags, and the
unit scale applied on the last step) is method state, checkpointed with the
run, so a resumed run continues the same ramp. Metrics: `amco/active`,
`amco/pt`, `amco/dependent/<m>` (1 on a step whose masked modality is m,
also while p_t = 0 zeroes no unit; its epoch mean is the share of steps),
`amco/masked/<m>` (the share of m's units zeroed on the step),
`amco/share/<m>` and `amco/flag/<m>` (after the step), and the loss parts
`loss/student` (fused CE) and `loss/unimodal/<m>`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import losses
from g2d_jax import schedule
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import StepResult

Array = jax.Array

# Fusions whose per-modality logits are the release's unimodal outputs.
AMCO_FUSIONS = ("late", "concat")
# The model's rescale: 1 / (1 - p_t) while |p_t - 1| > 0.1, else 10.
RESCALE_BAND = 0.1
RESCALE_CAP = 10.0
# Folded into the step's key for the unit masks.
_MASK_TAG = 0xA3C0

# The leaderboard's tuning grid: the release's threshold sigma = 0.5 and two
# stricter ones (with two modalities 0.5 always flags one); the release's
# ramp length eps = 0.3 and two slower ramps (p_t reaches 1 after 10x and
# 100x as many batches).
TUNING_GRID = {"sigma": (0.5, 0.6, 0.7), "eps": (0.3, 3.0, 30.0)}

# The released optimizer (BalanceBenchmark configs/global_config.yaml, as
# for greedy.py): AdamW, weight decay 0.01, StepLR(10, 0.1) of 30 epochs;
# no learning rate is passed, so torch's AdamW default 1e-3.
RELEASED_OPTIMIZER = dict(name="adamw", lr=1e-3, momentum=0.9,
                          weight_decay=0.01, decay_fractions=(1 / 3, 2 / 3),
                          decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # trainer_config.yaml AMCo.sigma: 0.5 (share threshold of a flag).
      sigma=0.5,
      # trainer_config.yaml AMCo.eps: 0.3 (l_t at which p_t reaches 1).
      eps=0.3,
      # AMCo_trainer.py train_loop: `l_t += self.current_epoch/10` per batch.
      ramp_rate=0.1,
      # trainer_config.yaml AMCo: modulation_starts 0, modulation_ends 80
      # (inclusive) of max_epochs 70: the whole run.
      window=schedule.window_config(0.0, 1.0),
  ))


def amco_ramp(batch: Array, epoch: Array, ramp_rate: float,
              eps: float) -> Array:
  """p_t = sin(pi/2 * min(eps, l_t) / eps) at batch j of epoch e, where the
  release's l_t = j * e * ramp_rate.

  Written as min(1, j e (ramp_rate / eps)) with the ratio taken in float64
  first, which keeps float32 on the release's side of whole-number
  boundaries where it can (epoch 1, batch 1: p_t * 512 = 256, as float64).
  """
  steps = (jnp.asarray(batch, jnp.float32)
           * jnp.asarray(epoch, jnp.float32))
  r = jnp.minimum(jnp.float32(1.0), steps * jnp.float32(ramp_rate / eps))
  return jnp.sin(jnp.float32(math.pi / 2) * r)


def amco_num_masked(pt: Array, units: int) -> Array:
  """N = floor(p_t * U), as int32 (the release's `int(pt * U)`, p_t >= 0)."""
  return jnp.floor(pt * jnp.float32(units)).astype(jnp.int32)


def amco_unit_mask(rng: Array, pt: Array, units: int) -> Array:
  """M [units]: 0/1 with exactly N = floor(p_t * units) zeros at uniformly
  random positions (the release's shuffled ones-then-zeros vector)."""
  # unit i keeps its value iff its rank in a random permutation is >= N:
  # D - N ones, N zeros, every N-subset equally likely.
  rank = jax.random.permutation(rng, units)
  return (rank >= amco_num_masked(pt, units)).astype(jnp.float32)


def amco_rescale(pt: Array) -> Array:
  """s_t = 1 / (1 - p_t) if |p_t - 1| > 0.1, else 10 (the model's rule)."""
  far = jnp.abs(pt - 1.0) > RESCALE_BAND
  return jnp.where(far, 1.0 / jnp.where(far, 1.0 - pt, 1.0), RESCALE_CAP)


def amco_shares(modality_logits: Mapping[str, Array],
                order: Sequence[str]) -> dict[str, Array]:
  """share_m: batch mean of m's block of the softmax over the concatenated
  per-modality logits [B, k*C] (no gradient); the shares add up to 1."""
  z = jnp.concatenate([jax.lax.stop_gradient(
      modality_logits[m]).astype(jnp.float32) for m in order], axis=-1)
  p = jax.nn.softmax(z, axis=-1)
  c = modality_logits[order[0]].shape[-1]
  b = z.shape[0]
  return {m: jnp.sum(p[:, i * c:(i + 1) * c]) / b
          for i, m in enumerate(order)}


def amco_first(flags: Mapping[str, Array], order: Sequence[str]
               ) -> dict[str, Array]:
  """{m: bool}: True for the first m in order whose flag is on (an
  `if ... elif` chain), False elsewhere."""
  out, seen = {}, jnp.bool_(False)
  for m in order:
    on = jnp.asarray(flags[m]).astype(bool)
    out[m] = on & ~seen
    seen = seen | on
  return out


def amco_update_flags(flags: Mapping[str, Array],
                      shares: Mapping[str, Array], sigma: float,
                      order: Sequence[str]) -> dict[str, Array]:
  """The flags after a batch: the first modality in order with
  share >= sigma turns its flag on; flags already on stay on (int32 0/1)."""
  hit = amco_first({m: shares[m] >= sigma for m in order}, order)
  return {m: (jnp.asarray(flags[m]).astype(bool) | hit[m]).astype(jnp.int32)
          for m in order}


def amco_feature_scale(rng: Array, pt: Array, dependent: Mapping[str, Array],
                       units: Mapping[str, int], active: Array
                       ) -> dict[str, Array]:
  """{m: [D_m]}: M_m * s_t for the dependent modality inside the window,
  ones elsewhere (one mask per modality from `rng`, shared by the batch)."""
  rescale = amco_rescale(pt)
  out = {}
  for i, (m, d) in enumerate(units.items()):
    mask = amco_unit_mask(jax.random.fold_in(rng, i), pt, d)
    out[m] = jnp.where(active & dependent[m], mask * rescale,
                       jnp.ones((d,), jnp.float32))
  return out


def amco_loss(outputs: Any, labels: Array, active: Array,
              order: Sequence[str]) -> tuple[Array, dict[str, Array]]:
  """CE(fused) + [inside the window] sum_m CE(l_m), and its parts."""
  fused = losses.cross_entropy(outputs.logits, labels)
  uni = {m: losses.cross_entropy(outputs.modality_logits[m], labels)
         for m in order}
  total = fused + jnp.where(active, sum(uni.values()), 0.0)
  metrics = {"student": fused}
  metrics.update({f"unimodal/{m}": v for m, v in uni.items()})
  return total, metrics


def init_state(params: Any, outputs: Any,
               modalities: Sequence[str] | None = None) -> dict[str, Any]:
  """Before the first step: no epoch yet (-1, so the first step starts one),
  no flags, unit scales of ones (their widths fix the masks' lengths)."""
  del params
  names = (tuple(sorted(outputs.features)) if modalities is None
           else tuple(modalities))
  # Distinct arrays per leaf: the training step donates the state.
  return {
      "epoch": jnp.full((), -1, jnp.int32),
      "batch": jnp.zeros((), jnp.int32),
      "flags": {m: jnp.zeros((), jnp.int32) for m in names},
      "scale": {m: jnp.ones((outputs.features[m].shape[-1],), jnp.float32)
                for m in names}}


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.amco
  common.require_classification(task, "amco")
  if not c.eps > 0:
    raise ConfigError(f"config.amco.eps={c.eps} must be > 0 (the ramp's "
                      "length in l_t; the release's 0.3).")
  if c.ramp_rate < 0:
    raise ConfigError(f"config.amco.ramp_rate={c.ramp_rate} must be >= 0 "
                      "(the release's 0.1: l_t grows by epoch * 0.1 per "
                      "batch).")
  if not 0.0 <= c.sigma <= 1.0:
    raise ConfigError(f"config.amco.sigma={c.sigma} is a share of the "
                      "joint softmax and must be in [0, 1] (the release's "
                      "0.5).")
  fusion = config.get("model", {}).get("fusion", "late")
  if fusion not in AMCO_FUSIONS:
    raise ConfigError(
        f"config.method='amco' trains each modality's own logits in the "
        f"fusion (its unimodal losses and shares), which fusion {fusion!r} "
        f"does not provide in the released form; use --config.model.fusion="
        f" one of {AMCO_FUSIONS}.")
  window = schedule.method_window(config, "amco")
  sigma, eps, rate = float(c.sigma), float(c.eps), float(c.ramp_rate)

  def update(ctx):
    state = ctx.method_state
    order = (tuple(modalities) if modalities is not None
             else tuple(sorted(state["flags"])))
    epoch = ctx.epoch
    # A new epoch restarts l_t and clears the flags (the release's
    # train_loop re-creates both at every epoch).
    fresh = state["epoch"] != epoch
    batch = jnp.where(fresh, 0, state["batch"])
    flags = {m: jnp.where(fresh, 0, state["flags"][m]) for m in order}
    active = window.contains(epoch)
    pt = amco_ramp(batch, epoch, rate, eps)
    dependent = amco_first(flags, order)
    units = {m: int(state["scale"][m].shape[-1]) for m in order}
    scale = amco_feature_scale(jax.random.fold_in(ctx.rng, _MASK_TAG), pt,
                               dependent, units, active)

    def loss(outputs, ctx):
      return amco_loss(outputs, ctx.labels, active, order)

    g = ctx.value_and_grad(loss, feature_scale=scale)
    shares = amco_shares(g.outputs.modality_logits, order)
    updated = amco_update_flags(flags, shares, sigma, order)
    new_flags = {m: jnp.where(active, updated[m], flags[m]).astype(jnp.int32)
                 for m in order}
    new_state = {"epoch": jnp.asarray(epoch, jnp.int32),
                 "batch": (batch + 1).astype(jnp.int32),
                 "flags": new_flags, "scale": scale}
    params, opt_state = ctx.apply(g.grads)
    metrics = dict(g.metrics)
    metrics["amco/active"] = active.astype(jnp.float32)
    metrics["amco/pt"] = pt
    for m in order:
      on = active & dependent[m]
      metrics[f"amco/dependent/{m}"] = on.astype(jnp.float32)
      metrics[f"amco/masked/{m}"] = jnp.mean(
          (scale[m] == 0).astype(jnp.float32))
      metrics[f"amco/share/{m}"] = shares[m]
      metrics[f"amco/flag/{m}"] = new_flags[m].astype(jnp.float32)
    return StepResult(params, opt_state, g.batch_stats, g.loss, metrics,
                      g.outputs, new_state)

  def initial(params, outputs):
    return init_state(params, outputs, modalities)

  return Method("amco", update, MethodSpec(skip_frozen_exact=True),
                init_state=initial)
