"""Tests of the evaluation stage's pieces: missing-modality patterns and
scores (paper Table 11), and the regression report (paper Table 3)."""

import jax
import numpy as np
import pytest

from g2d_jax import errors
from g2d_jax import regression_metrics
from g2d_jax.data import base
from g2d_jax.pipeline import evaluate
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import scoring
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image", "text")


def test_missing_pattern_rates_nesting_and_at_least_one_present():
  n = 20000
  pats = {r: evaluate.missing_modality_pattern(n, MODS, r, seed=3)
          for r in (0.0, 0.2, 0.4, 0.6)}
  assert all(np.all(v == 1) for v in pats[0.0].values())
  for r, pat in pats.items():
    keep = np.stack([pat[m] for m in MODS], 1)
    assert set(np.unique(keep)) <= {0.0, 1.0} and keep.dtype == np.float32
    assert np.all(keep.sum(1) >= 1)
    # Dropped with probability r, except rows that would lose everything
    # (probability r^3) keep one: P(present) = 1 - r + r^3 / 3.
    want = 1 - r + r ** 3 / 3
    assert np.mean(keep) == pytest.approx(want, abs=0.01)
  for lo, hi in ((0.2, 0.4), (0.4, 0.6)):
    for m in MODS:   # nested: missing at lo => missing at hi
      assert np.all(pats[hi][m] <= pats[lo][m] + (
          np.stack([pats[hi][k] for k in MODS], 1).sum(1) == 1))
  again = evaluate.missing_modality_pattern(n, MODS, 0.4, seed=3)
  assert all(np.array_equal(again[m], pats[0.4][m]) for m in MODS)
  with pytest.raises(errors.ConfigError, match=r"in \[0, 1\)"):
    evaluate.missing_modality_pattern(n, MODS, 1.0, seed=0)


def test_missing_modality_scores_equal_numpy_late_fusion():
  """The student's test accuracy with modalities missing equals the argmax
  of the mean of the present modalities' head logits, by hand."""
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(method="joint", **{"eval.missing_rates": (0.0, 0.5)})
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(cfg, ds, mesh)
  model, state = s.model, s.state
  eval_step = scoring.make_eval_step(model, ds.task)
  got = evaluate.missing_modality_scores(cfg, ds, eval_step, state.params,
                                         state.batch_stats, mesh)
  test = ds.splits["test"]
  x = test.batch(np.arange(len(test)))
  out = model.apply({"params": state.params, "batch_stats":
                     state.batch_stats}, {m: x[m] for m in ds.modalities},
                    train=False)
  # Late fusion: a missing modality's head is left out of the mean.
  for rate in (0.0, 0.5):
    pat = evaluate.missing_modality_pattern(len(test), ds.modalities, rate,
                                            cfg.eval.missing_seed)
    w = {m: pat[m][:, None] for m in ds.modalities}
    fused = sum(w[m] * np.asarray(out.modality_logits[m], np.float64)
                for m in ds.modalities) / sum(w.values())
    acc = np.mean(np.argmax(fused, -1) == x["label"])
    rec = got[f"{rate:g}"]
    assert rec["test_accuracy"] == pytest.approx(acc)
    assert rec["modality_present"] == {m: pytest.approx(float(np.mean(
        pat[m]))) for m in ds.modalities}
  assert got["0"]["modality_present"] == {"audio": 1.0, "image": 1.0}


def test_regression_scores_unscale_targets_and_match_numpy():
  rng = np.random.default_rng(0)
  splits = {}
  for s, n in (("train", 64), ("val", 32), ("test", 48)):
    y = rng.uniform(0.05, 0.95, n).astype(np.float32)
    splits[s] = base.Split(
        inputs={"audio": (rng.normal(size=(n, 8, 8, 1)) + y[:, None, None,
                                                             None]).astype(
                                                                 np.float32),
                "image": rng.normal(size=(n, 6)).astype(np.float32)},
        labels=y, scales={"audio": 1.0, "image": 1.0})
  fp = base.make_fingerprint("tiny_regression_test", {}, splits, "regression")
  fp["target_scaling"] = {"kind": "minmax", "min": 0.1, "max": 0.5}
  ds = base.MultimodalDataset("tiny_regression_test", ("audio", "image"),
                              splits, 1, "regression", fp)
  cfg = fx.tiny_config(method="joint")
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(cfg, ds, mesh)
  model, state = s.model, s.state
  rep = evaluate.regression_scores(model, state.params, state.batch_stats, ds,
                                   20, mesh)
  x = splits["test"].batch(np.arange(48))
  out = model.apply({"params": state.params, "batch_stats":
                     state.batch_stats}, {m: x[m] for m in ds.modalities},
                    train=False)
  unscale = lambda v: np.asarray(v, np.float64) * 0.4 + 0.1
  y = unscale(x["label"])
  for head, logits in (("fused", out.logits),
                       ("modality/image", out.modality_logits["image"])):
    p = unscale(1 / (1 + np.exp(-np.asarray(logits, np.float64)[:, 0])))
    assert rep[head]["mape"] == pytest.approx(
        100 * np.mean(np.abs((y - p) / y)), rel=1e-5)
    assert rep[head]["r2"] == pytest.approx(
        1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2), rel=1e-5)
    assert rep[head]["mae"] == pytest.approx(regression_metrics.mae(y, p),
                                             rel=1e-5)

