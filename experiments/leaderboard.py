r"""The fair leaderboard: every method, the same tuning budget, paired seeds.

For one config file and preset, every selected method gets the same number
of tuning trials over its declared grid (`TUNING_GRID` in its module in
g2d_jax/methods/: trial 0 is the release default, the others are settings
drawn deterministically from the grid), all on the tuning seed (the first
seed) and selected on the validation split; the selected setting then runs
on every seed. Teachers and their cache are trained once per seed and shared
by every method and trial of that seed (`--config.run_name`). A finished run
(its summary JSON exists) is skipped, so the command can be interrupted and
repeated. The teachers' ensemble (UME) trains nothing: its row comes from
the same seeds' teachers, with no trials.

  # mfeat, both views, a few minutes on 2 cores
  G2D_DATA_DIR=../shared/data python experiments/leaderboard.py \
      --config=configs/mfeat.py --methods=all --seeds=3 --trials=3 \
      --out=runs/leaderboard/mfeat
  # AV-MNIST quick, the released optimizers
  G2D_DATA_DIR=../shared/data python experiments/leaderboard.py \
      --config=configs/avmnist.py:quick --protocol=released \
      --seeds=3 --trials=3 --out=runs/leaderboard/avmnist_released \
      --runs_root=runs/leaderboard/avmnist_runs

Runs outlive the runs directory with `--bank=DIR`: every finished run's
summary is copied to `DIR/seed<S>/<run name>.json` (a few kB), and a run
whose banked summary has the config this command would give it (compared
field by field; a field the bank lacks is one added since, whose default
keeps the old behaviour) is taken from the bank instead of trained. Commit
the bank and a long leaderboard (the AV-MNIST ones are tens of CPU hours)
accumulates across sessions and machines. Teachers are trained only for
seeds that still have runs to do, and a new run's teachers must score
exactly what the banked runs' teachers of its seed scored, or the
leaderboard stops: the paired differences assume one set of teachers per
seed.

Writes `<out>/leaderboard.csv` (one row per method), `leaderboard.md` (the
table, the paired tests against joint and G2D, the resolved windows, every
trial's validation score), `leaderboard.png` (fused test accuracy, mean and
95% t-interval over seeds) and `leaderboard.json` (everything).

Paired differences: per seed, method minus joint (and minus G2D), on the
same teachers; a two-sided paired t-test (scipy.stats.ttest_rel) over
seeds gives the p-value. With 3 seeds a t-test has little power: read the
p-values as a screen, not a verdict.
"""

from __future__ import annotations

import concurrent.futures
import csv
import ast
import importlib.util
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from g2d_jax import artifacts  # noqa: E402  pylint: disable=g-import-not-at-top
from g2d_jax import main as main_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from g2d_jax import methods  # noqa: E402  pylint: disable=g-import-not-at-top
from g2d_jax.errors import ConfigError  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = flags.DEFINE_string("config", "configs/mfeat.py",
                              "config file[:preset], as for g2d_jax.main")
_METHODS = flags.DEFINE_string(
    "methods", "all", "comma-separated methods, or 'all' (every method that "
    "trains a student, plus the teachers' ensemble 'ume')")
_SEEDS = flags.DEFINE_integer("seeds", 3, "number of seeds (0, 1, ...)")
_TRIALS = flags.DEFINE_integer("trials", 3, "tuning trials per method")
_OUT = flags.DEFINE_string("out", None, "output directory", required=True)
_RUNS_ROOT = flags.DEFINE_string(
    "runs_root", None, "where the runs go (default <out>/runs); share it "
    "between protocols to share the teachers")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "runs at a time")
_PIN = flags.DEFINE_bool("pin", False, "pin each parallel run to one core "
                         "(taskset), so runs do not fight over cores")
_PROTOCOL = flags.DEFINE_enum("protocol", "common", ["common", "released"],
                              "the student optimizer (config.protocol)")
_GRID = flags.DEFINE_multi_string(
    "grid", [], "override a method's grid: METHOD.FIELD=v1,v2,... (FIELD "
    "of config.METHOD, or a full config path); repeatable")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "FIELD=VALUE passed to every run as --config.FIELD=VALUE "
    "(e.g. student.epochs=24)")
_STEP_TIMES = flags.DEFINE_string(
    "step_times", None, "the JSON of experiments/method_step_time.py --out "
    "or experiments/benchmark_step.py, for the step-time column (e.g. "
    "experiments/results/step_paper_bs16.json for AV-MNIST)")
_TIMEOUT = flags.DEFINE_integer("timeout", 7200, "seconds per run")
_BANK = flags.DEFINE_string(
    "bank", None, "a directory (in the repository, e.g. experiments/results/"
    "leaderboard/avmnist_quick_runs) that keeps every finished run's "
    "summary: a later session or machine reuses a banked run whose config "
    "matches instead of training it again")


# ---------------------------------------------------------------------------
# Grids and trials (pure; tested in tests/test_experiments_leaderboard.py)


def training_methods() -> tuple[str, ...]:
  return tuple(m for m in methods.available() if not methods.trains_nothing(m))


def selected_methods(spec: str) -> tuple[str, ...]:
  """`all` or a comma list -> method names (UME last)."""
  if spec == "all":
    return (*training_methods(), methods.TEACHER_ENSEMBLE)
  names = tuple(n.strip() for n in spec.split(",") if n.strip())
  bad = [n for n in names if n not in methods.available()]
  if bad or not names:
    raise ConfigError(f"--methods={spec!r}: unknown {bad}; choose from "
                      f"{list(methods.available())} or 'all'.")
  return names


def config_path(method: str, key: str) -> str:
  """A grid key as a full config path: a bare field is `<method>.<field>`."""
  return key if "." in key else f"{method}.{key}"


def _has_path(config: Any, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def method_grid(method: str) -> dict[str, tuple[Any, ...]]:
  """The module's `TUNING_GRID` ({} for a method without one)."""
  grid = getattr(methods.module(method), "TUNING_GRID", {})
  return {k: tuple(v) for k, v in grid.items()}


def load_config(spec: str) -> Any:
  """`path/to/config.py[:preset]` -> its locked ConfigDict."""
  path, _, preset = spec.partition(":")
  full = path if os.path.isabs(path) else os.path.join(ROOT, path)
  if not os.path.exists(full):
    raise ConfigError(f"--config={spec!r}: no file {full}.")
  module_spec = importlib.util.spec_from_file_location("_leaderboard_config",
                                                       full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def parse_grid_overrides(specs: Sequence[str], selected: Sequence[str]
                         ) -> dict[str, dict[str, tuple[Any, ...]]]:
  """`--grid` flags -> {method: {key: values}}; ConfigError if bad."""
  out: dict[str, dict[str, tuple[Any, ...]]] = {}
  for spec in specs:
    head, sep, values = spec.partition("=")
    method, dot, key = head.partition(".")
    if not sep or not dot or not values:
      raise ConfigError(f"--grid={spec!r}: write METHOD.FIELD=v1,v2,... "
                        "(e.g. --grid=ogm_ge.alpha=0.4,0.8).")
    if method not in selected:
      raise ConfigError(
          f"--grid={spec!r} is for method {method!r}, which is not selected "
          f"(--methods gives {list(selected)}); add it to --methods or drop "
          "the grid.")
    out.setdefault(method, {})[key] = tuple(_literal(v) for v in
                                            values.split(","))
  return out


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def check_grid(method: str, grid: Mapping[str, Sequence[Any]],
               config: Any) -> None:
  """Every key names a config field: ConfigError naming the fix if not."""
  for key in grid:
    path = config_path(method, key)
    if not _has_path(config, path):
      raise ConfigError(
          f"the tuning grid of {method!r} has {key!r}, which is not a config "
          f"field (no config.{path}); use a field of config.{method} or a "
          "full config path such as student.optimizer.lr_scale.")
    if not grid[key]:
      raise ConfigError(f"the tuning grid of {method!r} gives no values for "
                        f"{key!r}.")


def trials(method: str, grid: Mapping[str, Sequence[Any]], config: Any,
           count: int) -> list[dict[str, Any]]:
  """`count` settings {config path: value}: the defaults first, then
  settings of the grid drawn without replacement in a fixed order (seeded by
  the method's name, so reruns and other machines draw the same).

  Raises:
    ConfigError: the grid has fewer than `count` distinct settings.
  """
  check_grid(method, grid, config)
  paths = [config_path(method, k) for k in grid]
  default = {p: _get(config, p) for p in paths}
  combos = [dict(zip(paths, values)) for values in
            itertools.product(*(grid[k] for k in grid))]
  others = [c for c in combos if c != default]
  if len(others) + 1 < count:
    raise ConfigError(
        f"the tuning grid of {method!r} has {len(others) + 1} distinct "
        f"settings (with the default), fewer than --trials={count}: every "
        f"method gets the same budget, so lower --trials to "
        f"{len(others) + 1} or widen the grid with --grid={method}.FIELD=...")
  order = _shuffled(others, zlib.crc32(method.encode()))
  return [default, *order[:count - 1]]


def _shuffled(items: list[Any], seed: int) -> list[Any]:
  out = list(items)
  random.Random(seed).shuffle(out)
  return out


def _get(config: Any, path: str) -> Any:
  node = config
  for part in path.split("."):
    node = node[part]
  return tuple(node) if isinstance(node, list) else node


# ---------------------------------------------------------------------------
# Statistics (pure)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  if not values:
    return math.nan, math.nan
  return (statistics.fmean(values),
          statistics.stdev(values) if len(values) > 1 else 0.0)


def interval95(values: Sequence[float]) -> float:
  """Half-width of the 95% t-interval of the mean."""
  if len(values) < 2:
    return 0.0
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.t.ppf(0.975, len(values) - 1)
               * statistics.stdev(values) / math.sqrt(len(values)))


def paired(a: Mapping[int, float], b: Mapping[int, float]
           ) -> dict[str, Any] | None:
  """Mean paired difference a - b over common seeds and the paired t-test
  p-value (None when fewer than two seeds pair up)."""
  seeds = sorted(set(a) & set(b))
  if len(seeds) < 2:
    return None
  from scipy import stats  # pylint: disable=g-import-not-at-top
  diffs = [a[s] - b[s] for s in seeds]
  if all(abs(d - diffs[0]) < 1e-9 for d in diffs):
    # No spread: the t statistic is undefined (0/0) or infinite; say so
    # rather than print p = 0 (test accuracies move in steps of one sample,
    # so equal differences over 3 seeds happen).
    return {"mean": statistics.fmean(diffs), "seeds": seeds, "p": None,
            "diffs": diffs, "constant": True}
  p = float(stats.ttest_rel([a[s] for s in seeds],
                            [b[s] for s in seeds]).pvalue)
  return {"mean": statistics.fmean(diffs), "seeds": seeds, "p": p,
          "diffs": diffs, "constant": False}


# ---------------------------------------------------------------------------
# Running


class Runner:
  """Runs `python -m g2d_jax.main` jobs, skipping finished ones."""

  def __init__(self, config: str, runs_root: str, protocol: str,
               overrides: Sequence[str], parallel: int, pin: bool,
               timeout: int, bank: str | None = None):
    self.config, self.root, self.protocol = config, runs_root, protocol
    self.overrides = list(overrides)
    self.parallel, self.pin, self.timeout = parallel, pin, timeout
    self.bank = bank
    self._lock = threading.Lock()
    self._free_cores = list(range(max(1, parallel)))
    self._seed_locks: dict[int, threading.Lock] = {}
    self._teachers_ready: set[int] = set()
    self.done = 0
    self.ran = 0    # runs trained here, not reused: what the ETA rests on
    self.total = 0
    self.started = time.time()

  def progress(self) -> str:
    """Elapsed time and an ETA from the runs trained in this invocation
    (finished runs found on disk cost nothing, so they do not count)."""
    elapsed = time.time() - self.started
    text = f"{elapsed / 60:.1f} min so far"
    if self.ran:
      eta = elapsed / self.ran * (self.total - self.done)
      text += f", at most about {eta / 60:.0f} min left"
    return text

  def workdir(self, seed: int) -> str:
    return os.path.join(self.root, f"seed{seed}")

  def summary_path(self, seed: int, run_name: str) -> str:
    return os.path.join(self.workdir(seed), f"summary_{run_name}.json")

  def command(self, seed: int, method: str, run_name: str,
              setting: Mapping[str, Any], mode: str = "all") -> list[str]:
    cmd = [sys.executable, "-m", "g2d_jax.main", f"--config={self.config}",
           f"--workdir={self.workdir(seed)}", f"--mode={mode}",
           f"--config.seed={seed}", f"--config.method={method}",
           f"--config.protocol={self.protocol}"]
    if run_name:
      cmd.append(f"--config.run_name={run_name}")
    cmd += [f"--config.{o}" for o in self.overrides]
    cmd += [f"--config.{k}={_flag_value(v)}" for k, v in setting.items()]
    return cmd

  def run(self, cmd: list[str], log: str) -> None:
    with self._lock:
      core = self._free_cores.pop() if self.pin else None
    try:
      if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
      os.makedirs(os.path.dirname(log), exist_ok=True)
      with open(log + ".tmp", "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              cwd=ROOT, timeout=self.timeout, check=False)
      os.replace(log + ".tmp", log)
      if proc.returncode:
        raise RuntimeError(f"run failed (exit {proc.returncode}); see {log}:"
                           f"\n  {' '.join(cmd)}")
    finally:
      if core is not None:
        with self._lock:
          self._free_cores.append(core)

  def expected_config(self, seed: int, method: str, run_name: str,
                      setting: Mapping[str, Any]) -> dict[str, Any]:
    """The config `g2d_jax.main` will run with for these flags, as JSON."""
    path, sep, preset = self.config.partition(":")
    spec = (path if os.path.isabs(path) else os.path.join(ROOT, path)) + (
        sep + preset)
    cmd = self.command(seed, method, run_name, setting)
    argv = ["g2d_jax.main", f"--config={spec}",
            *[a for a in cmd[3:] if not a.startswith("--config=")]]
    fv, status = main_lib.parse(argv)
    if fv is None:
      raise ConfigError(f"the run's flags do not parse (exit {status}): "
                        f"{' '.join(cmd)}")
    return artifacts.plain(fv["config"].value)

  def bank_path(self, seed: int, run_name: str) -> str:
    assert self.bank
    return os.path.join(self.bank, f"seed{seed}", f"{run_name}.json")

  def student(self, seed: int, method: str, trial: int,
              setting: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of one (seed, method, trial) run: from the runs
    directory, else from the bank, else by running it."""
    name = run_name(self.protocol, method, trial)
    path = self.summary_path(seed, name)
    want = self.expected_config(seed, method, name, setting)
    summary, source = _matching(path, want), "reused"
    if summary is None and self.bank:
      summary, source = _matching(self.bank_path(seed, name), want), "banked"
    if summary is None:
      self.ensure_teachers(seed)
      self.run(self.command(seed, method, name, setting),
               os.path.join(self.workdir(seed), "logs", f"{name}.log"))
      summary, source = _matching(path, want), "done"
      if summary is None:
        raise RuntimeError(f"{path}: the run finished but its summary's "
                           "config is not the one asked for.")
    if self.bank and source != "banked":
      self.deposit(seed, name, summary)
    with self._lock:
      self.done += 1
      self.ran += source == "done"
      print(f"[{self.done}/{self.total}] seed {seed} {method} trial {trial} "
            f"{source}; {self.progress()}", flush=True)
    return summary

  def deposit(self, seed: int, name: str, summary: Mapping[str, Any]) -> None:
    """Banks a finished run, after checking that its teachers are the ones
    the bank's runs of the same seed were made with."""
    folder = os.path.dirname(self.bank_path(seed, name))
    with self._lock:
      for other in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not other.endswith(".json") or other == f"{name}.json":
          continue
        banked = artifacts.read_json(os.path.join(folder, other))
        if not same_teacher_setup(banked, summary):
          continue
        if banked["teachers"] != summary["teachers"]:
          raise RuntimeError(
              f"seed {seed}: the teachers of run {name!r} score "
              f"{teacher_scores(summary)}, but the banked run {other!r} of "
              f"the same seed and teacher settings was made with teachers "
              f"scoring {teacher_scores(banked)}. Paired differences need "
              f"one set of teachers per seed: find why training is not "
              f"reproducible here, or start the seed over by removing "
              f"{folder}.")
      os.makedirs(folder, exist_ok=True)
      artifacts.write_json(self.bank_path(seed, name), summary)

  def ensure_teachers(self, seed: int) -> None:
    """Trains the seed's teachers and cache once, before its first run
    (parallel runs of one seed wait for them rather than race)."""
    with self._lock:
      lock = self._seed_locks.setdefault(seed, threading.Lock())
    with lock:
      if seed not in self._teachers_ready:
        self.teachers(seed)
        self._teachers_ready.add(seed)

  def teachers(self, seed: int) -> None:
    """Teachers and their cache of one seed, before its students."""
    for mode in ("teachers", "precompute"):
      self.run(self.command(seed, "g2d", "", {}, mode=mode),
               os.path.join(self.workdir(seed), "logs", f"{mode}.log"))

  def map(self, fn, items):
    if self.parallel <= 1:
      return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
      return list(pool.map(fn, items))


def run_name(protocol: str, method: str, trial: int) -> str:
  return f"{protocol}_{method}_t{trial}"


def _flag_value(v: Any) -> str:
  return str(tuple(v)) if isinstance(v, (list, tuple)) else str(v)


def config_difference(banked: Any, want: Any, path: str = "") -> str | None:
  """The first config field where a stored run differs from the one asked
  for (None: it is that run). A field the stored config lacks is one added
  to the code since; new fields default to the old behaviour, so it is not
  a difference."""
  if isinstance(want, dict) and isinstance(banked, dict):
    for key in sorted(set(want) | set(banked)):
      sub = f"{path}.{key}" if path else key
      if key not in banked:
        continue
      if key not in want:
        return sub
      found = config_difference(banked[key], want[key], sub)
      if found:
        return found
    return None
  return None if banked == want else path or "<root>"


def _matching(path: str, want: Mapping[str, Any]) -> dict[str, Any] | None:
  """The summary at `path` if it exists and is the run asked for."""
  if not os.path.exists(path):
    return None
  summary = artifacts.read_json(path)
  diff = config_difference(summary.get("config", {}), want)
  if diff:
    print(f"{path}: config.{diff} differs from this run's; running it "
          "again", flush=True)
    return None
  return summary


def same_teacher_setup(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  """Two summaries whose teachers were trained alike (same teacher and
  model settings, same data)."""
  return all(a["config"].get(k) == b["config"].get(k)
             for k in ("seed", "teacher", "model", "data")) and (
                 a.get("data_fingerprint") == b.get("data_fingerprint"))


def teacher_scores(summary: Mapping[str, Any]) -> dict[str, float]:
  return {m: next(v for k, v in t.items() if k.startswith("test_"))
          for m, t in summary["teachers"].items()}


# ---------------------------------------------------------------------------
# Reading summaries


def scores(summary: Mapping[str, Any], method: str) -> dict[str, Any]:
  """The leaderboard's numbers from a run summary (accuracy in %)."""
  block = (summary["teacher_ensemble"] if methods.trains_nothing(method)
           else summary["student"])
  kind = "mae" if summary["task"] == "regression" else "accuracy"
  scale = 100.0 if kind == "accuracy" else 1.0
  val = block["val"].get(f"{kind}/fused")
  out = {"test": block[f"test_{kind}"] * scale,
         "val": None if val is None else val * scale,
         "modality": {m: v * scale for m, v in
                      block[f"modality_test_{kind}"].items()},
         "ece": block.get("test_ece"),
         "ece_calibrated": block.get("test_ece_calibrated"),
         "temperature": block.get("temperature"),
         "kind": kind}
  out["schedule"] = summary.get("schedule", {})
  return out


def select(trial_scores: Sequence[Mapping[str, Any]]) -> int:
  """The trial with the best validation score (ties: the earlier)."""
  kind = trial_scores[0]["kind"]
  key = [(s["val"] if kind == "accuracy" else -s["val"]) for s in trial_scores]
  return max(range(len(key)), key=lambda i: (key[i], -i))


# ---------------------------------------------------------------------------
# Report


def build_rows(results: Mapping[str, Any], modalities: Sequence[str],
               step_times: Mapping[str, float]) -> list[dict[str, Any]]:
  per_seed = {m: {s: r["test"] for s, r in res["seeds"].items()}
              for m, res in results.items()}
  rows = []
  for method, res in results.items():
    seeds = res["seeds"]
    test = [r["test"] for r in seeds.values()]
    mean, std = mean_std(test)
    row: dict[str, Any] = {
        "method": method, "setting": json.dumps(res["setting"]),
        "trials": len(res["trials"]), "seeds": len(seeds),
        "test_mean": mean, "test_std": std, "ci95": interval95(test)}
    for m in modalities:
      row[f"{m}_mean"] = mean_std([r["modality"][m] for r in
                                   seeds.values()])[0]
    for key in ("ece", "ece_calibrated"):
      vals = [r[key] for r in seeds.values() if r[key] is not None]
      row[f"{key}_mean"] = mean_std(vals)[0] if vals else None
    row["step_time_vs_joint"] = step_times.get(method)
    for ref in ("joint", "g2d"):
      d = (paired(per_seed[method], per_seed[ref])
           if ref in per_seed and ref != method else None)
      row[f"diff_vs_{ref}"] = d["mean"] if d else None
      row[f"p_vs_{ref}"] = d["p"] if d else None
    rows.append(row)
  rows.sort(key=lambda r: -r["test_mean"])
  return rows


def _fmt(v: Any, digits: int = 2) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if isinstance(v, float):
    return f"{v:.{digits}f}"
  return str(v)


def write_report(out: str, rows: list[dict[str, Any]],
                 results: Mapping[str, Any], modalities: Sequence[str],
                 header: Mapping[str, Any]) -> None:
  os.makedirs(out, exist_ok=True)
  fields = list(rows[0])
  with open(os.path.join(out, "leaderboard.csv.tmp"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
  os.replace(os.path.join(out, "leaderboard.csv.tmp"),
             os.path.join(out, "leaderboard.csv"))
  lines = [f"# Leaderboard: {header['config']}, protocol "
           f"{header['protocol']}", "",
           f"Command: `{header['command']}`", "",
           f"{header['seeds']} seeds ({header['seed_list']}), "
           f"{header['trials']} tuning trials per method on seed "
           f"{header['seed_list'][0]}, selected on validation; test accuracy "
           "in %, mean ± std over seeds (95% t-interval in brackets); ECE "
           "before / after temperature scaling (fitted on validation); "
           "differences are paired by seed, with the paired t-test p.", "",
           "| rank | method | test acc. | " + " | ".join(modalities)
           + " | ECE | ECE (T) | vs joint (p) | vs G2D (p) | step / joint |"
           " chosen setting |",
           "|" + "---|" * (9 + len(modalities))]
  for i, r in enumerate(rows, 1):
    diff = lambda ref, r=r: ("-" if r[f"diff_vs_{ref}"] is None else
                             f"{r[f'diff_vs_{ref}']:+.2f} "
                             + ("(same every seed)" if r[f"p_vs_{ref}"] is None
                                else f"({r[f'p_vs_{ref}']:.3f})"))
    lines.append(
        f"| {i} | {r['method']} | {r['test_mean']:.2f} ± {r['test_std']:.2f}"
        f" [±{r['ci95']:.2f}] | "
        + " | ".join(_fmt(r[f"{m}_mean"]) for m in modalities)
        + f" | {_fmt(r['ece_mean'], 3)} | {_fmt(r['ece_calibrated_mean'], 3)}"
        f" | {diff('joint')} | {diff('g2d')} | "
        f"{_fmt(r['step_time_vs_joint'])} | `{r['setting']}` |")
  lines += ["", "## Resolved windows (tuning seed, chosen setting)", ""]
  for method, res in results.items():
    sched = res["schedule"]
    parts = []
    if "smp" in sched:
      parts.append(f"SMP taus {sched['smp']['taus']}")
    for name, w in sched.get("windows", {}).items():
      parts.append(f"{name} epochs {w['first_epoch']}..{w['last_epoch']} "
                   f"({100 * w['share']:.0f}%)")
    opt = sched.get("student_optimizer", {})
    if opt:
      parts.append(f"{opt['name']} lr {opt['lr']:g}, decay at "
                   f"{opt['decay_epochs']}")
    lines.append(f"- {method}: " + ("; ".join(parts) or "-"))
  lines += ["", "## Trials (validation score, tuning seed)", ""]
  for method, res in results.items():
    cells = [f"{json.dumps(t['setting'])}: {_fmt(t['val'])}"
             for t in res["trials"]]
    lines.append(f"- {method}: " + "; ".join(cells))
  with open(os.path.join(out, "leaderboard.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "leaderboard.json"), "w") as f:
    json.dump({"header": header, "rows": rows, "results": results}, f,
              indent=1, default=str)
  plot(os.path.join(out, "leaderboard.png"), rows, header)


def plot(path: str, rows: Sequence[Mapping[str, Any]],
         header: Mapping[str, Any]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.7 * len(rows)), 3.8))
  x = range(len(rows))
  ax.bar(x, [r["test_mean"] for r in rows],
         yerr=[r["ci95"] for r in rows], capsize=3,
         color=["tab:red" if r["method"] == "g2d" else "tab:blue"
                for r in rows])
  ax.set_xticks(list(x), [r["method"] for r in rows], rotation=45,
                ha="right")
  lo = min(r["test_mean"] - r["ci95"] for r in rows)
  hi = max(r["test_mean"] + r["ci95"] for r in rows)
  ax.set_ylim(max(0.0, lo - 0.3 * (hi - lo + 1)), hi + 0.1 * (hi - lo + 1))
  ax.set_ylabel("fused test accuracy (%)")
  ax.set_title(f"{header['config']} ({header['protocol']})\n"
               f"{header['seeds']} seeds, {header['trials']} trials each, "
               "95% t-intervals", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def load_step_times(path: str | None) -> dict[str, float]:
  """{method: step time / joint's} from a step benchmark's JSON: the output
  of experiments/method_step_time.py (`rows`, its interleaved ratios) or of
  experiments/benchmark_step.py (`records`: JAX, every modality training,
  the ratio of medians)."""
  if not path:
    return {}
  with open(path) as f:
    data = json.load(f)
  return step_time_ratios(data)


def step_time_ratios(data: Mapping[str, Any]) -> dict[str, float]:
  if "rows" in data:
    return {r["variant"]: r["ratio_to_joint"] for r in data["rows"]
            if r["variant"] in methods.available()}
  median = {r["method"]: r["median_ms"] for r in data.get("records", [])
            if r.get("impl") == "jax" and r.get("pattern") == "all"}
  if "joint" not in median:
    raise ConfigError("--step_times: the file has no JAX joint-training "
                      "step to compare with; give the JSON that "
                      "experiments/method_step_time.py or "
                      "experiments/benchmark_step.py writes.")
  return {m: t / median["joint"] for m, t in median.items()}


# ---------------------------------------------------------------------------


def leaderboard(config: str, selected: Sequence[str], seeds: int,
                trial_count: int, out: str, runs_root: str, protocol: str,
                grid_specs: Sequence[str] = (), overrides: Sequence[str] = (),
                parallel: int = 1, pin: bool = False, timeout: int = 7200,
                step_times: Mapping[str, float] | None = None,
                command: str = "", bank: str | None = None
                ) -> list[dict[str, Any]]:
  """Runs (or finds) every run, then writes the report; returns its rows."""
  if seeds < 1 or trial_count < 1:
    raise ConfigError("--seeds and --trials must be at least 1.")
  base = load_config(config)
  grids = {m: method_grid(m) for m in selected}
  for m, g in parse_grid_overrides(grid_specs, selected).items():
    grids[m].update(g)
  plan = {}
  for m in selected:
    if methods.trains_nothing(m):
      plan[m] = [{}]   # trains nothing: nothing to tune
    else:
      plan[m] = trials(m, grids[m], base, trial_count)
  runner = Runner(config, runs_root, protocol, overrides, parallel, pin,
                  timeout, bank)
  seed_list = list(range(seeds))
  trained = [m for m in selected if not methods.trains_nothing(m)]
  runner.total = (len(trained) * (trial_count + seeds - 1)
                  + (len(selected) - len(trained)) * seeds)
  tuning = seed_list[0]
  trial_jobs = [(m, i, setting) for m in trained
                for i, setting in enumerate(plan[m])]
  trial_out = runner.map(
      lambda job: runner.student(tuning, job[0], job[1], job[2]), trial_jobs)
  results: dict[str, Any] = {}
  for m in trained:
    got = [scores(summary, m) for (mm, _, _), summary in
           zip(trial_jobs, trial_out) if mm == m]
    best = select(got)
    results[m] = {"setting": plan[m][best], "trial": best,
                  "trials": [{"setting": plan[m][i], "val": g["val"],
                              "test": g["test"]} for i, g in enumerate(got)],
                  "seeds": {tuning: got[best]},
                  "schedule": got[best]["schedule"]}
  seed_jobs = [(m, s) for m in trained for s in seed_list[1:]]
  seed_out = runner.map(
      lambda job: runner.student(job[1], job[0], results[job[0]]["trial"],
                                 results[job[0]]["setting"]), seed_jobs)
  for (m, s), summary in zip(seed_jobs, seed_out):
    results[m]["seeds"][s] = scores(summary, m)
  for m in selected:
    if methods.trains_nothing(m):
      got = {s: scores(runner.student(s, m, 0, {}), m) for s in seed_list}
      results[m] = {"setting": {}, "trial": 0, "trials": [],
                    "seeds": got, "schedule": {}}
  any_summary = (seed_out or trial_out)[0]
  modalities = any_summary["modalities"]
  rows = build_rows(results, modalities, step_times or {})
  write_report(out, rows, results, modalities, {
      "config": config, "protocol": protocol, "seeds": seeds,
      "seed_list": seed_list, "trials": trial_count, "command": command,
      "overrides": list(overrides), "grids": {m: {k: list(v) for k, v in
                                                  g.items()}
                                              for m, g in grids.items()}})
  return rows


def main(argv):
  del argv
  out = os.path.abspath(_OUT.value)
  runs_root = os.path.abspath(_RUNS_ROOT.value or os.path.join(out, "runs"))
  try:
    rows = leaderboard(
        _CONFIG.value, selected_methods(_METHODS.value), _SEEDS.value,
        _TRIALS.value, out, runs_root, _PROTOCOL.value, _GRID.value,
        _OVERRIDE.value, _PARALLEL.value, _PIN.value, _TIMEOUT.value,
        load_step_times(_STEP_TIMES.value),
        command=" ".join(["python experiments/leaderboard.py",
                          *sys.argv[1:]]),
        bank=os.path.abspath(_BANK.value) if _BANK.value else None)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for r in rows:
    print(f"{r['method']:10s} {r['test_mean']:6.2f} ± {r['test_std']:.2f}  "
          f"({r['seeds']} seeds, {r['trials']} trials) {r['setting']}")
  print(f"wrote {out}/leaderboard.{{csv,md,png,json}}")


if __name__ == "__main__":
  app.run(main)
