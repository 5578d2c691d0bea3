"""LFM (Yang, Wan, Jiang and Xu, NeurIPS 2024, "Facilitating Multimodal
Classification via Dynamically Learning Modality Gap"), as released in
GeWu-Lab/BalanceBenchmark (`balancemm/trainer/LFM_trainer.py`: `Alignment`,
`getAlpha_Learnable`, `LFMTrainer.fit`, `LFMTrainer.training_step`;
`configs/trainer_config.yaml` LFM; `configs/global_config.yaml`): the
paper's learning-based integration strategy. The authors' repository is not
in the index read here (nor the paper's text beyond its abstract); scripts
derived from it carry a heuristic variant, `getAlpha_Learnable_Fitted`, a
degree-5 polynomial of the epoch fitted to a learned run, not implemented.

The objective integrates supervised label fitting with an alignment of the
modalities' predictions, with a dynamic weight alpha (alignment) and
1 - alpha (cross-entropy). With l_m the per-modality logits, P the pairs
i < j of the modalities (in dataset order) and p = softmax:

    A(l_i, l_j) = 1/2 [KL(m || p_i) + KL(m || p_j)],  m = (p_i + p_j) / 2,
                  each KL summed over classes, averaged over the batch
    L_align     = (1 / |P|) sum_{(i, j) in P} A(l_i, l_j)
    L           = 2 [(1 - alpha) CE(fused logits) + alpha L_align]

per training batch. alpha is updated once per epoch, before the epoch's
first optimizer step, from a probe batch b (a quarter of a batch):

    L_tot = (1 - alpha) CE_b + alpha L_align,b
    v     = grad CE_b,   h = (Hessian of L_tot) v      (forward-over-reverse)
    g     = mean of h over the first parameter tensor of the model
    lr_e  = lr_alpha * (1/2)^floor(e / period)
    alpha <- clip(alpha - lr_e g, alpha_min, alpha_max)

starting from alpha = 0.05 (the update at epoch 0 runs before any
training). Both weights are constants of the training gradient.

Where we follow the released code (BalanceBenchmark) rather than the paper:
- The paper speaks of contrastive learning between the modalities; the
  release's `Alignment` compares the modalities' class distributions, and
  calls `F.kl_div(p.log(), m)`, which is KL(m || p) (torch's argument
  order), not the Jensen-Shannon KL(p || m) its name says: we compute what
  the code computes. m is not detached: the gradient flows through it.
- The hypergradient is the release's: the mean of one tensor of
  `autograd.grad(theta_grads, params, grad_outputs=cls_grads)` (the
  Hessian of L_tot times the cross-entropy gradient), `[0]` being the
  first parameter registered, the first modality's input-layer weight.
  `hvp_leaves="first_kernel"` takes the first `kernel` (in path order) of
  the first modality's backbone, which is the input layer of the library's
  CNN, ResNet-18, MLP and Transformer encoders (MobileNetV2: the first
  block's depthwise kernel); "all" averages the product over every
  parameter instead. The weight starts at alpha = 0.05 (`fit`'s `alpha =
  {1: 0.05, 0: 0.95}`; the config's `alpha: 1` is overwritten before any
  step), lr_alpha = 1e-4 (trainer_config.yaml), clipped to [0.05, 0.95];
  `lr_alpha` halves when `epoch % 20 == 0 and epoch != 0`, compounding:
  `period` is 20 epochs of the release's 30, the fraction 2/3 of the run.
- The trainer's `modulation_starts`/`ends` are never read: no window.
- The factor 2 of `training_step` is kept (`loss_scale`); L_tot of the
  update has none, as in `getAlpha_Learnable`.
- The per-modality logits are the fusion's (`outputs.modality_logits`, the
  release's `unimodal_result`: concat's slice of the fused layer with
  bias / k; late fusion's heads, as in the authors' own scripts, whose
  fused output is the mean of the heads). Other fusions use their reported
  per-modality logits (`g2d_jax.models.fusion`).
Differences on purpose:
- The probe batch. The release draws one validation batch before training
  (`next(iter(val_loader))`) and probes its first quarter every epoch; the
  training step sees only training batches, so here the probe is the first
  `max(1, floor(probe_fraction * B))` samples of the epoch's first training
  batch (a different shuffle each epoch). The probe pass is train mode
  (batch statistics, dropout), as the release's `model.train()` pass; its
  BatchNorm statistics are discarded (the release's pass also updates the
  running statistics once per epoch).
- Logarithms are log-softmax, finite where the release's `softmax(.).log()`
  underflows to -inf.
- The update runs inside the jitted step (no host synchronisation): the
  probe's Hessian-vector product is computed on every step and used on an
  epoch's first one (a `lax.cond` would run its convolutions ~20x slower on
  XLA:CPU), so a step costs about 1.5x (AV-MNIST smoke) to 1.8x (quick)
  the CPU time of a joint step. The weight, the epoch it was last updated
  and its gradient are the method state, checkpointed with the run, so a
  resumed run continues exactly.

k >= 3 modalities: all pairs, averaged, as the release's
`manual_combinations`; one modality is refused (no pair to align).

With SMP (`config.smp=True`) both act: the objective's gradient goes through
the SMP-gated optimizer, which multiplies each modality's update by kappa.
The hypergradient reads second derivatives through every branch, so
frozen-branch skipping is off (`skip_frozen_exact=False`).

Metrics: `loss/student` (fused CE), `loss/align` (L_align), `lfm/alpha`
(the alignment weight this step used), `lfm/alpha_grad` (g of the last
update) and `lfm/lr_alpha` (lr_e of this epoch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import losses
from g2d_jax import schedule
from g2d_jax import smp
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import StepContext
from g2d_jax.methods.base import StepResult

Array = jax.Array
HVP_LEAVES = ("first_kernel", "all")


# The leaderboard's tuning grid: the release's starting weight (0.05) and
# two larger ones (the authors' fitted schedule starts near 0.8 for the
# alignment term); the release's step size, and one at which the weight
# moves at all: on mfeat's three views |g| is 1e-6..4e-4, so with 1e-4 the
# weight stays within 1e-6 of its start for the whole run.
TUNING_GRID = {"alpha_init": (0.05, 0.2, 0.5), "lr_alpha": (1e-4, 100.0)}

# BalanceBenchmark's protocol for every method (configs/global_config.yaml
# at the commit with the LFM config): AdamW (wd 0.01, torch's default lr
# 1e-3: `create_optimizer` passes none), StepLR(10, 0.1) of 30 epochs.
RELEASED_OPTIMIZER = dict(name="adamw", lr=1e-3, momentum=0.9,
                          weight_decay=0.01, decay_fractions=(1 / 3, 2 / 3),
                          decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # LFM_trainer.fit: `alpha = {1: 0.05, 0: 0.95}` (alignment, CE).
      alpha_init=0.05,
      # trainer_config.yaml LFM: lr_alpha 0.0001.
      lr_alpha=1e-4,
      # getAlpha_Learnable: lr_alpha /= 2 when epoch % 20 == 0 (epoch > 0),
      # of trainer_config.yaml's max_epochs 30: every 2/3 of the run.
      lr_alpha_halve_every=2 / 3,
      # getAlpha_Learnable: alpha[1] = max(0.05, min(0.95, alpha[1])).
      alpha_min=0.05,
      alpha_max=0.95,
      # getAlpha_Learnable: `valbatch['label'].size(0) // 4` samples.
      probe_fraction=0.25,
      # `hessian_vector_prod[0].mean()`: the first parameter tensor.
      hvp_leaves="first_kernel",
      # training_step: `loss = 2 * (alpha[0] * loss + alpha[1] * ...)`.
      loss_scale=2.0,
  ))


def alignment_pairs(modalities: Sequence[str]) -> list[tuple[str, str]]:
  """Every pair i < j in modality order (the release's
  `manual_combinations`)."""
  return list(itertools.combinations(tuple(modalities), 2))


def kl_to_mixture(log_p: Array, m: Array) -> Array:
  """torch's `F.kl_div(log_p, m, reduction="batchmean")`: KL(m || p),
  summed over classes and averaged over the batch."""
  # m log m with 0 log 0 = 0, and a zero (not NaN) gradient there.
  positive = m > 0
  m_log_m = jnp.where(positive, m * jnp.log(jnp.where(positive, m, 1.0)), 0.0)
  return jnp.sum(m_log_m - m * log_p) / log_p.shape[0]


def alignment(logits_p: Array, logits_q: Array) -> Array:
  """The release's `Alignment(p, q)`: 1/2 [KL(m || p) + KL(m || q)] with
  m = (softmax p + softmax q) / 2 (m is not detached)."""
  log_p = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
  m = 0.5 * jnp.exp(log_p) + 0.5 * jnp.exp(log_q)
  return 0.5 * (kl_to_mixture(log_p, m) + kl_to_mixture(log_q, m))


def alignment_loss(modality_logits: Mapping[str, Array],
                   modalities: Sequence[str]) -> Array:
  """L_align: the mean of `alignment` over every pair of modalities."""
  pairs = alignment_pairs(modalities)
  if not pairs:
    raise ConfigError(
        f"config.method='lfm' aligns pairs of modalities and got "
        f"{list(modalities)}; use a dataset with at least two modalities.")
  terms = [alignment(modality_logits[a], modality_logits[b])
           for a, b in pairs]
  return jnp.sum(jnp.stack(terms)) / len(pairs)


def lfm_objective(ce: Array, align: Array, alpha: Array,
                  scale: float = 1.0) -> Array:
  """scale [(1 - alpha) CE + alpha L_align], alpha a constant."""
  alpha = jax.lax.stop_gradient(jnp.asarray(alpha, jnp.float32))
  return scale * ((1.0 - alpha) * ce + alpha * align)


def halving_period(config: ml_collections.ConfigDict) -> int:
  """Epochs between halvings of lr_alpha (the fraction, rounded half up,
  at least 1)."""
  frac = float(config.lfm.lr_alpha_halve_every)
  if not 0.0 < frac <= 1.0:
    raise ConfigError(
        f"config.lfm.lr_alpha_halve_every={frac} is a fraction of the run "
        "and must be in (0, 1].")
  return max(1, schedule.boundary(frac, int(config.student.epochs)))


def alpha_learning_rate(epoch: Array, lr_alpha: float, period: int) -> Array:
  """lr_e = lr_alpha / 2^floor(e / period): the release halves its running
  lr_alpha when `epoch % period == 0 and epoch != 0`, so halvings compound."""
  e = jnp.asarray(epoch, jnp.int32)
  return jnp.float32(lr_alpha) * jnp.float32(0.5) ** (e // period)


def next_alpha(alpha: Array, alpha_grad: Array, lr: Array,
               alpha_min: float, alpha_max: float) -> Array:
  """alpha <- clip(alpha - lr g, alpha_min, alpha_max)."""
  return jnp.clip(alpha - lr * alpha_grad, alpha_min, alpha_max)


def hessian_vector_product(total: Callable[[Any], Array],
                           cls: Callable[[Any], Array], params: Any) -> Any:
  """(Hessian of `total`) times grad `cls`, at params: the release's
  `autograd.grad(grad(L_tot), params, grad_outputs=grad(L_cls))`, where the
  vector is a constant."""
  v = jax.lax.stop_gradient(jax.grad(cls)(params))
  return jax.jvp(jax.grad(total), (params,), (v,))[1]


def _key(entry: Any) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", entry)))


def first_kernel_path(params: Any, modality: str) -> tuple[str, ...]:
  """The path of the first `kernel` (in path order) of the modality's
  backbone: the release's first registered parameter, its input layer."""
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = tuple(_key(k) for k in path)
    if keys[:3] == ("encoders", modality, "backbone") and keys[-1] == "kernel":
      return keys
  raise ConfigError(
      f"LFM's hypergradient reads the first kernel of modality "
      f"{modality!r}'s encoder and found none; set "
      "--config.lfm.hvp_leaves=all to average over every parameter.")


def alpha_gradient(hvp: Any, leaves: str,
                   path: tuple[str, ...] | None = None) -> Array:
  """g: the mean of the Hessian-vector product over the leaf at `path`
  ("first_kernel") or over every parameter element ("all")."""
  flat = jax.tree_util.tree_flatten_with_path(hvp)[0]
  if leaves == "first_kernel":
    for p, x in flat:
      if tuple(_key(k) for k in p) == path:
        return jnp.mean(x.astype(jnp.float32))
    raise ValueError(f"no parameter at {path}.")
  total = sum(jnp.sum(x.astype(jnp.float32)) for _, x in flat)
  return total / sum(x.size for _, x in flat)


def probe_size(batch_size: int, fraction: float) -> int:
  """Samples of the probe: max(1, floor(fraction * B))."""
  return max(1, int(fraction * batch_size + 1e-9))


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.lfm
  common.require_classification(task, "lfm")
  if c.hvp_leaves not in HVP_LEAVES:
    raise ConfigError(f"config.lfm.hvp_leaves={c.hvp_leaves!r} must be one "
                      f"of {HVP_LEAVES}.")
  if not 0.0 <= c.alpha_min <= c.alpha_init <= c.alpha_max <= 1.0:
    raise ConfigError(
        f"config.lfm needs 0 <= alpha_min <= alpha_init <= alpha_max <= 1; "
        f"got {c.alpha_min}, {c.alpha_init}, {c.alpha_max}.")
  if not 0.0 < c.probe_fraction <= 1.0:
    raise ConfigError(f"config.lfm.probe_fraction={c.probe_fraction} must "
                      "be in (0, 1].")
  if modalities is not None and len(modalities) < 2:
    raise ConfigError(
        f"config.method='lfm' aligns pairs of modalities and the dataset has "
        f"{list(modalities)}; use a dataset with at least two modalities.")
  period = halving_period(config)

  def init(params, outputs) -> dict[str, Array]:
    del params, outputs
    return {"alpha": jnp.float32(c.alpha_init), "epoch": jnp.int32(-1),
            "alpha_grad": jnp.float32(0.0)}

  def terms(outputs, labels, order) -> tuple[Array, Array]:
    return (losses.cross_entropy(outputs.logits, labels),
            alignment_loss(outputs.modality_logits, order))

  def update(ctx: StepContext) -> StepResult:
    state = ctx.method_state
    inputs = ctx.batch["inputs"]
    n = probe_size(ctx.labels.shape[0], c.probe_fraction)
    probe = {m: x[:n] for m, x in inputs.items()}
    probe_labels = ctx.labels[:n]
    alpha_old = jax.lax.stop_gradient(state["alpha"])
    order = smp.modality_order(inputs, modalities)

    def probe_terms(p):
      out, _ = ctx.forward(p, probe)
      return terms(out, probe_labels, order)

    def total(p):
      ce, align = probe_terms(p)
      return lfm_objective(ce, align, alpha_old)

    hvp = hessian_vector_product(total, lambda p: probe_terms(p)[0],
                                 ctx.params)
    path = (first_kernel_path(ctx.params, order[0])
            if c.hvp_leaves == "first_kernel" else None)
    grad = alpha_gradient(hvp, c.hvp_leaves, path)
    lr = alpha_learning_rate(ctx.epoch, c.lr_alpha, period)
    first = ctx.epoch > state["epoch"]
    alpha = jnp.where(first, next_alpha(alpha_old, grad, lr, c.alpha_min,
                                        c.alpha_max), alpha_old)
    grad = jnp.where(first, grad, state["alpha_grad"])

    def loss(outputs, ctx):
      ce, align = terms(outputs, ctx.labels, order)
      value = lfm_objective(ce, align, alpha, c.loss_scale)
      return value, {"student": ce, "align": align}

    g = ctx.value_and_grad(loss)
    params, opt_state = ctx.apply(g.grads)
    metrics = dict(g.metrics)
    metrics.update({"lfm/alpha": alpha, "lfm/alpha_grad": grad,
                    "lfm/lr_alpha": lr})
    new_state = {"alpha": alpha, "epoch": jnp.maximum(state["epoch"],
                                                      ctx.epoch),
                 "alpha_grad": grad}
    return StepResult(params, opt_state, g.batch_stats, g.loss, metrics,
                      g.outputs, new_state)

  return Method("lfm", update, MethodSpec(skip_frozen_exact=False),
                init_state=init)
