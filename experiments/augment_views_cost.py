r"""What training views cost: student epoch time and cache size of the
CREMA-D smoke preset with `data.augment_views` K = 1 and K = 4.

  python experiments/augment_views_cost.py --data_dir=/tmp/e2e/data \
      --set=g2d.beta=0 \
      --out=experiments/results/augment_views_cost.json

`--data_dir` holds a prepared `cremad/` folder (e.g. the synthetic fixture
of experiments/README.md, "Raw-data preparation"). Each K runs the whole
smoke job in its own process (`--config.student.epochs`, default 8) with
its own data cache; an epoch's time is the gap between consecutive "student
epoch N" log lines (its training steps and its validation pass), and the
first two epochs (compilation) are left out. K runs alternate, `--repeats`
times.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EPOCH = re.compile(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*student epoch (\d+):")


def du(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      total += os.path.getsize(os.path.join(root, f))
  return total


def one_run(data_dir: str, k: int, epochs: int, tmp: str,
            overrides: list[str] = ()) -> dict:
  env = dict(os.environ, G2D_DATA_DIR=data_dir,
             G2D_CACHE_DIR=os.path.join(tmp, f"cache{k}"))
  env.pop("XLA_FLAGS", None)
  work = os.path.join(tmp, f"w{k}")
  shutil.rmtree(work, ignore_errors=True)
  proc = subprocess.run(
      [sys.executable, "-m", "g2d_jax.main",
       f"--config={ROOT}/configs/cremad.py:smoke", f"--workdir={work}",
       f"--config.data.augment_views={k}",
       f"--config.student.epochs={epochs}",
       *[f"--config.{o}" for o in overrides]],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
  if proc.returncode:
    raise SystemExit(proc.stderr[-3000:])
  ends = []
  for line in proc.stderr.splitlines():
    m = EPOCH.match(line)
    if m:
      h, mi, s, _ = m.groups()
      ends.append(int(h) * 3600 + int(mi) * 60 + float(s))
  gaps = [b - a for a, b in zip(ends, ends[1:])][1:]   # epochs 2..E-1
  manifest = json.load(open(os.path.join(work, "teacher_cache",
                                         "manifest.json")))
  return {"epoch_seconds": gaps,
          "data_cache_bytes": du(os.path.join(tmp, f"cache{k}")),
          "teacher_cache_bytes": du(os.path.join(work, "teacher_cache")),
          "train_rows": manifest["splits"]["train"]}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--data_dir", required=True)
  p.add_argument("--views", default="1,4")
  p.add_argument("--epochs", type=int, default=8)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default="")
  p.add_argument("--set", action="append", default=[],
                 help="FIELD=VALUE for every run's config (repeatable)")
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="views_cost-")
  runs: dict[int, list[dict]] = {}
  try:
    for rep in range(args.repeats):
      for k in map(int, args.views.split(",")):
        r = one_run(args.data_dir, k, args.epochs, tmp, args.set)
        runs.setdefault(k, []).append(r)
        print(f"repeat {rep} K={k}: epoch median "
              f"{statistics.median(r['epoch_seconds']):.3f} s, data cache "
              f"{r['data_cache_bytes'] / 1e6:.1f} MB", file=sys.stderr)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  report: dict = {"settings": {"epochs": args.epochs, "set": args.set,
                               "repeats": args.repeats}}
  for k, rs in runs.items():
    gaps = [g for r in rs for g in r["epoch_seconds"]]
    report[k] = {"epoch_seconds_median": statistics.median(gaps),
                 "epoch_seconds": gaps,
                 "data_cache_bytes": rs[0]["data_cache_bytes"],
                 "teacher_cache_bytes": rs[0]["teacher_cache_bytes"],
                 "train_rows": rs[0]["train_rows"]}
  ks = sorted(runs)
  base = report[ks[0]]
  for k in ks[1:]:
    report[k]["epoch_ratio"] = (report[k]["epoch_seconds_median"]
                                / base["epoch_seconds_median"])
    report[k]["data_cache_ratio"] = (report[k]["data_cache_bytes"]
                                     / base["data_cache_bytes"])
  print(json.dumps(report, indent=2))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
