"""UME, the ensemble of the unimodal teachers, as a report of evaluation.

UME trains nothing: its prediction combines the trained teachers' logits
(`methods.ume.ensemble_logits`). The evaluation stage scores it on the
validation and test splits like a student, with the combined logits as the
fused output and each teacher as its modality's output, and writes it to
`summary["teacher_ensemble"]` of every run.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from g2d_jax import methods
from g2d_jax import models
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.methods import ume
from g2d_jax.pipeline import scoring
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import teachers as teachers_lib


def load(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
         workdir: str, mesh: jax.sharding.Mesh):
  """(eval_step, params, batch_stats, predict) of the teachers' ensemble.

  `eval_step(params, batch_stats, batch) -> sums` runs every teacher and
  scores the combined logits as "fused" and each teacher as its modality
  (`scoring.evaluate_split` takes it like a student's); `predict(params,
  batch_stats, inputs)` returns those outputs (`scoring.collect_logits`).
  """
  ume.check_config(config, dataset.task)
  teacher_models, params, batch_stats = {}, {}, {}
  for m in dataset.modalities:
    model, weights = teachers_lib.load_teacher(config, dataset, workdir, m,
                                               mesh)
    teacher_models[m] = model
    params[m], batch_stats[m] = weights["params"], weights["batch_stats"]
  combine = config.ume.combine

  def predict(params, batch_stats, inputs):
    outs = {m: steps.apply_model(teacher_models[m], params[m], batch_stats[m],
                                 inputs, train=False)[0]
            for m in dataset.modalities}
    logits = {m: o.logits for m, o in outs.items()}
    return models.MultimodalOutput(
        ume.ensemble_logits(logits, combine), logits,
        {m: o.features[m] for m, o in outs.items()})

  @jax.jit
  def eval_step(params, batch_stats, batch):
    return scoring.batch_sums(predict(params, batch_stats, batch["inputs"]),
                              batch, dataset.task)

  return eval_step, params, batch_stats, jax.jit(predict)


def report(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
           workdir: str, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The ensemble's validation and test scores, in the layout of a student's
  summary (`test_accuracy`, `modality_test_accuracy`, `test_ece`, `val`)."""
  eval_step, params, batch_stats, predict = load(config, dataset, workdir,
                                                 mesh)
  scores = {s: scoring.evaluate_split(eval_step, params, batch_stats,
                                      dataset.splits[s],
                                      config.eval.batch_size, mesh)
            for s in ("val", "test")}
  kind = "mae" if dataset.task == "regression" else "accuracy"
  test = scores["test"]
  out = {"method": methods.TEACHER_ENSEMBLE,
         "combine": config.ume.combine,
         f"test_{kind}": test[f"{kind}/fused"],
         f"modality_test_{kind}": {m: test[f"{kind}/modality/{m}"]
                                   for m in dataset.modalities},
         "val": scores["val"]}
  if "ece/fused" in test:
    out["test_ece"] = test["ece/fused"]
    cal = scoring.temperature_scaling(
        predict, params, batch_stats, dataset.splits,
        config.eval.batch_size, mesh)
    out["temperature"] = cal["temperature"]["fused"]
    out["test_ece_calibrated"] = cal["test_ece_calibrated"]["fused"]
  return out
