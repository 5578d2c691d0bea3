"""UME: the ensemble rule, and the evaluation stage reporting the teachers'
ensemble (accuracy and ECE recomputed from the teacher cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import calibration
from g2d_jax.errors import ConfigError
from g2d_jax.methods import ume
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import evaluate
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import precompute
from g2d_jax.pipeline import run as run_lib
from g2d_jax.pipeline import student as student_lib
from g2d_jax.pipeline import teachers
from tests import pipeline_fixtures as fx


def test_ensemble_of_logits_and_of_probabilities():
  a = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
  b = np.array([[0.0, 4.0], [1.0, 1.0]], np.float32)
  np.testing.assert_allclose(ume.ensemble_logits({"a": a, "b": b}),
                             [[1.0, 2.0], [0.5, 1.0]])
  p = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  probs = jax.nn.softmax(ume.ensemble_logits({"a": a, "b": b}, "probs"))
  np.testing.assert_allclose(probs, (p(a) + p(b)) / 2, rtol=1e-6)
  with pytest.raises(ConfigError, match="combine"):
    ume.ensemble_logits({"a": a}, "vote")


def test_smp_cannot_be_forced_on_ume():
  with pytest.raises(ConfigError, match="trains no student"):
    config_lib.validate(fx.tiny_config(method="ume", smp=True), 4,
                        ("audio", "image"))
  config_lib.validate(fx.tiny_config(method="ume"), 4, ("audio", "image"))
  with pytest.raises(ConfigError, match="missing_rates"):
    config_lib.validate(fx.tiny_config(**{"method": "ume",
                                          "eval.missing_rates": (0.2,)}),
                        4, ("audio", "image"))


def test_evaluation_reports_the_teacher_ensemble(tmp_path):
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "ume", "teacher.epochs": 1,
                          "run_name": "ume"})
  workdir = str(tmp_path)
  teachers.train_teachers(cfg, ds, workdir, mesh)
  precompute.run(cfg, ds, workdir, mesh)
  with pytest.raises(ConfigError, match="trains no student"):
    student_lib.train_student(cfg, ds, workdir, mesh)
  summary = evaluate.run(cfg, ds, workdir, mesh)
  assert "student" not in summary
  s = summary["teacher_ensemble"]
  assert s["method"] == "ume" and s["combine"] == "logits"
  cache = precompute.load_cache(workdir, ds, None)
  for split in ("test", "val"):
    y = ds.splits[split].labels
    logits = {m: cache[split][m]["logits"] for m in ds.modalities}
    fused = np.mean([logits["audio"], logits["image"]], axis=0)
    acc = float(np.mean(np.argmax(fused, -1) == y))
    ece = float(calibration.expected_calibration_error(jnp.asarray(fused), y))
    if split == "test":
      assert s["test_accuracy"] == pytest.approx(acc)
      assert s["test_ece"] == pytest.approx(ece, abs=1e-5)
      for m in ds.modalities:
        assert s["modality_test_accuracy"][m] == pytest.approx(
            summary["teachers"][m]["test_accuracy"])
    else:
      assert s["val"]["accuracy/fused"] == pytest.approx(acc)
      assert s["val"]["ece/fused"] == pytest.approx(ece, abs=1e-5)
      for m in ds.modalities:
        assert s["val"][f"accuracy/modality/{m}"] == pytest.approx(
            float(np.mean(np.argmax(logits[m], -1) == y)))


def test_the_whole_job_for_ume_trains_no_student(tmp_path, monkeypatch):
  """--mode=all with method=ume runs the teachers and the evaluation only."""
  ds = fx.tiny_dataset()
  monkeypatch.setattr(run_lib.data, "load_dataset", lambda cfg: ds)
  cfg = fx.tiny_config(**{"method": "ume", "teacher.epochs": 1})
  results = run_lib.run(cfg, str(tmp_path), "all",
                        devices=jax.devices()[:1])
  assert list(results) == ["teachers", "eval"]
  assert not (tmp_path / "student").exists()
  assert not (tmp_path / "teacher_cache").exists()
  assert results["eval"]["teacher_ensemble"]["test_accuracy"] > 0
