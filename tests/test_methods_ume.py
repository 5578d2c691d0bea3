"""UME: the ensemble rule, and the pipeline reporting the teachers' ensemble
as the student (accuracy and ECE recomputed from the teacher cache)."""

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


def test_pipeline_reports_the_teacher_ensemble(tmp_path):
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "ume", "teacher.epochs": 1,
                          "run_name": "ume"})
  workdir = str(tmp_path)
  teachers.train_teachers(cfg, ds, workdir, mesh)
  precompute.run(cfg, ds, workdir, mesh)
  done = student_lib.train_student(cfg, ds, workdir, mesh)
  summary = evaluate.run(cfg, ds, workdir, mesh)
  cache = precompute.load_cache(workdir, ds, None)
  for split, scores in (("test", None), ("val", done["best"]["val"])):
    y = ds.splits[split].labels
    logits = {m: cache[split][m]["logits"] for m in ds.modalities}
    fused = np.mean([logits["audio"], logits["image"]], axis=0)
    acc = float(np.mean(np.argmax(fused, -1) == y))
    ece = float(calibration.expected_calibration_error(jnp.asarray(fused), y))
    if split == "test":
      s = summary["student"]
      assert s["test_accuracy"] == pytest.approx(acc)
      assert s["test_ece"] == pytest.approx(ece, abs=1e-5)
      for m in ds.modalities:
        assert s["modality_test_accuracy"][m] == pytest.approx(
            summary["teachers"][m]["test_accuracy"])
        assert s["modality_test_ece"][m] == pytest.approx(
            summary["teachers"][m]["test_ece"], abs=1e-6)
      assert s["method"] == "ume" and s["smp"] is False
      assert s["best_epoch"] is None
    else:
      assert scores["accuracy/fused"] == pytest.approx(acc)
      assert scores["ece/fused"] == pytest.approx(ece, abs=1e-5)
