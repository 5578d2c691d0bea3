"""The teacher-strength experiment's pure parts: flags, rows and report
(its runs are the pipeline's; its results are in experiments/README.md)."""

import json

import pytest

from g2d_jax.errors import ConfigError
from tests import pipeline_fixtures as fx

ts = fx.experiment_module("teacher_strength")


def test_flags_are_checked_with_the_fix_named():
  assert ts.parse_epochs("4, 12,24") == [4, 12, 24]
  for bad in ("", "4,4", "0,4", "four"):
    with pytest.raises(ConfigError, match="--teacher_epochs=4,12,24"):
      ts.parse_epochs(bad)
  assert ts.parse_methods("g2d,umt") == ["g2d", "umt"]
  with pytest.raises(ConfigError, match=r"unknown \['g3d'\]"):
    ts.parse_methods("g2d,g3d")


def _summary(conf_audio, conf_image, acc):
  return {
      "task": "classification",
      "teachers": {"audio": {"test_accuracy": 0.4, "test_true_class_prob":
                             conf_audio},
                   "image": {"test_accuracy": 0.6, "test_true_class_prob":
                             conf_image}},
      "student": {"val": {"accuracy/fused": acc - 0.01},
                  "test_accuracy": acc,
                  "modality_test_accuracy": {"audio": 0.3, "image": 0.6},
                  "test_ece": 0.2, "test_ece_calibrated": 0.02,
                  "temperature": 0.5},
      "schedule": {}}


def test_rows_and_report(tmp_path):
  summaries = {(4, "g2d"): _summary(0.3, 0.5, 0.80),
               (12, "g2d"): _summary(0.5, 0.7, 0.82)}
  rows = ts.collect([4, 12], ["g2d"], summaries)
  assert [r["teacher_epochs"] for r in rows] == [4, 12]
  assert rows[0]["teachers"]["mean_confidence"] == pytest.approx(0.4)
  assert rows[1]["teachers"]["accuracy"] == {"audio": 40.0, "image": 60.0}
  assert rows[1]["test"] == pytest.approx(82.0)
  ts.write_report(str(tmp_path), rows, {"config": "c.py", "seed": 0,
                                        "protocol": "common",
                                        "command": "python x"})
  md = (tmp_path / "teacher_strength.md").read_text().splitlines()
  assert md[-1] == ("| 12 | g2d | 40.0 / 0.500 | 60.0 / 0.700 | 82.00 | "
                    "30.0 | 60.0 | 20.0 | 2.0 |")
  data = json.loads((tmp_path / "teacher_strength.json").read_text())
  assert len(data["rows"]) == 2
  assert (tmp_path / "teacher_strength.png").stat().st_size > 0
  assert not list(tmp_path.glob("*.tmp*"))
