"""Stage 3: train the multimodal student with the configured method + SMP."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import g2d_jax
from g2d_jax import artifacts
from g2d_jax import methods
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.errors import CacheMismatchError
from g2d_jax.errors import ConfigError
from g2d_jax.errors import TrainingError
from g2d_jax.methods import heads as method_heads
from g2d_jax.pipeline import build
from g2d_jax.pipeline import checkpoint
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import logs
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import precompute
from g2d_jax.pipeline import records
from g2d_jax.pipeline import scoring
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import teachers as teachers_lib
from g2d_jax.pipeline import trainer


def student_dir(workdir: str, config: ml_collections.ConfigDict) -> str:
  name = f"student_{config.run_name}" if config.run_name else "student"
  return os.path.join(workdir, name)


@dataclasses.dataclass(frozen=True)
class Student:
  """Everything that trains, evaluates or benchmarks one student.

  Attributes:
    method: the configured method.
    model: the student model, with the method's extra heads.
    tx: the SMP-gated optimizer.
    gate: the per-batch SMP gate (kappa = 1 everywhere when SMP is off).
    step: the jitted training step.
    state: the initial `TrainState` (replicated on the mesh), or with
      `build_student(init=False)` its abstract shapes and shardings (a
      checkpoint's restore target).
    steps_per_epoch: training batches per epoch.
    initial_state: `() -> TrainState`, computes the initial state.
  """
  method: methods.Method
  model: nn.Module
  tx: optax.GradientTransformation
  gate: loader.GateSpec
  step: steps.TrainStep
  state: steps.TrainState
  steps_per_epoch: int
  initial_state: Callable[[], steps.TrainState]

  @property
  def teacher_outputs(self) -> frozenset[str]:
    """The cached teacher outputs the training batches need."""
    keys = set(self.method.spec.teacher_outputs)
    if self.gate.enabled:
      keys.add("logits")  # teacher confidence drives the SMP gate
    return frozenset(keys)

  def abstract_weights(self) -> dict[str, Any]:
    """{"params", "batch_stats"} shapes: the best checkpoint's target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"params": self.state.params, "batch_stats": self.state.batch_stats})


def build_student(config: ml_collections.ConfigDict,
                  dataset: MultimodalDataset, mesh: jax.sharding.Mesh, *,
                  init: bool = True) -> Student:
  """Method, model, optimizer, gate, step and state of the student.

  The one place that turns a config into a student, for training,
  evaluation and benchmarks alike. With `init=False` nothing runs: the state
  holds shapes only.

  Raises:
    ConfigError: the method cannot run with these settings.
  """
  train = dataset.splits["train"]
  spe = loader.steps_per_epoch(train.num_samples, config.student.batch_size)
  if spe == 0:
    raise TrainingError(
        f"student: the training split has {train.num_samples} examples, "
        f"fewer than one batch of {config.student.batch_size}; lower "
        "--config.student.batch_size.")
  modalities = tuple(dataset.modalities)
  method = methods.build_method(config, dataset.task, modalities=modalities,
                                steps_per_epoch=spe)
  model = method_heads.wrap(build.student_model(config, dataset),
                            method.spec.heads, dataset.num_classes, modalities)
  example = build.example_inputs(train, 2)
  params, _ = jax.eval_shape(
      lambda: steps.init_variables(model, example, config.seed))
  labels = g2d_jax.modality_labels(params, modalities,
                                   scope=config.gating.freeze_scope)
  if config.gating.semantics == "reference" and methods.smp_enabled(config):
    gated = {label for (path, leaf), label in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(labels))
             if g2d_jax.gating.conv_kernel(path, leaf)}
    for m in modalities:
      if m not in gated:
        raise ConfigError(
            f"config.gating.semantics='reference' gates only conv kernels "
            f"(the official code's rule) and the {m!r} encoder has none; "
            "use --config.gating.semantics=freeze.")
  # A method with several optimizer updates per batch (MLA) advances the
  # schedule's step count that many times per batch.
  tx = g2d_jax.smp_optimizer(
      steps.make_optimizer(config_lib.student_optimizer(config),
                           spe * method.spec.updates_per_step,
                           config.student.epochs),
      labels, semantics=config.gating.semantics)
  gate = loader.GateSpec(config, modalities, dataset.task)
  step = steps.TrainStep(model, tx, method, dataset.task, gate)

  def initial_state():
    state = build.new_state(model, tx, train, config.seed, mesh)
    if method.init_state is None:
      return state
    outputs = jax.eval_shape(
        lambda p, b: steps.apply_model(model, p, b, example, train=False)[0],
        state.params, state.batch_stats)
    return state.replace(method_state=mesh_lib.replicate(
        method.init_state(state.params, outputs), mesh))

  if init:
    state = initial_state()
  else:
    sharding = mesh_lib.replicated(mesh)
    state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        jax.eval_shape(initial_state))
  return Student(method, model, tx, gate, step, state, spe, initial_state)


def fingerprint(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
                teacher_digests: dict[str, str] | None) -> dict[str, Any]:
  return {"seed": config.seed, "method": config.method,
          "smp": methods.smp_enabled(config),
          "gating": artifacts.plain(config.gating),
          "g2d": artifacts.plain(config.g2d),
          "method_config": artifacts.plain(config.get(config.method, {})),
          "model": artifacts.plain(config.model),
          "train": artifacts.plain(config.student),
          "schedule": config_lib.resolve_schedule(config),
          "data": dataset.fingerprint, "teachers": teacher_digests}


def make_epoch_hook(student: Student, train: Any, batch_size: int, seed: int,
                    mesh: jax.sharding.Mesh, val: Any = None,
                    probe_tx: optax.GradientTransformation | None = None):
  """`hook(state, epoch) -> state` running the method's `epoch_hook`: an
  inference-mode pass over the first batches of the epoch (the ones it is
  about to train on) or of the validation split `val` (the hook's `split`),
  whose summed (or concatenated, `reduce="concat"`) statistics update the
  method state; or, for a `ProbeHook`,
  its probe trainings (`make_probe_hook`) with the optimizer `probe_tx`
  (`probe_optimizer`)."""
  hook, model = student.method.epoch_hook, student.model
  if hook is None:
    return None
  if isinstance(hook, methods.ProbeHook):
    if val is None or probe_tx is None:
      raise ValueError(f"method {student.method.name!r} trains probes at "
                       "epoch starts; pass `val` and `probe_tx`.")
    return make_probe_hook(student, hook, train, val, batch_size, seed, mesh,
                           probe_tx)
  if hook.split == "val" and val is None:
    raise ValueError(f"method {student.method.name!r} has an epoch hook on "
                     "the validation split; pass the split as `val`.")
  if hook.split == "val":
    n = hook.num_batches(-(-len(val) // batch_size))  # padded, so ceil
  else:
    n = hook.num_batches(loader.steps_per_epoch(train.num_samples, batch_size))

  def batches(epoch: int):
    if hook.split == "val":
      return loader.eval_batches(val, batch_size)
    def with_mask(batch):
      batch["mask"] = np.ones(len(batch["label"]), bool)
      return batch
    return map(with_mask, loader.train_batches(train, batch_size, seed=seed,
                                               epoch=epoch))

  @jax.jit
  def accumulate(params, batch_stats, batch):
    out, _ = steps.apply_model(model, params, batch_stats, batch["inputs"],
                               train=False)
    return hook.accumulate(out, batch)

  finish = jax.jit(hook.finish)

  def run(state: steps.TrainState, epoch: int) -> steps.TrainState:
    reduced, rows = None, []
    for _, batch in zip(range(n), batches(epoch)):
      s = accumulate(state.params, state.batch_stats,
                     mesh_lib.shard_batch(batch, mesh))
      if hook.reduce == "concat":
        rows.append(s)
      else:
        reduced = s if reduced is None else jax.tree.map(jnp.add, reduced, s)
    if hook.reduce == "concat":
      reduced = jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *rows)
    new = finish(state.method_state, reduced, np.int32(epoch))
    return state.replace(method_state=mesh_lib.replicate(new, mesh))

  return run


def probe_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                    ) -> optax.GradientTransformation:
  """The student's optimizer at its initial, constant rate: what a probe
  training (`ProbeHook`) starts from, fresh each time."""
  opt = config_lib.student_optimizer(config)
  opt.decay_fractions, opt.decay_epochs = (), ()
  return steps.make_optimizer(opt, steps_per_epoch, config.student.epochs)


def make_probe_hook(student: Student, hook: methods.ProbeHook, train: Any,
                    val: Any, batch_size: int, seed: int,
                    mesh: jax.sharding.Mesh,
                    tx: optax.GradientTransformation):
  """`hook(state, epoch) -> state` running a `ProbeHook`'s trainings at the
  start of every `hook.every`-th epoch (see `methods.ProbeHook`)."""
  model = student.model

  def make_step(probe: str):
    def step(params, opt_state, batch_stats, batch, rng):
      def fn(p):
        out, new_stats = steps.apply_model(
            model, p, batch_stats, hook.inputs(probe, batch["inputs"]),
            train=True, rng=rng)
        return jnp.mean(hook.loss(probe, out, batch["label"])), new_stats
      (loss, new_stats), grads = jax.value_and_grad(fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, new_stats, loss

    def val_loss(params, batch_stats, batch):
      out, _ = steps.apply_model(model, params, batch_stats,
                                 hook.inputs(probe, batch["inputs"]),
                                 train=False)
      mask = batch["mask"].astype(jnp.float32)
      per = hook.loss(probe, out, batch["label"])
      return jnp.sum(per * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    return jax.jit(step, donate_argnums=(1,)), jax.jit(val_loss)

  jitted = {probe: make_step(probe) for probe in hook.probes}
  finish = jax.jit(hook.finish)

  def validate(val_fn, params, batch_stats):
    total = jnp.float32(0.0)
    for batch in loader.eval_batches(val, batch_size):
      total = total + val_fn(params, batch_stats,
                             mesh_lib.shard_batch(batch, mesh))
    return total

  def run(state: steps.TrainState, epoch: int) -> steps.TrainState:
    if not hook.runs_at(epoch):
      return state
    losses = {}
    for j, probe in enumerate(hook.probes):
      step_fn, val_fn = jitted[probe]
      params, batch_stats = state.params, state.batch_stats
      opt_state = tx.init(params)
      stream = loader.epoch_seed(seed, 1_000_003 * (epoch + 1) + j)
      rng = jax.random.key(stream)
      train_sums, val_sums = [], []
      for e in range(hook.epochs):
        total = jnp.float32(0.0)
        for i, batch in enumerate(loader.train_batches(
            train, batch_size, seed=stream, epoch=e)):
          params, opt_state, batch_stats, loss = step_fn(
              params, opt_state, batch_stats,
              mesh_lib.shard_batch(batch, mesh),
              jax.random.fold_in(rng, e * 1_000_003 + i))
          total = total + loss
        train_sums.append(total)
        if e in (0, hook.epochs - 1):
          val_sums.append(validate(val_fn, params, batch_stats))
      if hook.epochs == 1:
        val_sums = val_sums * 2
      losses[probe] = {"train": jnp.stack(train_sums),
                       "val": jnp.stack(val_sums)}
    new = finish(state.method_state, losses, np.int32(epoch))
    return state.replace(method_state=mesh_lib.replicate(new, mesh))

  return run


def train_student(config: ml_collections.ConfigDict,
                  dataset: MultimodalDataset, workdir: str,
                  mesh: jax.sharding.Mesh,
                  stop_after_steps: int | None = None,
                  on_rate: Callable[[float, int], None] | None = None,
                  student: Student | None = None) -> dict[str, Any]:
  """Trains (or finds already trained) the student; returns its record
  (best epoch and validation scores, digest of the best weights).
  `on_rate` is `trainer.fit`'s; `student`, if given, is this config's
  `build_student(..., init=False)`."""
  if methods.trains_nothing(config.method):
    raise ConfigError(
        f"config.method={config.method!r} trains no student: it is the "
        "ensemble of the unimodal teachers, reported by the evaluation stage; "
        "run --mode=eval (or --mode=all).")
  if student is None:
    student = build_student(config, dataset, mesh, init=False)
  keys = student.teacher_outputs
  digests = (teachers_lib.teacher_digests(config, dataset, workdir)
             if keys else None)
  directory = student_dir(workdir, config)
  fp = fingerprint(config, dataset, digests)
  done = records.stage_done(directory, fp)
  if done is not None:
    logging.info("student: already trained (best epoch %s), skipping",
                 done["best"]["epoch"])
    return done
  cache = precompute.load_cache(workdir, dataset, digests) if keys else None
  # Feature alignment with the teachers is reported for every method whose
  # workdir has a teacher cache, including those that do not train on it.
  diag = cache if cache is not None else diagnostics_cache(config, dataset,
                                                           workdir)
  eval_step = scoring.make_eval_step(student.model, dataset.task)
  train = dataset.splits["train"]

  def scorer(split_name):
    split = dataset.splits[split_name]
    teacher = diag[split_name] if diag is not None else None
    return lambda p, b: scoring.evaluate_split(
        eval_step, p, b, split, config.eval.batch_size, mesh, teacher=teacher)

  fit = trainer.fit(
      name="student", directory=directory, state=student.initial_state(),
      step_fn=student.step, train_split=train,
      batch_size=config.student.batch_size, epochs=config.student.epochs,
      seed=config.seed, task=dataset.task, evaluate=scorer("val"),
      monitors={"test": scorer("test")} if config.eval.test_every_epoch
      else None,
      mesh=mesh, fingerprint=fp,
      teacher=cache["train"] if cache else None, teacher_keys=keys,
      gate=student.gate.for_batch,
      epoch_hook=make_epoch_hook(
          student, train, config.student.batch_size, config.seed, mesh,
          val=dataset.splits["val"],
          probe_tx=probe_optimizer(config, student.steps_per_epoch)),
      log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.student.checkpoint_every_steps,
      log_config=config.logging,
      plot=lambda history: plot(history, directory, config.method),
      on_rate=on_rate, stop_after_steps=stop_after_steps)
  return records.mark_done(directory, fp, {
      "best": fit.best, "digest": records.weights_digest(fit.weights)})


def diagnostics_cache(config: ml_collections.ConfigDict,
                      dataset: MultimodalDataset, workdir: str):
  """The workdir's teacher cache if it matches the trained teachers, else
  None (diagnostics are then skipped; training never depends on this)."""
  try:
    digests = teachers_lib.teacher_digests(config, dataset, workdir)
    return precompute.load_cache(workdir, dataset, digests)
  except CacheMismatchError as e:
    logging.info("student: no feature-alignment diagnostics (%s)", e)
    return None


def plot(history, directory: str, method: str = "") -> str | None:
  """Per-modality validation accuracy and ECE, teacher confidence, kappa and
  the method's per-modality coefficients (OGM's, MLB's k) by epoch."""
  groups = {"val/accuracy/": "val accuracy", "val/ece/": "val ECE",
            "train/confidence/": "teacher confidence (mean over batches)",
            "train/kappa/": "kappa (share of batches training)",
            "val/mae/": "val MAE"}
  if method:
    groups[f"train/{method}/coeff/"] = f"{method} coefficient (batch mean)"
  return logs.plot_curves(
      history, os.path.join(directory, "curves.png"), f"student ({method})"
      if method else "student", groups)


def load_student(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
                 workdir: str, mesh: jax.sharding.Mesh,
                 student: Student | None = None
                 ) -> tuple[Student, dict[str, Any], dict[str, Any]]:
  """(student, best weights, their metadata) of the trained student
  (`student`: this config's `build_student(..., init=False)`, if built)."""
  directory = student_dir(workdir, config)
  if not os.path.exists(os.path.join(directory, records.DONE)):
    raise CacheMismatchError(
        f"no trained student in {directory}; run --mode=student (or "
        "--mode=all) first.")
  if student is None:
    student = build_student(config, dataset, mesh, init=False)
  ckpt = checkpoint.RunCheckpoints(os.path.join(directory, "checkpoints"))
  try:
    weights, meta = ckpt.restore_best(student.abstract_weights())
  finally:
    ckpt.close()
  return student, weights, meta
