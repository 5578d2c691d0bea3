r"""Every AV-MNIST run behind experiments/README.md's tables, and the tables.

Runs the pipeline (`python -m g2d_jax.main`) once per (seed, run): teachers
and the teacher cache are trained once per seed in `<root>/seed<S>/` and
shared by all of that seed's students (`--config.run_name=<run>`), each of
which writes `<root>/seed<S>/summary_<run>.json`. A finished run is skipped,
so the command can be interrupted and repeated. Model selection is on the
validation split; the test split is only reported.

  # everything (issue tables: Table 1/4/6/7/12, gating semantics, comparators)
  G2D_DATA_DIR=../shared/data python experiments/avmnist_suite.py \
      --root=runs/suite --seeds=0,1,2
  # a subset, then the tables from whatever has finished
  python experiments/avmnist_suite.py --root=runs/suite --seeds=0 \
      --runs=joint,g2d
  python experiments/avmnist_suite.py --root=runs/suite --report_only \
      --out=experiments/results/avmnist_suite.md

Each run is `configs/avmnist.py:<preset>` plus the overrides in `RUNS`;
`--preset=smoke` exercises the whole suite in a few minutes.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ROOT = flags.DEFINE_string("root", "runs/suite", "Directory of all runs.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "config.seed values.")
_RUNS = flags.DEFINE_list("runs", [], "Runs to do (default: all of RUNS).")
_PRESET = flags.DEFINE_string("preset", "quick", "configs/avmnist.py preset.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only write the tables from finished runs.")
_OUT = flags.DEFINE_string("out", "", "Write the tables (markdown) here.")
_STEP_TIMES = flags.DEFINE_string(
    "step_times", "", "A benchmark_step.py --out JSON: adds each method's JAX "
    "step time relative to joint training (pattern 'all') to the "
    "comparators table.")
_EXTRA = flags.DEFINE_multi_string(
    "override", [], "Extra --config.<field>=<value> for every run.")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "Runs at a time, each pinned to its own core with "
    "taskset (these small models keep ~1.4 of 2 cores busy; two pinned runs "
    "do ~1.5x the work of one unpinned run). Step times in a run's log are "
    "then per core, not comparable with single runs.")

# name -> (overrides, what it is), most important first (jobs run in this
# order, every seed of a run before the next run). Runs that are the same
# computation under two names in the paper's tables are run once (TABLES).
# The comparators after `ume` are only needed once (--seeds=0).
RUNS: dict[str, tuple[dict[str, str], str]] = {
    "joint": ({"method": "joint"}, "joint training (fused CE)"),
    "g2d": ({"method": "g2d"}, "G2D: G2D loss + SMP (complete suppression)"),
    "umt": ({"method": "umt"}, "UMT: CE + feature distillation"),
    "g2d_loss": ({"method": "g2d", "smp": "False"}, "G2D loss, no SMP"),
    "joint_smp": ({"method": "joint", "smp": "True"}, "joint + SMP"),
    "umt_smp": ({"method": "umt", "smp": "True"}, "UMT + SMP"),
    "ogm_ge": ({"method": "ogm_ge"}, "OGM-GE"),
    "mlb": ({"method": "mlb"}, "MLB"),
    "g2d_partial": ({"method": "g2d", "gating.suppression": "partial"},
                    "G2D, partial suppression (OGM-GE's 1 - tanh)"),
    "g2d_tau_1of3": ({"method": "g2d", "gating.taus": "TAU_1OF3"},
                     "G2D, tau_1 = 1/3 of the default budget"),
    "g2d_tau_2of3": ({"method": "g2d", "gating.taus": "TAU_2OF3"},
                     "G2D, tau_1 = 2/3 of the default budget"),
    "g2d_logit_only": ({"method": "g2d", "g2d.alpha": "0.0"},
                       "G2D with SMP, alpha = 0, beta = 1"),
    "g2d_reference": ({"method": "g2d", "gating.semantics": "reference"},
                      "G2D, official-code gating (conv kernels only)"),
    "ume": ({"method": "ume"}, "UME: ensemble of the unimodal teachers"),
    "ogm": ({"method": "ogm"}, "OGM"),
    "mmpareto": ({"method": "mmpareto"}, "MMPareto"),
    "mla": ({"method": "mla"}, "MLA"),
    "pmr": ({"method": "pmr"}, "PMR"),
}

# table -> [(row label, run, the paper's AV-MNIST numbers)]: the paper's
# fused accuracy, or (fused, audio, image) where it reports the modalities
# inside the model (Table 1); None where it has no AV-MNIST number.
Paper = float | tuple[float, float, float] | None
TABLES: dict[str, list[tuple[str, str, Paper]]] = {
    "Table 1 (AV-MNIST column)": [
        ("Joint-Train", "joint", (69.77, 16.05, 55.83)),
        ("UMT", "umt", (72.33, 31.55, 64.08)),
        ("OGM-GE", "ogm_ge", (71.08, 24.53, 55.85)),
        ("MLB", "mlb", None),
        ("G2D", "g2d", (73.03, 39.10, 65.09))],
    "Table 4 (effect of SMP)": [
        ("Joint-Train", "joint", 69.77), ("Joint-Train + SMP", "joint_smp",
                                          72.51),
        ("UMT", "umt", 72.33), ("UMT + SMP", "umt_smp", 72.68),
        ("G2D loss", "g2d_loss", 72.76), ("G2D loss + SMP", "g2d", 73.03)],
    "Table 6 (suppression)": [
        ("Partial", "g2d_partial", 72.83), ("Complete", "g2d", 73.03)],
    "Table 7 (tau_1 of the prioritisation budget)": [
        ("0", "g2d_loss", None), ("1/3", "g2d_tau_1of3", None),
        ("2/3", "g2d_tau_2of3", None), ("all (default)", "g2d", None)],
    "Table 12 ((alpha, beta), with SMP)": [
        ("(0, 0) = Joint + SMP", "joint_smp", None),
        ("(1, 0) = UMT + SMP", "umt_smp", None),
        ("(0, 1)", "g2d_logit_only", None), ("(1, 1)", "g2d", None)],
    "Gating semantics (G2D)": [
        ("freeze (paper Eq. 8, default)", "g2d", None),
        ("reference (official code)", "g2d_reference", None)],
    "Comparators (issue: methods beside G2D)": [
        ("joint", "joint", (69.77, 16.05, 55.83)),
        ("umt", "umt", (72.33, 31.55, 64.08)), ("ume", "ume", None),
        ("ogm", "ogm", None), ("ogm_ge", "ogm_ge", (71.08, 24.53, 55.85)),
        ("mlb", "mlb", None), ("mmpareto", "mmpareto", (72.63, 42.11, 65.26)),
        ("mla", "mla", (65.32, 42.26, 65.30)),
        ("pmr", "pmr", (71.82, 37.60, 58.50)),
        ("g2d", "g2d", (73.03, 39.10, 65.09))],
}


def preset_taus(preset: str) -> tuple[int, ...]:
  sys.path.insert(0, ROOT)
  from configs import avmnist  # pylint: disable=g-import-not-at-top
  from g2d_jax import schedule  # pylint: disable=g-import-not-at-top
  return schedule.gating_taus(avmnist.get_config(preset))


def overrides(run: str, preset: str) -> list[str]:
  """The run's --config.<field>=<value> arguments."""
  tau = preset_taus(preset)[0]
  subst = {"TAU_1OF3": f"({round(tau / 3)},)",
           "TAU_2OF3": f"({round(2 * tau / 3)},)"}
  out = []
  for k, v in RUNS[run][0].items():
    out.append(f"--config.{k}={subst.get(v, v)}")
  return out


_TIMES_LOCK = threading.Lock()


def run_one(seed: str, run: str, preset: str, root: str,
            extra: Sequence[str], core: int | None = None) -> float | None:
  """Runs one (seed, run) unless its summary exists; returns wall seconds.

  `run="teachers"` trains the seed's teachers and teacher cache only.
  """
  workdir = os.path.join(root, f"seed{seed}")
  teachers_only = run == "teachers"
  done = (os.path.join(workdir, "teacher_cache", "manifest.json")
          if teachers_only else
          os.path.join(workdir, f"summary_{run}.json"))
  if os.path.exists(done):
    return None
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  base = [sys.executable, "-m", "g2d_jax.main",
          f"--config={ROOT}/configs/avmnist.py:{preset}",
          f"--workdir={workdir}", f"--config.seed={seed}", *extra]
  if teachers_only:
    cmds = [base + ["--mode=teachers"], base + ["--mode=precompute"]]
  else:
    cmds = [base + [f"--config.run_name={run}",
                    "--config.eval.test_every_epoch=True",
                    *overrides(run, preset)]]
  if core is not None:
    cmds = [["taskset", "-c", str(core), *c] for c in cmds]
  log = os.path.join(workdir, "logs", f"{run}.log")
  t0 = time.time()
  with open(log, "w") as f:
    for cmd in cmds:
      f.write(" ".join(cmd) + "\n")
      f.flush()
      proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            cwd=ROOT)
      if proc.returncode:
        raise SystemExit(f"error: seed {seed} run {run} failed (exit "
                         f"{proc.returncode}); see {log}")
  wall = time.time() - t0
  with _TIMES_LOCK:
    times_path = os.path.join(workdir, "wall_times.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    times[run] = {"seconds": wall, "pinned_core": core}
    with open(times_path + ".tmp", "w") as f:
      json.dump(times, f, indent=1, sort_keys=True)
    os.replace(times_path + ".tmp", times_path)
  return wall


def _mean_std(xs: list[float]) -> str:
  if not xs:
    return "-"
  if len(xs) == 1:
    return f"{100 * xs[0]:.2f}"
  return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def load_summaries(root: str, seeds: Sequence[str]) -> dict[str, list[dict]]:
  """{run: [summary per seed that finished it]}."""
  out: dict[str, list[dict]] = {}
  for s in seeds:
    for run in RUNS:
      path = os.path.join(root, f"seed{s}", f"summary_{run}.json")
      if os.path.exists(path):
        out.setdefault(run, []).append(json.load(open(path)))
  return out


def step_ratios(path: str) -> tuple[dict[str, float], str]:
  """{method: JAX step time / joint's} from a benchmark_step.py JSON.

  Uses the first (model, batch size) in the file with pattern "all".
  """
  with open(path) as f:
    records = [r for r in json.load(f)["records"]
               if r["impl"] == "jax" and r["pattern"] == "all"]
  if not records:
    raise SystemExit(f"error: {path} has no JAX records with pattern 'all'; "
                     "pass a benchmark_step.py --out file")
  model, bs = records[0]["model"], records[0]["batch_size"]
  ratios = {r["method"]: r["ratio_to_joint"] for r in records
            if r["model"] == model and r["batch_size"] == bs}
  return ratios, f"step time / joint ({model} model, batch {bs})"


def report(root: str, seeds: Sequence[str], step_times: str = "") -> str:
  """The markdown tables: mean ± std over the seeds that finished."""
  ratios, ratio_head = step_ratios(step_times) if step_times else ({}, "")
  sums = load_summaries(root, seeds)
  lines = []
  any_summary = next((v[0] for v in sums.values() if v), None)
  if any_summary is None:
    return "no finished runs\n"
  mods = any_summary["modalities"]
  teachers = {m: [s["teachers"][m]["test_accuracy"]
                  for v in list(sums.values())[:1] for s in v]
              for m in mods}
  lines.append(f"Teachers (test accuracy, {len(teachers[mods[0]])} seeds): "
               + ", ".join(f"{m} {_mean_std(teachers[m])}" for m in mods)
               + "\n")
  for title, rows in TABLES.items():
    lines.append(f"### {title}\n")
    with_steps = bool(ratios) and title.startswith("Comparators")
    head = (["row", "seeds", "fused test acc."] +
            [f"{m} (in model)" for m in mods] +
            ["ECE", "paper (fused / audio / image)"] +
            ([ratio_head] if with_steps else []))
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for label, run, paper in rows:
      ss = sums.get(run, [])
      # UME trains no student: its row is the teachers' ensemble.
      st = [s.get("student", s["teacher_ensemble"]) for s in ss]
      cells = [label, str(len(ss)),
               _mean_std([x["test_accuracy"] for x in st])]
      cells += [_mean_std([x["modality_test_accuracy"][m] for x in st])
                for m in mods]
      cells.append(_mean_std([x["test_ece"] for x in st if "test_ece" in x]))
      if paper is None:
        cells.append("-")
      elif isinstance(paper, tuple):
        cells.append(" / ".join(f"{p:.2f}" for p in paper))
      else:
        cells.append(f"{paper:.2f}")
      if with_steps:
        method = RUNS[run][0]["method"]
        cells.append(f"{ratios[method]:.2f}" if method in ratios else "-")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv):
  del argv
  runs = _RUNS.value or list(RUNS)
  unknown = [r for r in runs if r not in RUNS]
  if unknown:
    raise SystemExit(f"error: unknown runs {unknown}; choose from "
                     f"{list(RUNS)}")
  root = os.path.abspath(_ROOT.value)
  if not _REPORT_ONLY.value:
    # Teachers first (one job per seed), then the students of every seed.
    phases = [[(s, "teachers") for s in _SEEDS.value],
              [(s, r) for r in runs for s in _SEEDS.value]]
    total = sum(len(p) for p in phases)
    parallel = max(1, _PARALLEL.value)
    cores = list(range(parallel)) if parallel > 1 else [None]
    done_times: list[float] = []
    counter = iter(range(1, total + 1))
    t_start = time.time()
    lock = threading.Lock()

    def work(job, core):
      seed, run = job
      with lock:
        i = next(counter)
        left = total - i + 1
        eta = (statistics.median(done_times) * left / parallel
               if done_times else None)
        print(f"[{i}/{total}] seed {seed} {run}"
              + (f" on core {core}" if core is not None else "")
              + f" (elapsed {(time.time() - t_start) / 60:.0f} min"
              + (f", ETA {eta / 60:.0f} min)" if eta else ")"), flush=True)
      wall = run_one(seed, run, _PRESET.value, root, _EXTRA.value, core)
      if wall is not None:
        with lock:
          if run != "teachers":
            done_times.append(wall)
          print(f"    seed {seed} {run} done in {wall / 60:.1f} min",
                flush=True)

    errors: list[str] = []
    for jobs in phases:
      queue = list(jobs)

      def worker(core, queue=queue):
        while True:
          with lock:
            if not queue or errors:
              return
            job = queue.pop(0)
          try:
            work(job, core)
          except SystemExit as e:
            with lock:
              errors.append(str(e))
            return

      threads = [threading.Thread(target=worker, args=(c,)) for c in cores]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
      if errors:
        raise SystemExit("\n".join(errors))
  text = report(root, _SEEDS.value, _STEP_TIMES.value)
  print(text)
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
