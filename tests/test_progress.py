"""Progress lines: the time format, and when a line is logged."""

import logging as py_logging

from g2d_jax import progress


def test_format_seconds():
  assert progress.format_seconds(0) == "0:00:00"
  assert progress.format_seconds(3725.4) == "1:02:05"
  assert progress.format_seconds(47 * 3600) == "47:00:00"
  assert progress.format_seconds(3 * 86400 + 3725) == "3d 1:02:05"
  assert progress.format_seconds(float("nan")) == "?"


def test_lines_every_n_steps_and_at_the_end(caplog):
  caplog.set_level(py_logging.INFO)
  p = progress.Progress("job", 10, every=4)
  for step in range(1, 11):
    p.update(step, "x")
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("job ")]
  assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
  assert lines[-1].endswith("ETA 0:00:00 x")
  assert "(100.0%)" in lines[-1] and "steps/s" in lines[-1]


def test_time_throttled_lines_count_only_this_process(caplog, monkeypatch):
  caplog.set_level(py_logging.INFO)
  now = [100.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
  p = progress.Progress("build", 100, done=40, unit="samples", seconds=5.0)
  now[0] += 2.0
  p.update(50)                      # 2 s since start: not yet
  now[0] += 3.0
  p.update(60)                      # 5 s: a line, 20 samples in 5 s
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("build ")]
  assert lines == ["build 60/100 (60.0%) 4.00 samples/s ETA 0:00:10"]
