"""The whole job: teachers -> teacher cache -> student -> evaluation."""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from g2d_jax import artifacts
from g2d_jax import data
from g2d_jax import methods
from g2d_jax.errors import ConfigError
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import distributed
from g2d_jax.pipeline import evaluate
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import precompute
from g2d_jax.pipeline import student
from g2d_jax.pipeline import teachers
from g2d_jax.progress import format_seconds


# A whole job longer than this on a CPU gets a message naming the preset
# that is sized for one.
LONG_JOB_SECONDS = 3600.0


class JobEstimate:
  """Once training has run a little, estimates the whole job from the
  measured steps/s and, on a CPU, says so when it would take long.

  The student's step is assumed to cost its branches' teacher steps
  together (each modality's encoder forward and backward), which holds
  roughly for late fusion; the estimate is a guide, not a promise.
  """

  def __init__(self, config: ml_collections.ConfigDict, train_size: int,
               num_modalities: int, stages: list[str], smaller_preset: str):
    self.smaller_preset = smaller_preset
    self.k = num_modalities
    spe_t = max(1, train_size // config.teacher.batch_size)
    spe_s = max(1, train_size // config.student.batch_size)
    self.teacher_steps = config.teacher.epochs * spe_t
    self.student_steps = config.student.epochs * spe_s
    self.stages = stages
    self.done = False

  def __call__(self, stage: str, rate: float, left: int) -> None:
    if self.done or rate <= 0:
      return
    self.done = True
    if stage == "teachers":
      left_s = (left + (self.k - 1) * self.teacher_steps) / rate
      student_s = (self.k * self.student_steps / rate
                   if "student" in self.stages else 0.0)
    else:
      left_s, student_s = 0.0, left / rate
    total = left_s + student_s
    on_cpu = jax.default_backend() == "cpu"
    logging.info("measured %.2f steps/s (%s): about %s left for this job "
                 "(teachers %s, student %s)", rate, stage,
                 format_seconds(total), format_seconds(left_s),
                 format_seconds(student_s))
    if on_cpu and total > LONG_JOB_SECONDS:
      logging.warning(
          "this job needs about %s on this CPU (%.2f steps/s measured in the "
          "%s stage): it is sized for an accelerator. It keeps running; for "
          "a run sized for a CPU use %s.", format_seconds(total), rate,
          stage, self.smaller_preset)


def log_schedule(resolved: dict[str, Any]) -> None:
  """One line per resolved window: what the run will actually do."""
  n = resolved["student_epochs"]
  if "smp" in resolved:
    smp = resolved["smp"]
    logging.info("schedule: SMP taus %s of %d student epochs (%.0f%%, from "
                 "%s)", smp["taus"], n, 100 * smp["share"], smp["given"])
  for name, w in resolved["windows"].items():
    logging.info("schedule: %s = epochs %s..%s of %d (%.0f%%, from %s)", name,
                 w["first_epoch"], w["last_epoch"], n, 100 * w["share"],
                 w["given"])
  opt = resolved["student_optimizer"]
  logging.info("schedule: protocol %s, student optimizer %s lr %g, decay at "
               "epochs %s", resolved["protocol"], opt["name"], opt["lr"],
               opt["decay_epochs"])


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "all",
        devices: list[Any] | None = None,
        smaller_preset: str = "a smaller preset") -> dict[str, Any]:
  """Runs one stage or all of them; each finished stage is skipped on rerun.

  Args:
    config: a config from `configs/` (see `pipeline.config.base_config`).
    workdir: where every output goes.
    mode: "all", "teachers", "precompute", "student" or "eval".
    devices: devices to train on (default: all local devices).
    smaller_preset: what to suggest when the job is long for this machine
      (e.g. "--config=configs/avmnist.py:quick").

  Returns:
    {stage: result} for the stages that ran.
  """
  if mode not in config_lib.MODES:
    raise ConfigError(f"--mode={mode!r} is not one of {config_lib.MODES}.")
  if not workdir:
    raise ConfigError("--workdir is required: the directory for checkpoints, "
                      "the teacher cache, metrics and summary.json.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a directory; name "
                      "a new or existing directory for the run's outputs.")
  mesh = mesh_lib.data_mesh(devices)
  # Process 0 builds a missing data cache first; the others then read it.
  dataset = data.load_dataset(config.data) if distributed.is_primary() else None
  distributed.barrier("data")
  if dataset is None:
    dataset = data.load_dataset(config.data)
  config_lib.validate(config, mesh.devices.size, tuple(dataset.modalities))
  built = None
  if not methods.trains_nothing(config.method):
    # The student, as shapes only (the stages below share it): a bad
    # encoder, fusion or method setting fails here, before any training.
    built = student.build_student(config, dataset, mesh, init=False)
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_primary():
    # What killed runs of ours left behind (temporary files and directories
    # of processes that no longer exist). Process ids mean something only
    # on their own host, so process 0 alone looks, before the others start.
    for path in artifacts.remove_dead_temporaries(workdir):
      logging.info("removed the leftover of an interrupted run: %s", path)
    # Students sharing a workdir (run_name) each keep their own config.
    config_name = (f"config_{config.run_name}.json" if config.run_name
                   else "config.json")
    artifacts.write_json(os.path.join(workdir, config_name),
                         artifacts.plain(config))
  distributed.barrier("workdir")
  logging.info("dataset %s: %s, %s; %d device(s) (%s)", dataset.name,
               {s: len(v) for s, v in dataset.splits.items()},
               dataset.modalities, mesh.devices.size,
               mesh.devices.flat[0].platform)
  log_schedule(config_lib.resolve_schedule(config))
  order = (["teachers", "precompute", "student", "eval"] if mode == "all"
           else [mode])
  if mode == "all" and methods.trains_nothing(config.method):
    # UME is the teachers' ensemble: nothing to cache or train.
    order = ["teachers", "eval"]
  estimate = JobEstimate(config, dataset.splits["train"].num_samples,
                         len(dataset.modalities), order, smaller_preset)
  stages = {
      "teachers": lambda: teachers.train_teachers(
          config, dataset, workdir, mesh,
          on_rate=lambda r, left: estimate("teachers", r, left)),
      "precompute": lambda: precompute.run(config, dataset, workdir, mesh),
      "student": lambda: student.train_student(
          config, dataset, workdir, mesh,
          on_rate=lambda r, left: estimate("student", r, left),
          student=built),
      "eval": lambda: evaluate.run(config, dataset, workdir, mesh,
                                   student=built),
  }
  results = {}
  for name in order:
    t0 = time.perf_counter()
    logging.info("=== stage %s", name)
    results[name] = stages[name]()
    # What a stage wrote (process 0) is there before any process reads it.
    distributed.barrier(f"stage {name}")
    logging.info("=== stage %s done in %.1f s", name, time.perf_counter() - t0)
  return results
