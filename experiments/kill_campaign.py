r"""Kills the smoke job at random instants and checks every rerun ends
bit-identical to an uninterrupted run.

  G2D_DATA_DIR=../shared/data python experiments/kill_campaign.py \
      --root=runs/kill --trials=30 --out=experiments/results/kill_campaign.json

One uninterrupted run (fresh data cache) gives the reference: every number
of its summary.json (teachers, teacher ensemble, student) and the sha256
digests of the selected teacher and student weights (their done.json).
Each trial then starts the same command in a fresh workdir with a fresh
data cache, SIGKILLs it after a uniformly random time in (0, reference wall
time) (or from `--from_fraction` of it), reruns the command to completion
and compares. The stage the kill hit (data build, teachers, precompute,
student, eval) is read from the killed run's log.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(ROOT, "configs", "avmnist.py") + ":smoke"


def command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "g2d_jax.main", f"--config={CONFIG}",
          f"--workdir={workdir}"]


def env_for(cache: str) -> dict[str, str]:
  env = dict(os.environ, G2D_CACHE_DIR=cache)
  env.pop("XLA_FLAGS", None)
  return env


def outcome(workdir: str) -> dict[str, object]:
  """Every number of the summary and the weight digests, by path."""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  out = {}

  def walk(tree, prefix):
    if isinstance(tree, dict):
      for k, v in tree.items():
        walk(v, f"{prefix}/{k}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
      out[prefix] = tree

  for part in ("teachers", "teacher_ensemble", "student"):
    walk(summary[part], part)
  for sub in ("teachers/audio", "teachers/image", "student"):
    with open(os.path.join(workdir, sub, "done.json")) as f:
      out[f"digest/{sub}"] = json.load(f)["digest"]
  return out


def stage_at_kill(log: str) -> str:
  stages = re.findall(r"=== stage (\w+)$", log, re.M)
  if not stages:
    return "data build" if "AV-MNIST build" in log else "start-up"
  return stages[-1]


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True)
  p.add_argument("--trials", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True)
  p.add_argument("--from_fraction", type=float, default=0.0,
                 help="kill no earlier than this fraction of the reference "
                 "wall time (e.g. 0.9 aims at the evaluation stage)")
  args = p.parse_args()
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  ref_dir = os.path.join(root, "reference")
  t0 = time.perf_counter()
  subprocess.run(command(ref_dir), check=True, cwd=ROOT,
                 env=env_for(os.path.join(root, "reference_cache")),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wall = time.perf_counter() - t0
  reference = outcome(ref_dir)
  print(f"reference: {wall:.1f} s, {len(reference)} numbers", flush=True)
  rng = random.Random(args.seed)
  trials = []
  for i in range(args.trials):
    workdir = os.path.join(root, f"trial{i:02d}")
    cache = os.path.join(root, f"trial{i:02d}_cache")
    log_path = workdir + ".killed.log"
    t_kill = rng.uniform(args.from_fraction * wall, wall)
    with open(log_path, "w") as log:
      proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env_for(cache),
                              stdout=subprocess.DEVNULL, stderr=log)
      time.sleep(t_kill)
      killed = proc.poll() is None
      if killed:
        proc.send_signal(signal.SIGKILL)
      proc.wait()
    with open(log_path) as f:
      stage = stage_at_kill(f.read()) if killed else "finished"
    rerun = subprocess.run(command(workdir), cwd=ROOT, env=env_for(cache),
                           capture_output=True, text=True)
    if rerun.returncode != 0:
      result = {"identical": False, "error": rerun.stderr[-2000:]}
    else:
      got = outcome(workdir)
      diff = sorted(k for k in set(got) | set(reference)
                    if got.get(k) != reference.get(k))
      result = {"identical": not diff, "differs": diff}
    trials.append(dict(trial=i, kill_after_s=round(t_kill, 2), killed=killed,
                       stage=stage, **result))
    print(f"trial {i:2d}: kill at {t_kill:5.1f} s ({stage}): "
          f"{'identical' if result['identical'] else 'DIFFERENT'}",
          flush=True)
  summary = {"reference_wall_s": round(wall, 1), "trials": trials,
             "identical": sum(t["identical"] for t in trials),
             "killed": sum(t["killed"] for t in trials),
             "stages": sorted({t["stage"] for t in trials})}
  with open(args.out, "w") as f:
    json.dump(summary, f, indent=1)
  print(f"{summary['identical']} of {len(trials)} reruns bit-identical "
        f"({summary['killed']} killed; stages hit: {summary['stages']})")
  return 0 if summary["identical"] == len(trials) else 1


if __name__ == "__main__":
  sys.exit(main())
