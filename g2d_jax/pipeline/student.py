"""Stage 3: train the multimodal student with the configured method + SMP."""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import g2d_jax
from g2d_jax import methods
from g2d_jax import models
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.errors import CacheMismatchError
from g2d_jax.errors import ConfigError
from g2d_jax.methods import heads as method_heads
from g2d_jax.methods import ume
from g2d_jax.pipeline import checkpoint
from g2d_jax.pipeline import common
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import metrics as metrics_lib
from g2d_jax.pipeline import precompute
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import teachers as teachers_lib
from g2d_jax.pipeline import trainer


def student_dir(workdir: str, config: ml_collections.ConfigDict) -> str:
  name = f"student_{config.run_name}" if config.run_name else "student"
  return os.path.join(workdir, name)


def needed_teacher_outputs(config: ml_collections.ConfigDict,
                           method: methods.Method) -> frozenset[str]:
  keys = set(method.teacher_outputs)
  if methods.smp_enabled(config) and method.trains_student:
    keys.add("logits")  # teacher confidence drives the SMP gate
  return frozenset(keys)


def fingerprint(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
                teacher_digests: dict[str, str] | None) -> dict[str, Any]:
  return {"seed": config.seed, "method": config.method,
          "smp": methods.smp_enabled(config),
          "gating": common.to_dict(config.gating),
          "g2d": common.to_dict(config.g2d),
          "method_config": common.to_dict(config.get(config.method, {})),
          "model": common.to_dict(config.model),
          "train": common.to_dict(config.student),
          "data": dataset.fingerprint, "teachers": teacher_digests}


def build_method(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
                 steps_per_epoch: int | None = None) -> methods.Method:
  return methods.build_method(config, dataset.task,
                              modalities=tuple(dataset.modalities),
                              steps_per_epoch=steps_per_epoch)


def student_model(config: ml_collections.ConfigDict,
                  dataset: MultimodalDataset,
                  method: methods.Method) -> nn.Module:
  """The student, with the method's extra heads if it has any."""
  return method_heads.wrap(common.student_model(config, dataset), method.heads,
                           dataset.num_classes, dataset.modalities)


def build(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
          steps_per_epoch: int):
  """(model, tx, method, gate, step_fn) for the student."""
  method = build_method(config, dataset, steps_per_epoch)
  model = student_model(config, dataset, method)
  params, _ = jax.eval_shape(lambda: steps.init_variables(
      model, common.example_inputs(dataset.splits["train"], 2), config.seed))
  labels = g2d_jax.modality_labels(params, dataset.modalities)
  if config.gating.semantics == "reference" and methods.smp_enabled(config):
    gated = {label for (path, leaf), label in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(labels))
             if g2d_jax.gating.conv_kernel(path, leaf)}
    for m in dataset.modalities:
      if m not in gated:
        raise ConfigError(
            f"config.gating.semantics='reference' gates only conv kernels "
            f"(the official code's rule) and the {m!r} encoder has none; "
            "use --config.gating.semantics=freeze.")
  # A method with several optimizer updates per batch (MLA) advances the
  # schedule's step count that many times per batch.
  tx = g2d_jax.smp_optimizer(
      steps.make_optimizer(config.student.optimizer,
                           steps_per_epoch * method.updates_per_step),
      labels, semantics=config.gating.semantics)
  gate = steps.GateSpec(config, dataset.modalities, dataset.task)
  step = steps.make_train_step(model, tx, method, dataset.task, gate)
  return model, tx, method, gate, step


def new_state(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
              model: nn.Module, tx: Any, method: methods.Method,
              mesh: jax.sharding.Mesh) -> steps.TrainState:
  """The initial student state, with the method's state if it has one."""
  train = dataset.splits["train"]
  state = common.new_state(model, tx, train, config.seed, mesh)
  if method.init_state is not None:
    example = common.example_inputs(train, 2)
    outputs = jax.eval_shape(
        lambda p, b: steps.apply_model(model, p, b, example, train=False)[0],
        state.params, state.batch_stats)
    state = state.replace(method_state=mesh_lib.replicate(
        method.init_state(state.params, outputs), mesh))
  return state


def make_epoch_hook(method: methods.Method, model: nn.Module, train: Any,
                    batch_size: int, seed: int, mesh: jax.sharding.Mesh):
  """`hook(state, epoch) -> state` running the method's `epoch_hook`: an
  inference-mode pass over the first batches of the epoch (the ones it is
  about to train on), whose summed statistics update the method state."""
  hook = method.epoch_hook
  if hook is None:
    return None
  n = hook.num_batches(loader.steps_per_epoch(len(train), batch_size))

  @jax.jit
  def accumulate(params, batch_stats, batch):
    out, _ = steps.apply_model(model, params, batch_stats, batch["inputs"],
                               train=False)
    return hook.accumulate(out, batch)

  finish = jax.jit(hook.finish)

  def run(state: steps.TrainState, epoch: int) -> steps.TrainState:
    sums = None
    batches = loader.train_batches(train, batch_size, seed=seed, epoch=epoch)
    for _, batch in zip(range(n), batches):
      s = accumulate(state.params, state.batch_stats,
                     mesh_lib.shard_batch(batch, mesh))
      sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    new = finish(state.method_state, sums, np.int32(epoch))
    return state.replace(method_state=mesh_lib.replicate(new, mesh))

  return run


def train_student(config: ml_collections.ConfigDict,
                  dataset: MultimodalDataset, workdir: str,
                  mesh: jax.sharding.Mesh,
                  stop_after_steps: int | None = None) -> dict[str, Any]:
  train = dataset.splits["train"]
  spe = loader.steps_per_epoch(len(train), config.student.batch_size)
  method = build_method(config, dataset, spe)
  keys = needed_teacher_outputs(config, method)
  digests = (teachers_lib.teacher_digests(config, dataset, workdir)
             if keys or not method.trains_student else None)
  directory = student_dir(workdir, config)
  fp = fingerprint(config, dataset, digests)
  done = common.stage_done(directory, fp)
  if done is not None:
    logging.info("student: already trained (best epoch %s), skipping",
                 done["best"]["epoch"])
    return done
  val = dataset.splits["val"]
  if not method.trains_student:
    # UME: nothing to train; the "student" is the teachers' ensemble.
    eval_step, params, batch_stats = ensemble(config, dataset, workdir, mesh)
    scores = common.evaluate_split(eval_step, params, batch_stats, val,
                                   config.eval.batch_size, mesh, dataset.task)
    logging.info("student (%s ensemble of the teachers): val %s",
                 config.method, scores)
    os.makedirs(directory, exist_ok=True)
    result = {"best": {"epoch": None, "val": scores}}
    common.mark_done(directory, fp, result)
    return common.to_dict({"fingerprint": fp, **result})
  cache = precompute.load_cache(workdir, dataset, digests) if keys else None
  # Feature alignment with the teachers is reported for every method whose
  # workdir has a teacher cache, including those that do not train on it.
  diag = cache if cache is not None else diagnostics_cache(config, dataset,
                                                           workdir)
  model, tx, _, gate, step = build(config, dataset, spe)
  state = new_state(config, dataset, model, tx, method, mesh)
  eval_step = steps.make_eval_step(model, dataset.task)

  def scorer(split_name):
    split = dataset.splits[split_name]
    teacher = diag[split_name] if diag is not None else None
    return lambda p, b: common.evaluate_split(
        eval_step, p, b, split, config.eval.batch_size, mesh, dataset.task,
        teacher=teacher)

  fit = trainer.fit(
      name="student", directory=directory, state=state, step_fn=step,
      train_split=train, batch_size=config.student.batch_size,
      epochs=config.student.epochs, seed=config.seed, task=dataset.task,
      evaluate=scorer("val"),
      monitors={"test": scorer("test")} if config.eval.test_every_epoch
      else None,
      mesh=mesh, fingerprint=fp,
      teacher=cache["train"] if cache else None, teacher_keys=keys,
      gate=gate.for_batch,
      epoch_hook=make_epoch_hook(method, model, train,
                                 config.student.batch_size, config.seed, mesh),
      log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.student.checkpoint_every_steps,
      stop_after_steps=stop_after_steps)
  plot(fit.history, directory, dataset.modalities, config.method)
  result = {"best": fit.best}
  common.mark_done(directory, fp, result)
  return common.to_dict({"fingerprint": fp, **result})


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


def ensemble(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
             workdir: str, mesh: jax.sharding.Mesh):
  """(eval_step, params, batch_stats) of the teachers' ensemble (UME).

  `eval_step(params, batch_stats, batch) -> counts` runs every teacher and
  reports the combined logits as "fused" and each teacher as its modality,
  so `common.evaluate_split` scores it like a student.
  """
  teacher_models, params, batch_stats = {}, {}, {}
  for m in dataset.modalities:
    model, weights = teachers_lib.load_teacher(config, dataset, workdir, m,
                                               mesh)
    teacher_models[m] = model
    params[m], batch_stats[m] = weights["params"], weights["batch_stats"]
  combine = config.ume.combine

  @jax.jit
  def eval_step(params, batch_stats, batch):
    outs = {m: steps.apply_model(teacher_models[m], params[m], batch_stats[m],
                                 batch["inputs"], train=False)[0]
            for m in dataset.modalities}
    logits = {m: o.logits for m, o in outs.items()}
    out = models.MultimodalOutput(
        ume.ensemble_logits(logits, combine), logits,
        {m: o.features[m] for m, o in outs.items()})
    return steps.correct_counts(out, batch["label"], dataset.task,
                                batch["mask"],
                                calibration_bins=steps.ECE_BINS)

  return eval_step, params, batch_stats


def plot(history, directory: str, modalities,
         method: str = "") -> str | None:
  """Per-modality validation accuracy and ECE, teacher confidence, kappa and
  the method's per-modality coefficients (OGM's, MLB's k) by epoch."""
  del modalities
  groups = {"val/accuracy/": "val accuracy", "val/ece/": "val ECE",
            "train/confidence/": "teacher confidence (mean over batches)",
            "train/kappa/": "kappa (share of batches training)",
            "val/mae/": "val MAE"}
  if method:
    groups[f"train/{method}/coeff/"] = f"{method} coefficient (batch mean)"
  return metrics_lib.plot_curves(
      history, os.path.join(directory, "curves.png"), f"student ({method})"
      if method else "student", groups)


def load_student(config, dataset, workdir, mesh):
  """(model, best weights) of the trained student."""
  directory = student_dir(workdir, config)
  if not os.path.exists(os.path.join(directory, common.DONE)):
    raise CacheMismatchError(
        f"no trained student in {directory}; run --mode=student (or "
        "--mode=all) first.")
  model = student_model(config, dataset, build_method(config, dataset))
  like = common.abstract_weights(model, dataset.splits["train"], config.seed,
                                 mesh)
  ckpt = checkpoint.RunCheckpoints(os.path.join(directory, "checkpoints"))
  try:
    weights, meta = ckpt.restore_best(like)
  finally:
    ckpt.close()
  return model, weights, meta

