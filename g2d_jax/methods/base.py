"""The method contract: what a balancing method supplies to the training step.

A method owns its update. It is a `Method`: a name, a static `MethodSpec`,
and one function

    update(ctx: StepContext) -> StepResult

that the pipeline's jitted step calls once per batch, plus optionally the
method's own state (`init_state`) and host-side work at the start of every
epoch (`epoch_hook`). The loop, data, checkpoints and evaluation never look
inside it, and SMP gating is not part of any method: `ctx.apply` is the
SMP-gated optimizer, so SMP composes with whatever the update does.

Most methods are a loss plus, optionally, a rule that rewrites the gradient
before the optimizer; `standard_update(loss, modulate)` is that update:

    def loss(outputs, ctx):
      value = losses.cross_entropy(outputs.logits, ctx.batch["label"])
      return value, {"student": value}

    method = Method("joint", standard_update(loss),
                    MethodSpec(skip_frozen_exact=True))

Methods that need more (several gradients per batch, several optimizer
updates per batch) write `update` themselves from the same context:
`ctx.forward`, `ctx.value_and_grad` and `ctx.apply` (MMPareto, MLA).

Everything `update` (and a loss or modulation rule) does runs inside the
jitted step: no host syncs, no Python side effects. Values that change per
step (`ctx.epoch`, `ctx.step`, `ctx.method_state`, the SMP kappa inside
`ctx.apply`) are traced, so the step compiles once.

Metric names: a loss's or update's metrics are reported as `loss/<name>`,
except names that start with the method's own name (`ogm/coeff/audio`), its
diagnostics, which are reported as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from g2d_jax.errors import ConfigError

Array = jax.Array
Batch = Mapping[str, Any]
Metrics = dict[str, Array]

TEACHER_OUTPUTS = ("logits", "features")
HEAD_KINDS = ("unimodal", "shared")


class Gradient(NamedTuple):
  """What `StepContext.value_and_grad` returns."""
  loss: Array
  metrics: Metrics
  outputs: Any          # the model outputs of the train-mode forward pass
  batch_stats: Any      # the BatchNorm statistics after that pass
  grads: Any            # d loss / d params


class StepResult(NamedTuple):
  """What `update` returns: the new training state (minus the step counter),
  the loss and metrics to report, and the outputs the accuracy is read from."""
  params: Any
  opt_state: Any
  batch_stats: Any
  loss: Array
  metrics: Metrics
  outputs: Any
  method_state: Any


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a method's `update` sees of one training step.

  Attributes:
    batch: the host batch on the devices: `label` [B], `inputs` {m: [B, ...]},
      `index` [B] and, when the spec asks for them, `teacher` =
      {"logits": {m: [B, C]}, "features": {m: [B, D]}} from the cache.
    epoch: int32 scalar, 0-indexed.
    step: int32 scalar, the global step counter before this update.
    rng: a PRNG key for this step (already folded with the step counter).
    params: the parameters at the start of the step.
    opt_state: the optimizer state at the start of the step.
    batch_stats: the BatchNorm statistics at the start of the step.
    method_state: the method's state (None without `init_state`).
    forward: `forward(params, inputs=None, *, train=True,
      feature_scale=None) -> (outputs, new batch_stats)`, the train-mode
      forward pass of the batch's inputs, or of `inputs` ({m: [B, ...]},
      e.g. with a modality zeroed) when given; `train=False` is the
      inference-mode pass (BatchNorm running statistics, no dropout), still
      differentiable; `feature_scale` ({m: [D] or [B, D]}) multiplies a
      modality's pooled features before its head and the fusion (AMCo's
      masked units). SMP-frozen branches
      sit behind `stop_gradient` when the step is specialised to a gating
      pattern. Every pass starts from the step's BatchNorm statistics; the
      method returns the ones it keeps.
    optimizer_update: `(grads, params, opt_state, mask) -> (params,
      opt_state)`; use `apply`.
  """
  batch: Batch
  epoch: Array
  step: Array
  rng: Array
  params: Any
  opt_state: Any
  batch_stats: Any
  method_state: Any
  forward: Callable[[Any], tuple[Any, Any]]
  optimizer_update: Callable[..., tuple[Any, Any]]

  @classmethod
  def of_batch(cls, batch: Batch, *, epoch: Any = 0, step: Any = 0,
               method_state: Any = None, rng: Any = None) -> StepContext:
    """A context for calling a method's loss or gradient rule outside the
    training step (tests, custom loops): no model, so `forward` and
    `apply` raise."""
    def unavailable(*args, **kwargs):
      raise ValueError("this StepContext was made by of_batch: it has no "
                       "model or optimizer; only the batch, epoch, step and "
                       "method state.")
    return cls(batch=batch, epoch=jnp.asarray(epoch, jnp.int32),
               step=jnp.asarray(step, jnp.int32),
               rng=jax.random.key(0) if rng is None else rng, params=None,
               opt_state=None, batch_stats=None, method_state=method_state,
               forward=unavailable, optimizer_update=unavailable)

  @property
  def labels(self) -> Array:
    return self.batch["label"]

  def value_and_grad(self, loss: Callable[..., tuple[Array, Metrics]],
                     params: Any = None, inputs: Any = None, *,
                     with_params: bool = False,
                     feature_scale: Any = None) -> Gradient:
    """Forward pass (of the batch's inputs, or `inputs`; features scaled by
    `feature_scale`, see `forward`), `loss(outputs, ctx)` and its gradient
    w.r.t. params (default: the step's parameters).

    With `with_params`, the loss is `loss(outputs, ctx, params)` and sees
    the parameters being differentiated (a loss that reads weights, e.g.
    MMCosine's normalised class weights).
    """
    params = self.params if params is None else params

    def fn(p):
      kwargs = {} if feature_scale is None else {
          "feature_scale": feature_scale}
      outputs, batch_stats = self.forward(p, inputs, **kwargs)
      value, metrics = (loss(outputs, self, p) if with_params
                        else loss(outputs, self))
      return value, (metrics, outputs, batch_stats)

    (value, (metrics, outputs, batch_stats)), grads = jax.value_and_grad(
        fn, has_aux=True)(params)
    return Gradient(value, metrics, outputs, batch_stats, grads)

  def apply(self, grads: Any, mask: Mapping[str, Array] | None = None, *,
            params: Any = None, opt_state: Any = None) -> tuple[Any, Any]:
    """One SMP-gated optimizer update: `(new params, new opt_state)`.

    Args:
      grads: gradients in the parameter layout.
      mask: optional {modality: 0/1} multiplying the SMP kappa of this update
        (a method's sub-update that must leave some branches alone; needs
        `MethodSpec(masked_updates=True)`).
      params: the parameters to update (default: the step's).
      opt_state: the optimizer state to update (default: the step's).
    """
    return self.optimizer_update(
        grads, self.params if params is None else params,
        self.opt_state if opt_state is None else opt_state, mask)


# update(ctx) -> StepResult
UpdateFn = Callable[[StepContext], StepResult]
# loss(outputs, ctx) -> (scalar, {name: scalar})
LossFn = Callable[[Any, StepContext], tuple[Array, Metrics]]
# loss(outputs, ctx, params) -> (scalar, {name: scalar}): sees the
# parameters being differentiated.
ParamsLossFn = Callable[[Any, StepContext, Any], tuple[Array, Metrics]]
# modulate(grads, outputs, ctx) -> (grads, {name: scalar})
ModulateFn = Callable[[Any, Any, StepContext], tuple[Any, Metrics]]


def standard_update(loss: LossFn | ParamsLossFn,
                    modulate: ModulateFn | None = None, *,
                    with_params: bool = False) -> UpdateFn:
  """The update of a method that is a loss plus an optional gradient rule:
  `grads = d loss`, `grads = modulate(grads)`, one gated optimizer update.
  With `with_params` the loss is `loss(outputs, ctx, params)`."""

  def update(ctx: StepContext) -> StepResult:
    g = ctx.value_and_grad(loss, with_params=with_params)
    grads, metrics = g.grads, dict(g.metrics)
    if modulate is not None:
      grads, extra = modulate(grads, g.outputs, ctx)
      metrics.update(extra)
    params, opt_state = ctx.apply(grads)
    return StepResult(params, opt_state, g.batch_stats, g.loss, metrics,
                      g.outputs, ctx.method_state)

  return update


@dataclasses.dataclass(frozen=True)
class HeadsSpec:
  """Extra heads a method adds to the student (`g2d_jax.methods.heads`).

  Attributes:
    kind: "unimodal" (a separate linear classifier per modality on its pooled
      features, besides the fusion; MLB, MMPareto) or "shared" (one linear
      head shared by all modalities, which replaces the fusion; MLA).
    fusion_weights: for "shared": per-modality weights of the fused logits
      at inference (MLA's `av_alpha`); None means equal weights.
  """
  kind: str
  fusion_weights: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """What a method needs from the pipeline, known before anything runs.

  Attributes:
    teacher_outputs: the cached teacher outputs its update reads, a subset
      of {"logits", "features"} (SMP's gate adds "logits" on its own).
    heads: extra heads of the student model, or None.
    updates_per_step: optimizer updates per batch (MLA: one per modality);
      per-epoch learning-rate schedules count this many per batch.
    skip_frozen_exact: whether a step that skips SMP-frozen branches'
      backward passes (they sit behind `stop_gradient`) gives the same
      update as the plain step. True for a loss alone (the gate discards a
      frozen branch's gradient anyway); a method that reads or rewrites
      gradients could see the missing ones, so it says False and the step
      runs the plain backward for it.
    masked_updates: whether `update` passes per-modality masks to
      `ctx.apply` (which needs the gated student optimizer).
  """
  teacher_outputs: frozenset[str] = frozenset()
  heads: HeadsSpec | None = None
  updates_per_step: int = 1
  skip_frozen_exact: bool = False
  masked_updates: bool = False


HOOK_SPLITS = ("train", "val")
HOOK_REDUCTIONS = ("sum", "concat")


@dataclasses.dataclass(frozen=True)
class EpochHook:
  """Host-side work at the start of every epoch (before its first step).

  The pipeline runs the model in inference mode over batches of `split`,
  sums `accumulate` over them (or, with `reduce="concat"`, concatenates
  them along the first axis: per-sample features for a clustering or a
  per-sample score), and stores `finish` in the method state:
  for "train", the first `max(1, floor(fraction * steps_per_epoch))`
  batches the epoch is about to train on (PMR's prototypes); for "val",
  the first `max(1, floor(fraction * val batches))` batches of the
  validation split in order, the last one padded (MSLR's validation
  accuracy, measured on the model the previous epoch left). Every batch
  carries `mask` [B] (False on padding; all True on training batches),
  which `accumulate` must honour. A run resumed mid-epoch does not repeat
  the hook (the state was checkpointed with it).

  Attributes:
    fraction: share of the split's batches to visit.
    accumulate: (model outputs, batch) -> {name: array}, additive over
      batches, or per-sample rows [B, ...] with `reduce="concat"` (jitted).
    finish: (method_state, sums, epoch) -> method_state (jitted); with
      `reduce="concat"` it gets the rows of every visited batch, [N, ...]
      with N = batches x batch size, padding rows included (keep `mask`).
    split: "train" or "val".
    reduce: "sum" or "concat".
  """
  fraction: float
  accumulate: Callable[[Any, Batch], dict[str, Array]]
  finish: Callable[[Any, dict[str, Array], Array], Any]
  split: str = "train"
  reduce: str = "sum"

  def num_batches(self, steps_per_epoch: int) -> int:
    return max(1, int(self.fraction * steps_per_epoch + 1e-9))


@dataclasses.dataclass(frozen=True)
class ProbeHook:
  """Short training runs from a copy of the student at the start of every
  `every`-th epoch (Gradient Blending's overfitting-to-generalisation
  estimate), whose losses update the method state.

  For each name in `probes`, the pipeline copies the student's parameters
  and BatchNorm statistics, trains the copy for `epochs` epochs on
  `loss(probe, outputs, labels)` (per sample, [B]) of the model applied to
  `inputs(probe, batch inputs)`, with a fresh, constant-rate instance of the
  student's optimizer (no SMP gate), and records the sum over batches of
  the batch-mean training loss of every probe epoch and, after the first
  and the last probe epoch, the same sum over the validation split
  (inference mode, padding masked). The student itself does not move.
  `finish(method_state, {probe: {"train": [epochs], "val": [2]}}, epoch)`
  returns the new method state. Deterministic per seed and epoch, and run
  only at the start of an epoch, so resume stays exact.

  Attributes:
    every: epochs between probe rounds (a round at epochs 0, every, ...).
    epochs: probe length in epochs (>= 1).
    probes: probe names.
    inputs: (probe, {m: [B, ...]}) -> inputs the probe trains on.
    loss: (probe, model outputs, labels [B]) -> per-sample loss [B].
    finish: (method_state, losses, epoch) -> method_state (jitted).
  """
  every: int
  epochs: int
  probes: tuple[str, ...]
  inputs: Callable[[str, Mapping[str, Array]], Mapping[str, Array]]
  loss: Callable[[str, Any, Array], Array]
  finish: Callable[[Any, dict[str, dict[str, Array]], Array], Any]

  def runs_at(self, epoch: int) -> bool:
    return epoch % self.every == 0


@dataclasses.dataclass(frozen=True)
class Method:
  """A balancing method (see the module docstring).

  Attributes:
    name: the `config.method` name.
    update: `update(ctx) -> StepResult`, one training step's update.
    spec: its static needs.
    init_state: optional `(params, abstract outputs) -> state`, the method
      state carried in `TrainState.method_state` across steps and
      checkpoints (MLA's projection matrix, PMR's prototypes).
    epoch_hook: optional host-side work at the start of an epoch (an
      inference pass, `EpochHook`, or probe trainings, `ProbeHook`), whose
      result is written into the method state.
  """
  name: str
  update: UpdateFn
  spec: MethodSpec = MethodSpec()
  init_state: Callable[[Any, Any], Any] | None = None
  epoch_hook: EpochHook | ProbeHook | None = None

  def __post_init__(self):
    spec = self.spec
    where = f"method {self.name!r}"
    unknown = sorted(set(spec.teacher_outputs) - set(TEACHER_OUTPUTS))
    if unknown:
      raise ConfigError(f"{where} asks for teacher outputs {unknown}; the "
                        f"cache holds {list(TEACHER_OUTPUTS)}.")
    if int(spec.updates_per_step) != spec.updates_per_step or (
        spec.updates_per_step < 1):
      raise ConfigError(f"{where}: updates_per_step="
                        f"{spec.updates_per_step} must be a whole number >= 1.")
    if spec.heads is not None and spec.heads.kind not in HEAD_KINDS:
      raise ConfigError(f"{where}: heads kind {spec.heads.kind!r} is not one "
                        f"of {HEAD_KINDS}.")
    hook = self.epoch_hook
    if hook is not None:
      if self.init_state is None:
        raise ConfigError(f"{where} has an epoch hook but no init_state: "
                          "the hook writes its result into the method state.")
      if isinstance(hook, ProbeHook):
        if min(hook.every, hook.epochs) < 1 or not hook.probes:
          raise ConfigError(f"{where}: a probe hook needs every >= 1, "
                            f"epochs >= 1 and at least one probe; got "
                            f"every={hook.every}, epochs={hook.epochs}, "
                            f"probes={hook.probes}.")
        return
      if hook.split not in HOOK_SPLITS:
        raise ConfigError(f"{where}: the epoch hook's split {hook.split!r} "
                          f"is not one of {HOOK_SPLITS}.")
      if hook.reduce not in HOOK_REDUCTIONS:
        raise ConfigError(f"{where}: the epoch hook's reduce "
                          f"{hook.reduce!r} is not one of {HOOK_REDUCTIONS}.")
      if not 0.0 < hook.fraction <= 1.0:
        raise ConfigError(f"{where}: the epoch hook's fraction "
                          f"{hook.fraction} must be in (0, 1].")
