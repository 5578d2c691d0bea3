"""The jitted training and evaluation steps, shared by teachers and students.

One step function per (model, method): the method contributes its loss and
optional gradient rule, the SMP gate reaches the optimizer as a traced
`kappa`, and the state is donated. Nothing here syncs with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import g2d_jax
from g2d_jax import calibration
from g2d_jax import methods as methods_lib
from g2d_jax.methods.base import Method

Array = jax.Array


ECE_BINS = 15  # equal-width confidence bins of the evaluation ECE


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (donated to every step).

  `method_state` holds what a balancing method carries across steps (MLA's
  projection matrix, PMR's prototypes); None for stateless methods.
  """
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any = None


def make_optimizer(cfg: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """The inner optimizer: SGD/Adam with a per-epoch step-decay schedule.

  SGD follows torch.optim.SGD: weight decay is added to the gradient before
  momentum (PyTorch applies `StepLR` per epoch: the rate drops at the first
  step of each epoch in `decay_epochs`).
  """
  boundaries = {int(e) * steps_per_epoch: cfg.decay_factor
                for e in cfg.decay_epochs if e > 0}
  lr = optax.piecewise_constant_schedule(cfg.lr, boundaries)
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
                present: Any = None) -> tuple[Any, Any]:
  """Runs the model; in train mode also returns the new BatchNorm statistics.

  `present` ({m: [B] 0/1}, inference only) marks missing modalities (see
  `models.MultimodalModel`).
  """
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  if not train:
    kwargs = {} if present is None else {"present": present}
    return model.apply(variables, inputs, train=False, **kwargs), batch_stats
  rngs = {"dropout": rng} if rng is not None else {}
  out, mutated = model.apply(variables, inputs, train=True,
                             mutable=["batch_stats"], rngs=rngs)
  return out, mutated.get("batch_stats", batch_stats)


def correct_counts(outputs: Any, labels: Array, task: str,
                   mask: Array | None = None,
                   calibration_bins: int = 0) -> dict[str, Array]:
  """Number of correct predictions, fused and per modality (classification),
  or the summed absolute error (regression).

  With `calibration_bins=M > 0` (classification) it also returns, per head,
  the per-bin sums of correctness and confidence that the expected
  calibration error needs (`ece_bins/<head>/{correct,conf}/<b>`, scalars so
  that they add up over batches like the counts; see
  `g2d_jax.calibration`). `metrics.summarize_counts` turns them into
  `ece/<head>`.
  """
  w = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(
      jnp.float32)
  counts = {"count": jnp.sum(w)}
  heads = {"fused": outputs.logits, **{f"modality/{m}": v for m, v in
                                       outputs.modality_logits.items()}}
  # A method's own unimodal heads (MLB, MMPareto): what their released code
  # reports as the modalities' accuracy.
  heads.update({f"aux/{m}": v for m, v in
                getattr(outputs, "head_logits", {}).items()})
  for name, logits in heads.items():
    if task == "regression":
      pred = g2d_jax.losses.regression_prediction(logits)
      counts[f"abs_err/{name}"] = jnp.sum(w * jnp.abs(pred - labels))
    else:
      counts[f"correct/{name}"] = jnp.sum(
          w * (jnp.argmax(logits, -1) == labels))
      if calibration_bins:
        # The head's mean softmax probability of the true class: Eq. 5's
        # confidence, for the paper's confidence-ratio analysis (Fig. 6).
        p_true = jnp.take_along_axis(
            jax.nn.softmax(logits.astype(jnp.float32), -1),
            labels[:, None].astype(jnp.int32), -1)[:, 0]
        counts[f"psum/true_class_prob/{name}"] = jnp.sum(w * p_true)
        _, correct_M, conf_M = calibration.calibration_bins(
            logits, labels, calibration_bins, mask_B=w)
        for b in range(calibration_bins):
          counts[f"ece_bins/{name}/correct/{b:02d}"] = correct_M[b]
          counts[f"ece_bins/{name}/conf/{b:02d}"] = conf_M[b]
  return counts


ALL = -1  # pattern: every modality trains (or a fractional gate)


class GateSpec:
  """SMP gating of the student, computed per batch next to the data.

  The gate depends only on the batch's cached teacher logits, its labels and
  the epoch, so the input pipeline computes it (with the core functions
  `teacher_confidence`, `smp_kappa`, `partial_kappa`, jitted on the host CPU
  device) before the step runs. The step receives kappa as a traced
  argument, and the host also knows the gating *pattern* (which single
  modality trains, or all), which lets it run a step specialised to that
  pattern: the frozen branches' backward passes are never computed.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               modalities: Sequence[str], task: str):
    g = config.gating
    self.enabled = methods_lib.smp_enabled(config)
    self.modalities = tuple(modalities)
    self.taus = tuple(int(t) for t in g.taus)
    self.semantics = g.semantics
    self.partial = g.suppression == "partial"
    self.strength = float(g.partial_strength)
    self.task = task
    # Skipping a frozen branch's backward is exact only for 0/1 gates.
    self.skip_frozen = (self.enabled and bool(g.skip_frozen_backward)
                        and not self.partial)
    self._device = jax.devices("cpu")[0]
    self._compute = jax.jit(self.kappa)

  def kappa(self, teacher_logits: Mapping[str, Array], labels: Array,
            epoch: Array) -> tuple[dict[str, Array], dict[str, Array]]:
    """(kappa, teacher confidence) of a batch: Eq. 5-7 (or Table 6)."""
    rho = g2d_jax.teacher_confidence(teacher_logits, labels, task=self.task)
    if self.partial:
      part = g2d_jax.partial_kappa(rho, self.strength, self.modalities)
      active = g2d_jax.smp_active(epoch, self.taus)
      kappa = {m: jnp.where(active, part[m], 1.0) for m in self.modalities}
    else:
      kappa = g2d_jax.smp_kappa(rho, epoch, self.taus, self.modalities)
    return kappa, rho

  def for_batch(self, batch: Mapping[str, Any], epoch: int) -> dict[str, Any]:
    """{"kappa", "confidence", "pattern"} of a host batch (host values)."""
    if not self.enabled:
      return {"kappa": {m: np.float32(1.0) for m in self.modalities},
              "confidence": {}, "pattern": ALL}
    args = jax.device_put((batch["teacher"]["logits"], batch["label"],
                           np.int32(epoch)), self._device)
    kappa, rho = jax.device_get(self._compute(*args))
    k = [float(kappa[m]) for m in self.modalities]
    pattern = ALL
    if self.skip_frozen and sorted(k) == [0.0] * (len(k) - 1) + [1.0]:
      pattern = k.index(1.0)
    return {"kappa": kappa, "confidence": rho, "pattern": pattern}


def _frozen_view(params: Any, modality: str, semantics: str) -> Any:
  """params with modality's gated leaves behind stop_gradient.

  Under "freeze" the whole branch is constant, so XLA drops its entire
  backward pass; under "reference" only the conv kernels (whose gradient the
  gate multiplies by 0 anyway) are, which drops their weight-gradient convs.
  """
  def visit(path, leaf):
    keys = [getattr(p, "key", None) for p in path]
    if modality not in keys:
      return leaf
    if semantics == "freeze" or g2d_jax.gating.conv_kernel(path, leaf):
      return jax.lax.stop_gradient(leaf)
    return leaf
  return jax.tree_util.tree_map_with_path(visit, params)


class TrainStep:
  """`step(state, batch, epoch, rng) -> (state, metrics)`.

  One jitted, state-donating function per gating pattern: the plain step
  (pattern ALL: every branch's backward, the gate applied by the optimizer)
  and, with `gate.skip_frozen`, one step per "modality i trains alone"
  pattern whose other branches sit behind `stop_gradient`. The optimizer
  still receives the traced kappa, so a pattern step computes exactly the
  update of the plain step, without the frozen branches' backward passes.
  Patterns compile on first use. `batch["gate"]` (from `GateSpec.for_batch`)
  carries kappa and the host-side pattern. Methods whose hooks read or
  rewrite gradients (`Method.skip_frozen_exact` is False) always run the
  plain step.

  The method's hooks (see `g2d_jax.methods.base`) plug in here: its loss,
  optional gradient modulation, custom gradient computation or multi-update
  rule, and its state in `TrainState.method_state`. SMP composes with all of
  them through the gated optimizer: whatever the method does to a gradient
  or an update, the gate then multiplies the modality's update by kappa.
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation,
               method: Method, task: str, gate: GateSpec | None = None):
    self.model, self.tx, self.method, self.task = model, tx, method, task
    self.gate = gate
    self._jitted: dict[int, Any] = {}

  def _build(self, pattern: int):
    model, tx, method, gate = self.model, self.tx, self.method, self.gate

    def step(state: TrainState, batch, epoch, rng):
      rng = jax.random.fold_in(rng, state.step)
      batch = dict(batch, epoch=epoch, step=state.step,
                   method_state=state.method_state)
      frozen = ([] if pattern == ALL else
                [m for j, m in enumerate(gate.modalities) if j != pattern])

      def forward(params):
        # stop_gradient must act inside the differentiated function: on the
        # parameters `value_and_grad` differentiates, not on its argument.
        for m in frozen:
          params = _frozen_view(params, m, gate.semantics)
        return apply_model(model, params, state.batch_stats, batch["inputs"],
                           train=True, rng=rng)

      metrics = {}
      gate_kappa = None
      if gate is not None:
        gate_kappa = batch["gate"]["kappa"]
        metrics.update({f"kappa/{m}": v for m, v in gate_kappa.items()})
        metrics.update({f"confidence/{m}": v for m, v in
                        batch["gate"]["confidence"].items()})

      def apply(grads, params, opt_state, mask=None):
        """One optimizer update; `mask` multiplies the SMP kappa."""
        extra = {}
        if gate_kappa is not None:
          kappa = dict(gate_kappa)
          if mask is not None:
            kappa = {m: k * mask[m] for m, k in kappa.items()}
          extra["kappa"] = kappa
        elif mask is not None:
          raise ValueError(f"method {method.name!r} masks its optimizer "
                           "updates per modality, which needs the gated "
                           "student optimizer (g2d_jax.smp_optimizer).")
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return optax.apply_updates(params, updates), opt_state

      method_state = state.method_state
      if method.update is not None:
        res = method.update(forward, state.params, state.opt_state, batch, rng,
                            apply)
        params, opt_state, new_bs = res.params, res.opt_state, res.batch_stats
        loss, parts, out = res.loss, res.metrics, res.outputs
        method_state = res.method_state
      else:
        if method.compute_grads is not None:
          loss, parts, out, new_bs, grads = method.compute_grads(
              forward, state.params, batch, rng)
        else:
          def loss_fn(params):
            out, new_bs = forward(params)
            loss, parts = method.loss(out, batch)
            return loss, (parts, new_bs, out)

          (loss, (parts, new_bs, out)), grads = jax.value_and_grad(
              loss_fn, has_aux=True)(state.params)
        if method.modulate_grads is not None:
          grads, gmetrics = method.modulate_grads(grads, out, batch, epoch,
                                                  rng)
          metrics.update(gmetrics)
        params, opt_state = apply(grads, state.params, state.opt_state)
      metrics["loss"] = loss
      # Loss terms are reported as `loss/<term>`; a method's own diagnostics
      # (named `<method>/...`) as they are.
      own = method.name + "/"
      metrics.update({k if k.startswith(own) else f"loss/{k}": v
                      for k, v in parts.items()})
      metrics.update(correct_counts(out, batch["label"], self.task))
      return state.replace(step=state.step + 1, params=params,
                           batch_stats=new_bs, opt_state=opt_state,
                           method_state=method_state), metrics

    return jax.jit(step, donate_argnums=(0,))

  def __call__(self, state: TrainState, batch: Mapping[str, Any], epoch: Any,
               rng: Array) -> tuple[TrainState, dict[str, Array]]:
    batch = dict(batch)
    pattern = ALL
    if "gate" in batch:
      gate = dict(batch["gate"])
      pattern = int(gate.pop("pattern"))
      batch["gate"] = gate
    if not self.method.skip_frozen_exact:
      pattern = ALL
    if pattern not in self._jitted:
      self._jitted[pattern] = self._build(pattern)
    return self._jitted[pattern](state, batch, epoch, rng)

  def compiled_patterns(self) -> dict[int, int]:
    """{pattern: number of compilations} (tests check it stays at 1)."""
    return {p: f._cache_size() for p, f in self._jitted.items()}  # pylint: disable=protected-access


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    method: Method, task: str,
                    gate: GateSpec | None = None) -> TrainStep:
  """The training step of a teacher (no gate) or a student (with its gate)."""
  return TrainStep(model, tx, method, task, gate)


def feature_cosine(student_BxD: Array, teacher_BxD: Array) -> Array:
  """Per-sample cosine similarity [B] of student and teacher features (the
  feature-alignment analysis of the paper's Fig. 5); 0 for a zero vector."""
  s = student_BxD.astype(jnp.float32)
  t = teacher_BxD.astype(jnp.float32)
  norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
  return jnp.sum(s * t, axis=-1) / jnp.maximum(norms, 1e-12)


def make_eval_step(model: nn.Module, task: str,
                   collect: bool = False) -> Callable[..., Any]:
  """Builds `eval_step(params, batch_stats, batch) -> counts[, outputs]`.

  Counts (summed over the batch's unmasked samples; see
  `metrics.summarize_counts`): correct predictions or absolute errors per
  head, ECE bins, each head's true-class probability and, when the batch
  carries cached teacher features, the student-teacher feature cosine per
  modality. A batch with `present` ({m: [B] 0/1}) is scored with those
  modalities missing.
  """

  def eval_step(params, batch_stats, batch):
    out, _ = apply_model(model, params, batch_stats, batch["inputs"],
                         train=False, present=batch.get("present"))
    counts = correct_counts(out, batch["label"], task, batch["mask"],
                            calibration_bins=ECE_BINS)
    teacher = batch.get("teacher", {}).get("features", {})
    for m, t in teacher.items():
      if m in out.features and out.features[m].shape == t.shape:
        counts[f"psum/cosine/{m}"] = jnp.sum(
            batch["mask"] * feature_cosine(out.features[m], t))
    return (counts, out) if collect else counts

  return jax.jit(eval_step)
