"""The whole-job estimate: after the first steps, a job that would take
over an hour on a CPU says so and names the preset sized for one."""

import logging as py_logging

from g2d_jax.pipeline import run
from tests import pipeline_fixtures as fx


def estimate_messages(caplog, stage, rate, left, **overrides):
  caplog.clear()
  cfg = fx.tiny_config(**overrides)
  # 128 training samples: 4 teacher steps per epoch, 2 teachers, 3 student
  # epochs of 4 steps.
  est = run.JobEstimate(cfg, 128, 2, ["teachers", "precompute", "student",
                                      "eval"], "--config=x.py:quick")
  est(stage, rate, left)
  est(stage, rate, left)          # said once
  return [(r.levelno, r.getMessage()) for r in caplog.records
          if r.name == "absl"]


def test_long_cpu_jobs_name_the_smaller_preset(caplog):
  caplog.set_level(py_logging.INFO)
  # 300 teacher epochs of 4 steps; 1000 steps left of the first teacher.
  msgs = estimate_messages(caplog, "teachers", 0.1, 4 * 300 - 200,
                           **{"teacher.epochs": 300})
  assert len(msgs) == 2
  assert msgs[0][0] == py_logging.INFO
  assert "measured 0.10 steps/s" in msgs[0][1]
  # teachers: (1000 + 1 x 1200) / 0.1 = 22000 s; student 2 x 12 / 0.1.
  assert "teachers 6:06:40, student 0:04:00" in msgs[0][1]
  assert msgs[1][0] == py_logging.WARNING
  assert "for a run sized for a CPU use --config=x.py:quick" in msgs[1][1]


def test_short_jobs_only_log_the_estimate(caplog):
  caplog.set_level(py_logging.INFO)
  msgs = estimate_messages(caplog, "student", 50.0, 10)
  assert [level for level, _ in msgs] == [py_logging.INFO]
  assert "teachers 0:00:00, student 0:00:00" in msgs[0][1]
