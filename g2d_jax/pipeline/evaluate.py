"""Stage 4: test-set evaluation of the student and the teachers, and the
run's `summary.json`."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import optax

import g2d_jax
from g2d_jax import artifacts
from g2d_jax import losses
from g2d_jax import methods
from g2d_jax import regression_metrics
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.errors import ConfigError
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import distributed
from g2d_jax.pipeline import ensemble
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import scoring
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


def missing_modality_pattern(num_samples: int, modalities: Sequence[str],
                             rate: float, seed: int) -> dict[str, np.ndarray]:
  """Which modalities each sample keeps when each is missing at `rate`.

  Every (sample, modality) is dropped independently with probability
  `rate`; a sample that would lose all of its modalities keeps the one with
  the largest draw, so every sample has at least one. One uniform draw per
  (sample, modality) serves every rate, so the patterns are nested: what is
  missing at 20% is also missing at 40%.

  Returns:
    {m: float32 [N] 1 = present, 0 = missing}.
  """
  if not 0.0 <= rate < 1.0:
    raise ConfigError(f"a missing-modality rate must be in [0, 1), got "
                      f"{rate}.")
  u = np.random.default_rng(seed).random((num_samples, len(modalities)))
  keep = u >= rate
  none = ~keep.any(axis=1)
  keep[none, np.argmax(u[none], axis=1)] = True
  return {m: keep[:, i].astype(np.float32) for i, m in enumerate(modalities)}


def missing_modality_scores(config: ml_collections.ConfigDict,
                            dataset: MultimodalDataset, eval_step: Any,
                            params: Any, batch_stats: Any,
                            mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Test scores of the student with modalities missing at each rate of
  `config.eval.missing_rates` (paper Table 11): {rate: {test_<metric>,
  modality_present}}."""
  test, kind = dataset.splits["test"], _metric(dataset.task)
  out = {}
  for rate in config.eval.missing_rates:
    present = missing_modality_pattern(len(test), dataset.modalities,
                                       float(rate), config.eval.missing_seed)
    res = scoring.evaluate_split(eval_step, params, batch_stats, test,
                                 config.eval.batch_size, mesh,
                                 present=present)
    out[f"{float(rate):g}"] = {
        f"test_{kind}": res[f"{kind}/fused"],
        "modality_present": {m: float(np.mean(v)) for m, v in
                             present.items()}}
    logging.info("student with modalities missing at %.0f%%: test %s %.4f",
                 100 * rate, kind, res[f"{kind}/fused"])
  return out


def calibrate_student(config: ml_collections.ConfigDict,
                      dataset: MultimodalDataset, workdir: str,
                      mesh: jax.sharding.Mesh,
                      student: student_lib.Student, params: Any,
                      batch_stats: Any) -> dict[str, Any]:
  """Temperature scaling of the student's heads, fitted on validation.

  Saves the temperatures with the student (`<student dir>/temperature.json`,
  {head: T}: divide that head's logits by T) and returns the summary
  entries: `temperature` (fused), `modality_temperature`,
  `test_ece_calibrated` and `modality_test_ece_calibrated`.
  """
  model = student.model
  predict = jax.jit(lambda p, b, x: steps.apply_model(model, p, b, x,
                                                      train=False)[0])
  cal = scoring.temperature_scaling(predict, params, batch_stats,
                                    dataset.splits, config.eval.batch_size,
                                    mesh)
  if distributed.is_primary():
    artifacts.write_json(
        os.path.join(student_lib.student_dir(workdir, config),
                     "temperature.json"),
        {"fitted_on": "val", "temperature": cal["temperature"],
         "val_nll": cal["val_nll"],
         "val_nll_calibrated": cal["val_nll_calibrated"]})
  t, e = cal["temperature"], cal["test_ece_calibrated"]
  logging.info("student temperature (val) %.3f: test ECE %.4f -> %.4f",
               t["fused"], cal["test_ece"]["fused"], e["fused"])
  return {"temperature": t["fused"],
          "modality_temperature": {m: t[f"modality/{m}"]
                                   for m in dataset.modalities},
          "test_ece_calibrated": e["fused"],
          "modality_test_ece_calibrated": {m: e[f"modality/{m}"]
                                           for m in dataset.modalities}}


def regression_scores(model: Any, params: Any, batch_stats: Any,
                      dataset: MultimodalDataset, batch_size: int,
                      mesh: jax.sharding.Mesh) -> dict[str, dict[str, Any]]:
  """MAPE, R^2, MAE, RMSE of every head on the test split (paper Table 3).

  Computed on the dataset's own target units: targets and predictions are
  mapped back through `fingerprint["target_scaling"]` (min-max) when the
  dataset scaled them into [0, 1] (MIS-ME); otherwise on the [0, 1] scale.
  MAPE (and MPE) are None when a target is zero, where they are undefined.
  """
  test = dataset.splits["test"]

  @jax.jit
  def predict(params, batch_stats, inputs):
    out, _ = steps.apply_model(model, params, batch_stats, inputs,
                               train=False)
    heads = {"fused": out.logits, **{f"modality/{m}": v for m, v in
                                     out.modality_logits.items()}}
    return {h: losses.regression_prediction(v) for h, v in heads.items()}

  preds: dict[str, list[np.ndarray]] = {}
  for k, batch in enumerate(loader.eval_batches(test, batch_size)):
    out = distributed.to_host(predict(
        params, batch_stats, mesh_lib.shard_batch(batch["inputs"], mesh)))
    n = min(batch_size, len(test) - k * batch_size)  # the global batch's
    for h, v in out.items():
      preds.setdefault(h, []).append(np.asarray(v)[:n])
  scaling = dataset.fingerprint.get("target_scaling")
  unscale = ((lambda v: np.asarray(v, np.float64)
              * (scaling["max"] - scaling["min"]) + scaling["min"])
             if scaling else (lambda v: np.asarray(v, np.float64)))
  y = unscale(test.labels)
  report = {}
  for h, parts in preds.items():
    p = unscale(np.concatenate(parts))
    r = {"r2": regression_metrics.r2_score(y, p),
         "mae": regression_metrics.mae(y, p),
         "rmse": regression_metrics.rmse(y, p),
         "mape": None, "mpe": None}
    if np.all(y != 0):
      r["mape"] = regression_metrics.mape(y, p)
      r["mpe"] = regression_metrics.mpe(y, p)
    report[h] = r
  return report


def run(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
        workdir: str, mesh: jax.sharding.Mesh,
        student: student_lib.Student | None = None) -> dict[str, Any]:
  """Evaluates on the test split and writes `<workdir>/summary.json`.

  The summary holds every teacher, the teachers' ensemble (UME,
  `teacher_ensemble`) and the student trained by `config.method` (none
  when the method is `ume` itself). Classification summaries also carry the
  expected calibration error (15 equal-width bins; `g2d_jax.calibration`)
  of every reported predictor: `student.test_ece`,
  `student.modality_test_ece`, `teachers.<m>.test_ece`.
  """
  test = dataset.splits["test"]
  kind = _metric(dataset.task)
  summary: dict[str, Any] = {"dataset": dataset.name, "task": dataset.task,
                             "modalities": list(dataset.modalities),
                             "teachers": {}}
  for m in dataset.modalities:
    model, weights = teachers_lib.load_teacher(config, dataset, workdir, m,
                                               mesh)
    res = scoring.evaluate_split(scoring.make_eval_step(model, dataset.task),
                                 weights["params"], weights["batch_stats"],
                                 test, config.eval.batch_size, mesh)
    summary["teachers"][m] = {f"test_{kind}": res[f"{kind}/fused"]}
    if _ece(res, "fused") is not None:
      summary["teachers"][m]["test_ece"] = _ece(res, "fused")
      summary["teachers"][m]["test_true_class_prob"] = res[
          "true_class_prob/fused"]
    if dataset.task == "regression":
      summary["teachers"][m]["test_regression"] = regression_scores(
          model, weights["params"], weights["batch_stats"], dataset,
          config.eval.batch_size, mesh)["fused"]
    logging.info("teacher/%s test %s %.4f", m, kind, res[f"{kind}/fused"])
  summary["teacher_ensemble"] = ensemble.report(config, dataset, workdir,
                                                mesh)
  logging.info("teacher ensemble (UME) test %s %.4f", kind,
               summary["teacher_ensemble"][f"test_{kind}"])
  if not methods.trains_nothing(config.method):
    summary["student"] = student_summary(config, dataset, workdir, mesh,
                                         summary["teachers"], student)
  summary["data_fingerprint"] = dataset.fingerprint
  # The epochs each window resolved to (fractions of this run's length).
  summary["schedule"] = config_lib.resolve_schedule(config)
  summary["config"] = artifacts.plain(config)
  summary["versions"] = versions()
  if distributed.is_primary():
    artifacts.write_json(summary_path(workdir, config), summary)
  return summary


def student_summary(config: ml_collections.ConfigDict,
                    dataset: MultimodalDataset, workdir: str,
                    mesh: jax.sharding.Mesh, teachers: dict[str, Any],
                    student: student_lib.Student | None = None
                    ) -> dict[str, Any]:
  """Test scores of the trained student (`summary["student"]`)."""
  test = dataset.splits["test"]
  kind = _metric(dataset.task)
  student, weights, meta = student_lib.load_student(config, dataset, workdir,
                                                    mesh, student)
  eval_step = scoring.make_eval_step(student.model, dataset.task)
  params, batch_stats = weights["params"], weights["batch_stats"]
  diag = student_lib.diagnostics_cache(config, dataset, workdir)
  res = scoring.evaluate_split(eval_step, params, batch_stats, test,
                               config.eval.batch_size, mesh,
                               teacher=diag["test"] if diag else None)
  out = {
      f"test_{kind}": res[f"{kind}/fused"],
      f"modality_test_{kind}": {m: res[f"{kind}/modality/{m}"]
                                for m in dataset.modalities},
      "best_epoch": meta["epoch"],
      "val": meta["val"],
      "method": config.method, "smp": methods.smp_enabled(config)}
  if any(k.startswith(f"{kind}/aux/") for k in res):
    out[f"aux_head_test_{kind}"] = {
        m: res[f"{kind}/aux/{m}"] for m in dataset.modalities}
  if _ece(res, "fused") is not None:
    out["test_ece"] = _ece(res, "fused")
    out["modality_test_ece"] = {
        m: _ece(res, f"modality/{m}") for m in dataset.modalities}
    out.update(calibrate_student(config, dataset, workdir, mesh, student,
                                 params, batch_stats))
    # Paper Fig. 6: a modality's confidence inside the student relative to
    # its teacher's (1 = as confident as alone).
    out["modality_test_true_class_prob"] = {
        m: res[f"true_class_prob/modality/{m}"] for m in dataset.modalities}
    out["modality_confidence_ratio"] = {
        m: res[f"true_class_prob/modality/{m}"]
        / max(teachers[m]["test_true_class_prob"], 1e-12)
        for m in dataset.modalities}
  if any(f"cosine/{m}" in res for m in dataset.modalities):
    # Paper Fig. 5: cosine of the student's and the teacher's features.
    out["test_feature_cosine"] = {
        m: res[f"cosine/{m}"] for m in dataset.modalities
        if f"cosine/{m}" in res}
  logging.info("student test %s %.4f, per modality %s%s", kind,
               res[f"{kind}/fused"], out[f"modality_test_{kind}"],
               f", ECE {res['ece/fused']:.4f}" if "ece/fused" in res else "")
  if dataset.task == "regression":
    reg = regression_scores(student.model, params, batch_stats, dataset,
                            config.eval.batch_size, mesh)
    out["test_regression"] = reg["fused"]
    out["modality_test_regression"] = {
        m: reg[f"modality/{m}"] for m in dataset.modalities}
    logging.info("student test regression %s", reg["fused"])
  if config.eval.missing_rates:
    out["missing_modality"] = missing_modality_scores(
        config, dataset, eval_step, params, batch_stats, mesh)
  return out
