"""What a balancing method supplies to the shared training step (DESIGN sec. 6).

A method is a handful of pure functions; the loop, data, checkpoints and
evaluation never look inside it. SMP gating is not part of any method: the
step applies it (as an optimizer gate) to whichever method runs.

Only `loss` is required. The optional hooks, from the most common to the
rarest:

- `modulate_grads`: rescale or perturb the gradient before the optimizer
  (OGM, OGM-GE, MLB).
- `compute_grads`: compute the gradient itself from a forward function, e.g.
  several losses' gradients combined per tensor (MMPareto).
- `update`: replace "gradient, then one optimizer update" by several
  optimizer sub-updates per batch (MLA); `updates_per_step` tells the
  pipeline how many, so per-epoch learning-rate schedules stay per epoch.
- `init_state`: method state carried in `TrainState.method_state` across
  steps and checkpoints (MLA's projection matrix, PMR's prototypes).
- `epoch_hook`: host-side work at the start of every epoch whose result is
  written into the method state and reaches the step as a traced value
  (PMR's prototypes over a slice of the training set).
- `heads`: extra heads the method adds to the student model (MLB's and
  MMPareto's unimodal classifiers, MLA's shared head).
- `trains_student=False`: nothing is trained; the pipeline evaluates the
  ensemble of the teachers instead (UME).

Every hook runs inside the jitted step (except `epoch_hook`'s driver) and
must be free of host syncs and Python side effects. Values that change per
step reach the hooks through the batch, which the step extends with
`batch["epoch"]` (int32 scalar), `batch["step"]` (the global step counter
before this update) and `batch["method_state"]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

Array = jax.Array
Batch = Mapping[str, Any]
# (model outputs, batch) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[Any, Batch], tuple[Array, dict[str, Array]]]
# (grads, model outputs, batch, epoch, rng) -> (grads, {name: metric})
GradFn = Callable[[Any, Any, Batch, Array, Array], tuple[Any, dict[str, Array]]]
# params -> (model outputs, new batch_stats): the train-mode forward pass.
ForwardFn = Callable[[Any], tuple[Any, Any]]
# (forward, params, batch, rng) -> (loss, metrics, outputs, new batch_stats,
# grads)
ComputeGradsFn = Callable[[ForwardFn, Any, Batch, Array],
                          tuple[Array, dict[str, Array], Any, Any, Any]]
# (grads, params, opt_state, mask) -> (params, opt_state): one optimizer
# update; `mask` ({modality: 0/1}) multiplies the SMP kappa of this update.
ApplyFn = Callable[[Any, Any, Any, Mapping[str, Array] | None],
                   tuple[Any, Any]]


class UpdateResult(NamedTuple):
  """What an `update` hook returns (the new training state, minus the step)."""
  params: Any
  opt_state: Any
  batch_stats: Any
  loss: Array
  metrics: dict[str, Array]
  outputs: Any
  method_state: Any


# (forward, params, opt_state, batch, rng, apply) -> UpdateResult
UpdateFn = Callable[[ForwardFn, Any, Any, Batch, Array, ApplyFn], UpdateResult]
# (params, abstract model outputs) -> initial method state
InitStateFn = Callable[[Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class EpochHook:
  """Host-side work at the start of every epoch (before its first step).

  The pipeline runs the model in inference mode over the first
  `max(1, floor(fraction * steps_per_epoch))` training batches of the epoch,
  sums `accumulate` over them, and stores `finish` in the method state. A run
  resumed mid-epoch does not repeat it (the state was checkpointed with it).

  Attributes:
    fraction: share of the epoch's training batches to visit.
    accumulate: (model outputs, batch) -> {name: array}, additive over
      batches (jitted).
    finish: (method_state, sums, epoch) -> method_state (jitted).
  """
  fraction: float
  accumulate: Callable[[Any, Batch], dict[str, Array]]
  finish: Callable[[Any, dict[str, Array], Array], Any]

  def num_batches(self, steps_per_epoch: int) -> int:
    return max(1, int(self.fraction * steps_per_epoch + 1e-9))


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
class Method:
  """A balancing method as plug-in functions.

  Attributes:
    name: the config.method name.
    loss: the objective over the model outputs and the batch (which holds
      `label`, `inputs`, the step context keys listed in the module docstring
      and, when requested, `teacher` = {"logits": {m: ...}, "features":
      {m: ...}} from the precomputed cache). With `compute_grads` or `update`
      it only serves for reporting.
    teacher_outputs: which cached teacher outputs the loss needs ("logits",
      "features"); SMP adds "logits" on its own.
    modulate_grads: optional rule that rescales or perturbs gradients before
      the optimizer (OGM-style methods); identity when None.
    compute_grads: optional custom gradient computation (replaces
      `value_and_grad` of `loss`).
    update: optional custom update with several optimizer sub-updates.
    updates_per_step: optimizer updates per batch (`update` hooks).
    init_state: optional initial method state.
    epoch_hook: optional host-side hook at the start of every epoch.
    heads: optional extra heads of the student model.
    trains_student: False when the method trains no student (UME).
    smp_default: whether SMP is on when `config.smp` is left unset (None):
      True only for G2D, whose definition includes it.
  """
  name: str
  loss: LossFn
  teacher_outputs: frozenset[str] = frozenset()
  modulate_grads: GradFn | None = None
  compute_grads: ComputeGradsFn | None = None
  update: UpdateFn | None = None
  updates_per_step: int = 1
  init_state: InitStateFn | None = None
  epoch_hook: EpochHook | None = None
  heads: HeadsSpec | None = None
  trains_student: bool = True
  smp_default: bool = False

  @property
  def skip_frozen_exact(self) -> bool:
    """Whether a step that skips SMP-frozen branches' backward passes (they
    sit behind `stop_gradient`) gives the same update as the plain step.

    True when the method only defines a loss: the gate discards the frozen
    branches' gradients anyway. A method that reads or rewrites gradients
    (or updates in sub-steps) could see the missing gradients, so the step
    runs the plain backward for it.
    """
    return (self.modulate_grads is None and self.compute_grads is None
            and self.update is None)
