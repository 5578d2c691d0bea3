"""The leaderboard's pure parts: grids, trials, selection, paired tests, and
its bad-input errors (the runs themselves are exercised by the pipeline
tests; the leaderboard's own results are in experiments/README.md)."""


import os

import numpy as np
import pytest

from g2d_jax import methods
from g2d_jax.errors import ConfigError
from g2d_jax.pipeline import config as config_lib
from tests import pipeline_fixtures as fx

lb = fx.experiment_module("leaderboard")


def test_every_training_method_declares_a_valid_grid_of_three_trials():
  base = config_lib.base_config()
  for m in lb.training_methods():
    grid = lb.method_grid(m)
    assert grid, m
    got = lb.trials(m, grid, base, 3)
    assert len(got) == 3 and len({str(sorted(t.items())) for t in got}) == 3
    # Trial 0 is the method's release default.
    assert got[0] == {lb.config_path(m, k): lb._get(base, lb.config_path(m, k))
                      for k in grid}
  assert lb.method_grid("ume") == {}


def test_trials_are_deterministic_and_cover_the_grid():
  base = config_lib.base_config()
  grid = {"alpha": (2.0, 1.0, 3.0), "momentum": (0.0, 0.5)}
  every = lb.trials("pmr", grid, base, 6)
  assert every == lb.trials("pmr", grid, base, 6)
  assert every[0] == {"pmr.alpha": 2.0, "pmr.momentum": 0.0}
  assert sorted((t["pmr.alpha"], t["pmr.momentum"]) for t in every) == sorted(
      (a, b) for a in (2.0, 1.0, 3.0) for b in (0.0, 0.5))
  assert lb.trials("pmr", grid, base, 3) == every[:3]
  with pytest.raises(ConfigError, match="fewer than --trials=7"):
    lb.trials("pmr", grid, base, 7)


@pytest.mark.parametrize("call,match", [
    (lambda base: lb.trials("ogm_ge", {"alpah": (1.0,)}, base, 1),
     r"has 'alpah', which is not a config field \(no config.ogm_ge.alpah\)"),
    (lambda base: lb.trials("joint", {"student.optimizer.lrr": (1.0,)}, base,
                            1), "no config.student.optimizer.lrr"),
    (lambda base: lb.parse_grid_overrides(["mlb.alpha=1,2"], ("joint",)),
     "for method 'mlb', which is not selected"),
    (lambda base: lb.parse_grid_overrides(["mlb=1,2"], ("mlb",)),
     "write METHOD.FIELD=v1,v2"),
    (lambda base: lb.selected_methods("joint,magic"), r"unknown \['magic'\]"),
])
def test_bad_input_names_the_fix(call, match):
  with pytest.raises(ConfigError, match=match):
    call(config_lib.base_config())


def test_grid_overrides_parse_values():
  got = lb.parse_grid_overrides(["ogm_ge.alpha=0.2,0.4",
                                 "ogm_ge.scope=encoder"], ("ogm_ge",))
  assert got == {"ogm_ge": {"alpha": (0.2, 0.4), "scope": ("encoder",)}}
  assert lb.selected_methods("all")[-1] == methods.TEACHER_ENSEMBLE
  assert set(lb.selected_methods("all")) == set(methods.available())


def test_select_takes_the_best_validation_score_first_on_ties():
  acc = [{"val": v, "kind": "accuracy"} for v in (80.0, 82.0, 82.0)]
  assert lb.select(acc) == 1
  mae = [{"val": v, "kind": "mae"} for v in (0.3, 0.2, 0.25)]
  assert lb.select(mae) == 1


def test_paired_differences_and_intervals_match_scipy_free_formulas():
  a = {0: 81.0, 1: 82.0, 2: 80.5}
  b = {0: 79.0, 1: 80.5, 2: 79.5}
  d = lb.paired(a, b)
  diffs = np.array([2.0, 1.5, 1.0])
  assert d["mean"] == pytest.approx(1.5) and d["seeds"] == [0, 1, 2]
  # Paired t: mean / (sd / sqrt(n)) = 1.5 / (0.5 / sqrt 3) = 5.196 on 2
  # degrees of freedom: two-sided p = 0.0351 (t table).
  t = diffs.mean() / (diffs.std(ddof=1) / np.sqrt(3))
  assert t == pytest.approx(5.196, rel=1e-3)
  assert d["p"] == pytest.approx(0.0351, abs=2e-4)
  assert lb.paired({0: 1.0}, {0: 2.0}) is None
  same = lb.paired({0: 1.0, 1: 2.0}, {0: 0.0, 1: 1.0})
  assert same["p"] is None and same["constant"] and same["mean"] == 1.0
  # 95% t-interval of (1, 2, 3): t_{0.975, 2} = 4.303, sd 1, n 3.
  assert lb.interval95([1.0, 2.0, 3.0]) == pytest.approx(4.303 / np.sqrt(3),
                                                         rel=1e-3)
  assert lb.mean_std([2.0]) == (2.0, 0.0)


def test_step_time_ratios_from_either_benchmark():
  rows = {"rows": [{"variant": "joint", "ratio_to_joint": 1.0},
                   {"variant": "g2d", "ratio_to_joint": 0.98},
                   {"variant": "g2d (SMP, image frozen)",
                    "ratio_to_joint": 0.5}]}
  assert lb.step_time_ratios(rows) == {"joint": 1.0, "g2d": 0.98}
  records = {"records": [
      {"impl": "jax", "method": "joint", "pattern": "all", "median_ms": 400.0},
      {"impl": "jax", "method": "mlb", "pattern": "all", "median_ms": 300.0},
      {"impl": "jax", "method": "g2d", "pattern": "audio", "median_ms": 1.0},
      {"impl": "torch", "method": "mlb", "pattern": "all", "median_ms": 9.0}]}
  assert lb.step_time_ratios(records) == {"joint": 1.0, "mlb": 0.75}
  with pytest.raises(ConfigError, match="no JAX joint-training step"):
    lb.step_time_ratios({"records": []})


def test_progress_eta_rests_on_trained_runs_only():
  """Runs reused from disk cost nothing: 2 trained of 4 done in 2 min
  leaves at most 6 more runs at 1 min each."""
  runner = lb.Runner("c.py", "/nonexistent", "common", (), 1, False, 10)
  runner.total, runner.done, runner.started = 10, 4, runner.started - 120
  assert runner.progress().startswith("2.0 min so far")
  assert "left" not in runner.progress()
  runner.ran = 2
  assert runner.progress().endswith("at most about 6 min left")


class FakeRuns:
  """Stands in for `Runner.run`: records each command and writes the
  summary a finished `g2d_jax.main` run would (its real config, and
  teachers scoring `self.teacher_acc`)."""

  def __init__(self):
    self.commands: list[list[str]] = []
    self.teacher_acc = 0.5

  def __call__(self, cmd, log):
    del log
    self.commands.append(cmd)
    flags_ = dict(a[2:].split("=", 1) for a in cmd[3:])
    if flags_["mode"] != "all":
      return
    fv, status = lb.main_lib.parse(["g2d_jax.main", *cmd[3:]])
    assert status == 0
    config = fv["config"].value
    summary = {"config": lb.artifacts.plain(config), "task": "classification",
               "modalities": ["pix", "fou"], "data_fingerprint": {"d": 1},
               "teachers": {"pix": {"test_accuracy": self.teacher_acc},
                            "fou": {"test_accuracy": 0.25}},
               "student": {"test_accuracy": 0.75}}
    name = config.run_name
    os.makedirs(flags_["workdir"], exist_ok=True)
    lb.artifacts.write_json(
        os.path.join(flags_["workdir"], f"summary_{name}.json"), summary)

  def modes(self):
    return [[a for a in c if a.startswith("--mode=")][0][7:] + " "
            + [a for a in c if a.startswith("--config.method=")][0][16:]
            for c in self.commands]


def _runner(tmp_path, runs, fake, monkeypatch):
  runner = lb.Runner("configs/mfeat.py", str(tmp_path / runs), "common", (),
                     1, False, 10, bank=str(tmp_path / "bank"))
  monkeypatch.setattr(runner, "run", fake)
  return runner


def test_bank_keeps_runs_across_runs_directories(tmp_path, monkeypatch):
  """A run is trained once: a second machine (a fresh runs directory) takes
  it from the bank and trains no teachers for a seed it has nothing to run
  on; another setting is run; teachers are trained once per seed."""
  fake = FakeRuns()
  first = _runner(tmp_path, "runs1", fake, monkeypatch)
  got = first.student(0, "joint", 0, {})
  first.student(0, "mlb", 0, {})
  assert fake.modes() == ["teachers g2d", "precompute g2d", "all joint",
                          "all mlb"]
  assert got["student"]["test_accuracy"] == 0.75
  banked = tmp_path / "bank" / "seed0" / "common_joint_t0.json"
  assert lb.artifacts.read_json(str(banked)) == got
  assert first.ran == 2

  fake2 = FakeRuns()
  second = _runner(tmp_path, "runs2", fake2, monkeypatch)
  assert second.student(0, "joint", 0, {}) == got
  assert fake2.modes() == []
  assert second.ran == 0 and second.done == 1
  # The same run name with another setting is another run.
  second.student(0, "mlb", 0, {"mlb.beta_max": 2.0})
  assert fake2.modes() == ["teachers g2d", "precompute g2d", "all mlb"]
  assert lb.artifacts.read_json(str(tmp_path / "bank" / "seed0" /
                                    "common_mlb_t0.json"))["config"]["mlb"][
                                        "beta_max"] == 2.0


def test_bank_matches_the_config_field_by_field(tmp_path, monkeypatch):
  """A field the banked config lacks was added since (still the same run);
  a field whose value differs makes it another run."""
  fake = FakeRuns()
  _runner(tmp_path, "runs1", fake, monkeypatch).student(0, "joint", 0, {})
  path = str(tmp_path / "bank" / "seed0" / "common_joint_t0.json")
  summary = lb.artifacts.read_json(path)
  del summary["config"]["student"]["optimizer"]["lr_scale"]
  lb.artifacts.write_json(path, summary)
  fake2 = FakeRuns()
  _runner(tmp_path, "runs2", fake2, monkeypatch).student(0, "joint", 0, {})
  assert fake2.modes() == []
  summary["config"]["student"]["epochs"] += 1
  lb.artifacts.write_json(path, summary)
  fake3 = FakeRuns()
  _runner(tmp_path, "runs3", fake3, monkeypatch).student(0, "joint", 0, {})
  assert fake3.modes() == ["teachers g2d", "precompute g2d", "all joint"]
  assert lb.config_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1}}) == (
      "a.c")
  assert lb.config_difference({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) is None
  assert lb.config_difference({"a": [1, 2]}, {"a": [1, 3]}) == "a"


def test_bank_refuses_runs_of_other_teachers_for_the_same_seed(tmp_path,
                                                               monkeypatch):
  fake = FakeRuns()
  _runner(tmp_path, "runs1", fake, monkeypatch).student(0, "joint", 0, {})
  fake2 = FakeRuns()
  fake2.teacher_acc = 0.51
  second = _runner(tmp_path, "runs2", fake2, monkeypatch)
  with pytest.raises(RuntimeError, match=r"one set of teachers per seed.*"
                     r"removing .*bank/seed0"):
    second.student(0, "mlb", 0, {})
  assert not (tmp_path / "bank" / "seed0" / "common_mlb_t0.json").exists()
  # Another seed has its own teachers.
  second.student(1, "mlb", 0, {})
  assert (tmp_path / "bank" / "seed1" / "common_mlb_t0.json").exists()
