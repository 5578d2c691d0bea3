"""The whole job: teachers -> teacher cache -> student -> evaluation."""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import ml_collections

from g2d_jax import artifacts
from g2d_jax import data
from g2d_jax import methods
from g2d_jax.errors import ConfigError
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import evaluate
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import precompute
from g2d_jax.pipeline import student
from g2d_jax.pipeline import teachers


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "all",
        devices: list[Any] | None = None) -> dict[str, Any]:
  """Runs one stage or all of them; each finished stage is skipped on rerun.

  Args:
    config: a config from `configs/` (see `pipeline.config.base_config`).
    workdir: where every output goes.
    mode: "all", "teachers", "precompute", "student" or "eval".
    devices: devices to train on (default: all local devices).

  Returns:
    {stage: result} for the stages that ran.
  """
  if mode not in config_lib.MODES:
    raise ConfigError(f"--mode={mode!r} is not one of {config_lib.MODES}.")
  if not workdir:
    raise ConfigError("--workdir is required: the directory for checkpoints, "
                      "the teacher cache, metrics and summary.json.")
  mesh = mesh_lib.data_mesh(devices)
  dataset = data.load_dataset(config.data)
  config_lib.validate(config, mesh.devices.size, tuple(dataset.modalities))
  os.makedirs(workdir, exist_ok=True)
  artifacts.write_json(os.path.join(workdir, "config.json"),
                       artifacts.plain(config))
  logging.info("dataset %s: %s, %s; %d device(s)", dataset.name,
               {s: len(v) for s, v in dataset.splits.items()},
               dataset.modalities, mesh.devices.size)
  stages = {
      "teachers": lambda: teachers.train_teachers(config, dataset, workdir,
                                                  mesh),
      "precompute": lambda: precompute.run(config, dataset, workdir, mesh),
      "student": lambda: student.train_student(config, dataset, workdir, mesh),
      "eval": lambda: evaluate.run(config, dataset, workdir, mesh),
  }
  order = list(stages) if mode == "all" else [mode]
  if mode == "all" and methods.trains_nothing(config.method):
    # UME is the teachers' ensemble: nothing to cache or train.
    order = ["teachers", "eval"]
  results = {}
  for name in order:
    t0 = time.perf_counter()
    logging.info("=== stage %s", name)
    results[name] = stages[name]()
    logging.info("=== stage %s done in %.1f s", name, time.perf_counter() - t0)
  return results
