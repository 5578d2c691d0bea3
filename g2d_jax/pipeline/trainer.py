"""The training loop shared by teachers and students.

It owns everything that is not the method: batches, the jitted step, progress,
per-epoch validation and model selection, metrics files, checkpoints and
resuming. A resumed run replays exactly what an uninterrupted run computes:
batch order depends only on (seed, epoch), the step's randomness only on the
step number, and the state comes back from the checkpoint bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import jax
import numpy as np

from g2d_jax import artifacts
from g2d_jax.data.base import Split
from g2d_jax.errors import CacheMismatchError
from g2d_jax.errors import TrainingError
from g2d_jax.pipeline import checkpoint
from g2d_jax.pipeline import distributed
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import logs
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import metrics as metrics_lib
from g2d_jax.pipeline.steps import TrainState
from g2d_jax.progress import Progress

# Version of the metadata stored with the latest checkpoint (its `sums` are
# `pipeline.metrics` sums).
META_FORMAT = 2
# Per-step values written to steps.jsonl besides the loss.
_PER_STEP = ("kappa/", "confidence/")


class Interrupted(Exception):
  """Raised by `fit(stop_after_steps=...)`; tests use it to simulate a crash."""


@dataclasses.dataclass
class FitResult:
  weights: dict[str, Any]          # {"params": ..., "batch_stats": ...} best
  best: dict[str, Any]             # {"epoch": e, "val": {...}}
  history: list[dict[str, Any]]    # one record per epoch


def selection_score(val: Mapping[str, float], task: str) -> float:
  """Higher is better: fused validation accuracy, or -MAE for regression."""
  if task == "regression":
    return -val["mae/fused"]
  return val["accuracy/fused"]


def fit(*, name: str, directory: str, state: TrainState,
        step_fn: Callable[..., Any], train_split: Split, batch_size: int,
        epochs: int, seed: int, task: str,
        evaluate: Callable[[Any, Any], dict[str, float]],
        mesh: jax.sharding.Mesh, fingerprint: Mapping[str, Any],
        teacher: Mapping[str, Any] | None = None,
        teacher_keys: frozenset[str] = frozenset(),
        gate: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
        epoch_hook: Callable[[TrainState, int], TrainState] | None = None,
        monitors: Mapping[str, Callable[[Any, Any], dict[str, float]]]
        | None = None,
        log_every_steps: int = 100, checkpoint_every_steps: int = 0,
        log_config: Any = None,
        plot: Callable[[list[dict[str, Any]]], str | None] | None = None,
        on_rate: Callable[[float, int], None] | None = None,
        stop_after_steps: int | None = None) -> FitResult:
  """Trains `state` for `epochs`, resuming from `directory` if possible.

  Args:
    name: for log lines ("teacher/audio", "student").
    directory: where checkpoints and metrics go.
    state: the initial state (replicated on `mesh`).
    step_fn: jitted `step(state, batch, epoch, rng) -> (state, metrics)`.
    train_split: training data.
    batch_size: global batch size.
    epochs: number of epochs.
    seed: for batch order and the step's randomness.
    task: "classification" or "regression" (model selection).
    evaluate: `(params, batch_stats) -> metrics` on the validation split.
    mesh: the 'data' mesh.
    fingerprint: identifies the settings; a checkpoint with another
      fingerprint is refused rather than resumed.
    teacher: index-aligned cached teacher outputs of the training split.
    teacher_keys: which of them the step needs.
    gate: `gate(batch, epoch) -> {"kappa", "confidence", "pattern"}`, the
      student's SMP gate, computed by the input pipeline.
    epoch_hook: `hook(state, epoch) -> state`, run before the first step of
      every epoch (a method's host-side work, e.g. PMR's prototypes, kept in
      `state.method_state`). Not repeated when resuming mid-epoch: the
      checkpoint already holds its result.
    monitors: {name: (params, batch_stats) -> metrics} run after every
      epoch and recorded as `<name>/<metric>` (e.g. the test split, for
      learning curves); never used for model selection.
    log_every_steps: progress and host-sync interval.
    checkpoint_every_steps: also checkpoint mid-epoch every this many steps.
    log_config: `config.logging` (TensorBoard, W&B; `logs.RunLog`).
    plot: `plot(history) -> png path`, run at the end; the image also goes
      to TensorBoard.
    on_rate: called once with (steps/s, steps left in this stage), measured
      over the second progress interval (the first includes compilation).
    stop_after_steps: raise `Interrupted` after this many steps of this call.

  Returns:
    The best (by validation) weights, their epoch and scores, and history.
  """
  os.makedirs(directory, exist_ok=True)
  ckpt = checkpoint.RunCheckpoints(os.path.join(directory, "checkpoints"))
  spe = loader.steps_per_epoch(train_split.num_samples, batch_size)
  if spe == 0:
    raise TrainingError(
        f"{name}: the training split has {train_split.num_samples} examples,"
        f" fewer than one batch of {batch_size}; lower the batch size.")

  meta: dict[str, Any] = {
      "format": META_FORMAT, "epoch": 0, "step_in_epoch": 0, "sums": None,
      "steps_in_sums": 0, "best": None, "fingerprint": dict(fingerprint)}
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    if meta["fingerprint"] != artifacts.plain(fingerprint):
      ckpt.close()
      raise CacheMismatchError(
          f"{directory} holds a run with different settings; use a new "
          f"--workdir or delete {directory} to start over.")
    if meta.get("format") != META_FORMAT:
      if meta.get("sums"):
        ckpt.close()
        raise CacheMismatchError(
            f"{directory} holds a mid-epoch checkpoint written by an older "
            f"g2d_jax; delete {directory} to train this stage again.")
      # An epoch-end checkpoint of the older format carries nothing else.
      meta = dict(meta, format=META_FORMAT, sums=None)
    logging.info("%s: resuming at epoch %d step %d", name, meta["epoch"],
                 meta["step_in_epoch"])
  done_global = meta["epoch"] * spe + meta["step_in_epoch"]
  run_log = logs.RunLog(directory, name, log_config, resume_step=done_global,
                        write=distributed.is_primary())
  # Records written after the checkpoint we resume from are replayed.
  run_log.epochs.truncate_after("epoch", meta["epoch"] - 1)
  run_log.steps.truncate_after("step", done_global)
  rate_marks: list[tuple[float, int]] = []

  rng = jax.random.key(seed)
  progress = Progress(name, epochs * spe, done_global,
                      every=max(1, log_every_steps))
  steps_this_call = 0
  pending: list[Any] = []
  sums = metrics_lib.from_json(meta["sums"]) if meta["sums"] else None
  n_in_sums = meta["steps_in_sums"]

  def drain(global_step: int) -> None:
    """Moves pending device metrics to the host (the only sync point)."""
    nonlocal n_in_sums, sums
    if not pending:
      return
    host = jax.device_get(pending)
    first = global_step - len(host) + 1
    for i, m in enumerate(host):
      scalars = m["scalars"]
      loss = float(scalars["loss"])
      if not math.isfinite(loss):
        raise TrainingError(
            f"{name}: the loss became {loss} at step {first + i} (epoch "
            f"{(first + i - 1) // spe}); lower the learning rate (e.g. "
            "--config.student.optimizer.lr or --config.teacher.optimizer.lr) "
            "or check the data. Checkpoints before this step are intact.")
      sums = metrics_lib.add(sums, m)
      per_step = {k: float(v) for k, v in scalars.items()
                  if k == "loss" or k.startswith(_PER_STEP)}
      run_log.step({"step": first + i, **per_step})
    n_in_sums += len(host)
    pending.clear()

  def mean_loss() -> float:
    if not sums:
      return float("nan")
    return float(sums["scalars"]["loss"]) / max(1, n_in_sums)

  try:
    for epoch in range(meta["epoch"], epochs):
      start = meta["step_in_epoch"] if epoch == meta["epoch"] else 0
      if epoch_hook is not None and start == 0:
        state = epoch_hook(state, epoch)
      batches = loader.train_batches(
          train_split, batch_size, seed=seed, epoch=epoch, start_step=start,
          teacher=teacher, teacher_keys=teacher_keys, gate=gate)
      epoch_arg = np.int32(epoch)
      for i, batch in enumerate(batches, start=start):
        state, m = step_fn(state, mesh_lib.shard_batch(batch, mesh),
                           epoch_arg, rng)
        pending.append(m)
        global_step = epoch * spe + i + 1
        steps_this_call += 1
        if global_step % log_every_steps == 0:
          drain(global_step)
          progress.update(global_step, f"loss {mean_loss():.4f}")
          if on_rate is not None and len(rate_marks) < 2:
            rate_marks.append((time.perf_counter(), global_step))
            if len(rate_marks) == 2:
              (t0, s0), (t1, s1) = rate_marks
              on_rate((s1 - s0) / max(t1 - t0, 1e-9), epochs * spe - s1)
        if (checkpoint_every_steps and (i + 1) % checkpoint_every_steps == 0
            and i + 1 < spe):
          drain(global_step)
          ckpt.save_latest(global_step, state, dict(
              meta, epoch=epoch, step_in_epoch=i + 1,
              sums=artifacts.to_jsonable(sums), steps_in_sums=n_in_sums))
        if stop_after_steps is not None and steps_this_call >= stop_after_steps:
          raise Interrupted(f"stopped after {steps_this_call} steps")
      drain(epoch * spe + spe)
      train = metrics_lib.summarize(sums, max(1, n_in_sums))
      val = evaluate(state.params, state.batch_stats)
      score = selection_score(val, task)
      record = {"epoch": epoch, "step": (epoch + 1) * spe,
                **{f"train/{k}": v for k, v in train.items()},
                **{f"val/{k}": v for k, v in val.items()}}
      for prefix, monitor in (monitors or {}).items():
        record.update({f"{prefix}/{k}": v for k, v in
                       monitor(state.params, state.batch_stats).items()})
      best = meta["best"]
      if best is None or score > best["score"]:
        best = {"epoch": epoch, "score": score, "val": val}
        ckpt.save_best((epoch + 1) * spe, {"params": state.params,
                                           "batch_stats": state.batch_stats},
                       {"epoch": epoch, "val": val})
      run_log.epoch(record)
      logging.info("%s epoch %d: train loss %.4f, val %s%s", name, epoch,
                   train.get("loss", float("nan")),
                   _fmt(val), "  (best)" if best["epoch"] == epoch else "")
      sums, n_in_sums = None, 0
      meta = dict(meta, epoch=epoch + 1, step_in_epoch=0, sums=None,
                  steps_in_sums=0, best=best)
      ckpt.save_latest((epoch + 1) * spe, state, meta)
    weights, best_meta = ckpt.restore_best(
        {"params": state.params, "batch_stats": state.batch_stats})
    history = run_log.epochs.read()
    if plot is not None and distributed.is_primary():
      run_log.image("curves", plot(history), epochs * spe)
    return FitResult(weights=weights, best=best_meta, history=history)
  finally:
    run_log.close()
    ckpt.close()


def _fmt(val: Mapping[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in sorted(val.items()))
