"""Stage 4: test-set evaluation of the student and the teachers, and the
run's `summary.json`."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from absl import logging
import flax
import jax
import ml_collections
import optax

import g2d_jax
from g2d_jax import methods
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.errors import CacheMismatchError
from g2d_jax.pipeline import common
from g2d_jax.pipeline import metrics as metrics_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from g2d_jax.pipeline import teachers as teachers_lib


def versions() -> dict[str, str]:
  return {"g2d_jax": g2d_jax.__version__, "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
          else jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "python": sys.version.split()[0],
          "platform": platform.platform(),
          "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}"}


def summary_path(workdir: str, config: ml_collections.ConfigDict) -> str:
  name = f"summary_{config.run_name}.json" if config.run_name else (
      "summary.json")
  return os.path.join(workdir, name)


def _metric(task: str) -> str:
  return "mae" if task == "regression" else "accuracy"


def _ece(res: dict[str, float], head: str) -> float | None:
  return res.get(f"ece/{head}")


def run(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
        workdir: str, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Evaluates on the test split and writes `<workdir>/summary.json`.

  Classification summaries also carry the expected calibration error (15
  equal-width bins; `g2d_jax.calibration`) of every reported predictor:
  `student.test_ece`, `student.modality_test_ece`, `teachers.<m>.test_ece`.
  UME (`config.method="ume"`) reports the teachers' ensemble as its student.
  """
  test = dataset.splits["test"]
  kind = _metric(dataset.task)
  summary: dict[str, Any] = {"dataset": dataset.name, "task": dataset.task,
                             "modalities": list(dataset.modalities),
                             "teachers": {}}
  for m in dataset.modalities:
    model, weights = teachers_lib.load_teacher(config, dataset, workdir, m,
                                               mesh)
    res = common.evaluate_split(steps.make_eval_step(model, dataset.task),
                                weights["params"], weights["batch_stats"],
                                test, config.eval.batch_size, mesh,
                                dataset.task)
    summary["teachers"][m] = {f"test_{kind}": res[f"{kind}/fused"]}
    if _ece(res, "fused") is not None:
      summary["teachers"][m]["test_ece"] = _ece(res, "fused")
    logging.info("teacher/%s test %s %.4f", m, kind, res[f"{kind}/fused"])

  method = student_lib.build_method(config, dataset)
  if method.trains_student:
    model, weights, meta = student_lib.load_student(config, dataset, workdir,
                                                    mesh)
    eval_step = steps.make_eval_step(model, dataset.task)
    params, batch_stats = weights["params"], weights["batch_stats"]
  else:
    eval_step, params, batch_stats = student_lib.ensemble(config, dataset,
                                                          workdir, mesh)
    meta = _ensemble_meta(config, workdir)
  res = common.evaluate_split(eval_step, params, batch_stats, test,
                              config.eval.batch_size, mesh, dataset.task)
  summary["student"] = {
      f"test_{kind}": res[f"{kind}/fused"],
      f"modality_test_{kind}": {m: res[f"{kind}/modality/{m}"]
                                for m in dataset.modalities},
      "best_epoch": meta["epoch"],
      "val": meta["val"],
      "method": config.method, "smp": methods.smp_enabled(config)}
  if _ece(res, "fused") is not None:
    summary["student"]["test_ece"] = _ece(res, "fused")
    summary["student"]["modality_test_ece"] = {
        m: _ece(res, f"modality/{m}") for m in dataset.modalities}
  logging.info("student test %s %.4f, per modality %s%s", kind,
               res[f"{kind}/fused"],
               summary["student"][f"modality_test_{kind}"],
               f", ECE {res['ece/fused']:.4f}" if "ece/fused" in res else "")
  summary["data_fingerprint"] = dataset.fingerprint
  summary["config"] = common.to_dict(config)
  summary["versions"] = versions()
  metrics_lib.write_json(summary_path(workdir, config), summary)
  return summary


def _ensemble_meta(config: ml_collections.ConfigDict,
                   workdir: str) -> dict[str, Any]:
  """{"epoch", "val"} of a method without a trained student (UME)."""
  directory = student_lib.student_dir(workdir, config)
  path = os.path.join(directory, common.DONE)
  if not os.path.exists(path):
    raise CacheMismatchError(
        f"no student record in {directory}; run --mode=student (or "
        "--mode=all) first.")
  return metrics_lib.read_json(path)["best"]
