"""Stage 1: train one unimodal teacher per modality, select by validation."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from absl import logging
import jax
import ml_collections

from g2d_jax import artifacts
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.errors import CacheMismatchError
from g2d_jax.methods import joint
from g2d_jax.pipeline import build
from g2d_jax.pipeline import checkpoint
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import records
from g2d_jax.pipeline import scoring
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import trainer


def teacher_dir(workdir: str, m: str) -> str:
  return os.path.join(workdir, "teachers", m)


def fingerprint(config: ml_collections.ConfigDict,
                dataset: MultimodalDataset, m: str) -> dict[str, Any]:
  return {"modality": m, "seed": config.seed,
          "encoder": build.encoder_spec(config, m),
          "train": artifacts.plain(config.teacher),
          "data": dataset.fingerprint}


def train_teachers(config: ml_collections.ConfigDict,
                   dataset: MultimodalDataset, workdir: str,
                   mesh: jax.sharding.Mesh,
                   stop_after_steps: int | None = None,
                   on_rate: Callable[[float, int], None] | None = None
                   ) -> dict[str, Any]:
  """Trains (or finds already trained) teachers; returns their val results.
  `on_rate` is `trainer.fit`'s."""
  results = {}
  train = dataset.splits["train"]
  spe = loader.steps_per_epoch(train.num_samples, config.teacher.batch_size)
  for m in dataset.modalities:
    directory = teacher_dir(workdir, m)
    fp = fingerprint(config, dataset, m)
    done = records.stage_done(directory, fp)
    if done is not None:
      logging.info("teacher/%s: already trained (best epoch %d), skipping",
                   m, done["best"]["epoch"])
      results[m] = done
      continue
    model = build.teacher_model(config, dataset, m)
    tx = steps.make_optimizer(config.teacher.optimizer, spe,
                              config.teacher.epochs)
    state = build.new_state(model, tx, train, config.seed, mesh)
    # A teacher is a unimodal model trained on the supervised loss alone.
    step = steps.TrainStep(model, tx, joint.build(config, dataset.task),
                           dataset.task)
    eval_step = scoring.make_eval_step(model, dataset.task)
    val = dataset.splits["val"]
    fit = trainer.fit(
        name=f"teacher/{m}", directory=directory, state=state, step_fn=step,
        train_split=train, batch_size=config.teacher.batch_size,
        epochs=config.teacher.epochs, seed=config.seed, task=dataset.task,
        evaluate=functools.partial(
            scoring.evaluate_split, eval_step, split=val,
            batch_size=config.eval.batch_size, mesh=mesh),
        mesh=mesh, fingerprint=fp, log_every_steps=config.log_every_steps,
        checkpoint_every_steps=config.teacher.checkpoint_every_steps,
        log_config=config.logging, on_rate=on_rate,
        stop_after_steps=stop_after_steps)
    results[m] = records.mark_done(directory, fp, {
        "best": fit.best, "digest": records.weights_digest(fit.weights)})
  return results


def teacher_record(config: ml_collections.ConfigDict,
                   dataset: MultimodalDataset, workdir: str,
                   m: str) -> dict[str, Any]:
  """The done record of a trained teacher; raises if there is none."""
  directory = teacher_dir(workdir, m)
  record = records.stage_done(directory, fingerprint(config, dataset, m))
  if record is None:
    raise CacheMismatchError(
        f"no trained {m} teacher for these settings in {directory}; run "
        "--mode=teachers (or --mode=all) with this config first.")
  return record


def teacher_digests(config: ml_collections.ConfigDict,
                    dataset: MultimodalDataset,
                    workdir: str) -> dict[str, str]:
  """sha256 of each trained teacher's selected weights."""
  return {m: teacher_record(config, dataset, workdir, m)["digest"]
          for m in dataset.modalities}


def load_teacher(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
                 workdir: str, m: str, mesh: jax.sharding.Mesh):
  """(model, best weights) of a trained teacher; raises if it is missing."""
  record = teacher_record(config, dataset, workdir, m)
  model = build.teacher_model(config, dataset, m)
  like = build.abstract_weights(model, dataset.splits["train"], config.seed,
                                mesh)
  ckpt = checkpoint.RunCheckpoints(
      os.path.join(teacher_dir(workdir, m), "checkpoints"))
  try:
    weights, _ = ckpt.restore_best(like)
  finally:
    ckpt.close()
  if records.weights_digest(weights) != record["digest"]:
    raise CacheMismatchError(
        f"the {m} teacher's checkpoint in {teacher_dir(workdir, m)} does not "
        "match its done.json digest (modified or partly written); delete "
        f"{teacher_dir(workdir, m)} and run --mode=teachers.")
  return model, weights
