"""The jitted training step, shared by teachers and students.

One step function per (model, method): the method's `update` runs on a
`StepContext` whose `apply` is the SMP-gated optimizer (kappa reaches it as a
traced argument), and the state is donated. Nothing here syncs with the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from g2d_jax import gating
from g2d_jax import schedule
from g2d_jax.errors import ConfigError
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import StepContext
from g2d_jax.pipeline import metrics as metrics_lib
from g2d_jax.pipeline.loader import ALL
from g2d_jax.pipeline.loader import GateSpec

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (donated to every step).

  `method_state` holds what a balancing method carries across steps (MLA's
  projection matrix, PMR's prototypes); None for stateless methods.
  """
  step: Any          # int32 scalar (an array once on the devices)
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any = None

  if TYPE_CHECKING:  # flax.struct.dataclass adds it
    def replace(self, **updates: Any) -> TrainState: ...


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                   epochs: int) -> optax.GradientTransformation:
  """The inner optimizer: SGD/Adam with a per-epoch step-decay schedule.

  SGD follows torch.optim.SGD: weight decay is added to the gradient before
  momentum (PyTorch applies `StepLR` per epoch: the rate drops at the first
  step of each decay epoch, `schedule.optimizer_decay_epochs` of a stage of
  `epochs` epochs).
  """
  boundaries = {int(e) * steps_per_epoch: cfg.decay_factor
                for e in schedule.optimizer_decay_epochs(cfg, epochs)
                if e > 0}
  lr = optax.piecewise_constant_schedule(
      cfg.lr * cfg.get("lr_scale", 1.0), boundaries)
  if cfg.name == "sgd":
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(lr, momentum=cfg.momentum or None))
  if cfg.name == "adam":
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.adam(lr))
  if cfg.name == "adamw":
    return optax.adamw(lr, weight_decay=cfg.weight_decay)
  raise ValueError(f"unknown optimizer {cfg.name!r}")


def init_variables(model: nn.Module, inputs: Any, seed: int) -> tuple[Any, Any]:
  """(params, batch_stats) of a model, initialised on one example batch."""
  # RBG keys: initialisation compiles ~2.5x faster on CPU than with the
  # default (partitionable) threefry; the values are deterministic per seed.
  key = jax.random.key(seed, impl="rbg")
  variables = jax.jit(lambda k, x: model.init(
      {"params": k, "dropout": k}, x, train=False))(key, inputs)
  return variables["params"], variables.get("batch_stats", {})


def apply_model(model: nn.Module, params: Any, batch_stats: Any, inputs: Any,
                *, train: bool, rng: Array | None = None,
                present: Any = None, feature_scale: Any = None
                ) -> tuple[Any, Any]:
  """Runs the model; in train mode also returns the new BatchNorm statistics.

  `present` ({m: [B] 0/1}, inference only) marks missing modalities and
  `feature_scale` ({m: [D] or [B, D]}) multiplies pooled features (see
  `models.MultimodalModel`).
  """
  dtype = getattr(model, "compute_dtype", "float32")
  if dtype != "float32":
    # Mixed precision: the layers compute in `dtype` (Flax layers follow
    # their inputs' and weights' dtype; BatchNorm reduces in float32 and
    # keeps float32 statistics); the float32 parameters are cast here, so
    # gradients and optimizer state stay float32, and so do the outputs
    # the losses see.
    params, inputs = _cast_floats((params, inputs), dtype)
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  kwargs = {} if feature_scale is None else {"feature_scale": feature_scale}
  if not train:
    if present is not None:
      kwargs["present"] = present
    out = model.apply(variables, inputs, train=False, **kwargs)
    return _cast_floats(out, "float32"), batch_stats
  rngs = {"dropout": rng} if rng is not None else {}
  out, mutated = model.apply(variables, inputs, train=True,
                             mutable=["batch_stats"], rngs=rngs, **kwargs)
  return _cast_floats(out, "float32"), mutated.get("batch_stats",
                                                   batch_stats)


def _cast_floats(tree: Any, dtype: str) -> Any:
  """`tree` with its floating-point leaves in `dtype` (others as they are)."""
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype) if x.dtype != dtype else x
    return x
  return jax.tree.map(cast, tree)


def _frozen_view(params: Any, frozen: tuple[str, ...],
                 modalities: tuple[str, ...], semantics: str,
                 scope: str = "branch") -> Any:
  """params with the frozen modalities' gated leaves behind stop_gradient.

  Under "freeze" the whole branch (scope "encoder": the encoder) is
  constant, so XLA drops its backward pass; under "reference" only the conv
  kernels (whose gradient the gate multiplies by 0 anyway) are, which drops
  their weight-gradient convs.
  """
  def visit(path, leaf):
    m = gating.leaf_modality(path, modalities)
    if m not in frozen:
      return leaf
    if scope == "encoder" and not gating.is_encoder_leaf(path, m):
      return leaf
    if semantics == "freeze" or gating.conv_kernel(path, leaf):
      return jax.lax.stop_gradient(leaf)
    return leaf
  return jax.tree_util.tree_map_with_path(visit, params)


def _hold(old: Array, new: Array, kappa: Mapping[str, Array],
          modality: str | None) -> Array:
  if modality is None:
    return new
  return jax.numpy.where(kappa[modality] == 0, old, new)


def _metric_name(method: str, name: str) -> str:
  """Loss terms are reported as `loss/<term>`; a method's own diagnostics
  (named `<method>/...`) as they are."""
  return name if name.startswith(method + "/") else f"loss/{name}"


class TrainStep:
  """`step(state, batch, epoch, rng) -> (state, metrics)`.

  One jitted, state-donating function per gating pattern: the plain step
  (pattern ALL: every branch's backward, the gate applied by the optimizer)
  and, with `gate.skip_frozen`, one step per "modality i trains alone"
  pattern whose other branches sit behind `stop_gradient`. The optimizer
  still receives the traced kappa, so a pattern step computes exactly the
  update of the plain step, without the frozen branches' backward passes.
  Patterns compile on first use. `batch["gate"]` (from `GateSpec.for_batch`)
  carries kappa and the host-side pattern. Methods whose update reads or
  rewrites gradients (`MethodSpec.skip_frozen_exact` False) always run the
  plain step.

  `metrics` are the batch's sums (`pipeline.metrics`): prediction counts and
  `scalars` = the loss, the method's metrics, and the gate's kappa and
  teacher confidence per modality.
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               method: Method, task: str, gate: GateSpec | None = None):
    if method.spec.masked_updates and gate is None:
      raise ConfigError(
          f"method {method.name!r} masks its optimizer updates per modality, "
          "which needs the gated student optimizer (g2d_jax.smp_optimizer) "
          "and its gate.")
    self.model, self.tx, self.method, self.task = model, tx, method, task
    self.gate = gate
    self._jitted: dict[int, Any] = {}

  def _build(self, pattern: int):
    model, tx, method, gate = self.model, self.tx, self.method, self.gate
    modalities = gate.modalities if gate is not None else ()
    frozen = () if pattern == ALL else tuple(
        m for j, m in enumerate(modalities) if j != pattern)

    def step(state: TrainState, batch, epoch, rng):
      rng = jax.random.fold_in(rng, state.step)
      scalars = {}
      kappa = None
      if gate is not None:
        kappa = batch["gate"]["kappa"]
        scalars.update({f"kappa/{m}": v for m, v in kappa.items()})
        scalars.update({f"confidence/{m}": v for m, v in
                        batch["gate"]["confidence"].items()})

      def forward(params, inputs=None, *, train=True, feature_scale=None):
        # stop_gradient must act inside the differentiated function: on the
        # parameters `value_and_grad` differentiates, not on its argument.
        if frozen:
          params = _frozen_view(params, frozen, modalities, gate.semantics,
                                gate.scope)
        return apply_model(model, params, state.batch_stats,
                           batch["inputs"] if inputs is None else inputs,
                           train=train, rng=rng if train else None,
                           feature_scale=feature_scale)

      def optimizer_update(grads, params, opt_state, mask):
        if mask is not None and kappa is None:
          raise ConfigError(
              f"method {method.name!r} passes a mask to ctx.apply without "
              "the gated optimizer; declare MethodSpec(masked_updates=True) "
              "and train it as a student.")
        extra = {}
        if kappa is not None:
          extra["kappa"] = gating.group_gates(kappa, mask)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

      ctx = StepContext(
          batch=batch, epoch=epoch, step=state.step, rng=rng,
          params=state.params, opt_state=state.opt_state,
          batch_stats=state.batch_stats, method_state=state.method_state,
          forward=forward, optimizer_update=optimizer_update)
      res = method.update(ctx)
      batch_stats = res.batch_stats
      if (kappa is not None and gate is not None and gate.hold_frozen_stats
          and batch_stats):
        # A frozen branch's BatchNorm running statistics stay as they were.
        gates: Mapping[str, Array] = kappa
        batch_stats = jax.tree_util.tree_map_with_path(
            lambda path, old, new: _hold(
                old, new, gates, gating.leaf_modality(path, modalities)),
            state.batch_stats, batch_stats)
      scalars["loss"] = res.loss
      scalars.update({_metric_name(method.name, k): v
                      for k, v in res.metrics.items()})
      sums = metrics_lib.prediction_sums(res.outputs, batch["label"],
                                         self.task)
      sums["scalars"] = scalars
      return state.replace(step=state.step + 1, params=res.params,
                           batch_stats=batch_stats,
                           opt_state=res.opt_state,
                           method_state=res.method_state), sums

    return jax.jit(step, donate_argnums=(0,))

  def split_pattern(self, batch: Mapping[str, Any]
                    ) -> tuple[int, dict[str, Any]]:
    """(the pattern to run, the batch without the host-side pattern)."""
    batch = dict(batch)
    pattern = ALL
    if "gate" in batch:
      gate = dict(batch["gate"])
      pattern = int(gate.pop("pattern"))
      batch["gate"] = gate
    if not self.method.spec.skip_frozen_exact:
      pattern = ALL
    return pattern, batch

  def jitted(self, pattern: int = ALL):
    """The jitted step function of one gating pattern (built on first use):
    `fn(state, batch_without_pattern, epoch, rng)`; for benchmarks and
    compiled-cost checks (`.lower(...).compile()`)."""
    if pattern not in self._jitted:
      self._jitted[pattern] = self._build(pattern)
    return self._jitted[pattern]

  def __call__(self, state: TrainState, batch: Mapping[str, Any], epoch: Any,
               rng: Array) -> tuple[TrainState, dict[str, Any]]:
    pattern, batch = self.split_pattern(batch)
    return self.jitted(pattern)(state, batch, epoch, rng)

  def compiled_patterns(self) -> dict[int, int]:
    """{pattern: number of compilations} (tests check it stays at 1)."""
    return {p: f._cache_size() for p, f in self._jitted.items()}  # pylint: disable=protected-access
