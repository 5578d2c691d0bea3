r"""Runs a fixed set of small jobs and records every number of their summaries.

A refactor that should not change behaviour is checked by running this
before and after it and comparing the two records, which must be equal:

  G2D_DATA_DIR=../shared/data python experiments/behaviour_check.py \
      --workdir=runs/behaviour_before --out=/tmp/before.json
  # ... change the code ...
  G2D_DATA_DIR=../shared/data python experiments/behaviour_check.py \
      --workdir=runs/behaviour_after --out=/tmp/after.json \
      --compare=/tmp/before.json

The set: the AV-MNIST `smoke` preset with g2d, joint, mlb and mmpareto
(one workdir, shared teachers), and mfeat's `three_views` preset with g2d and
joint. Recorded: every number under `teachers` and `student` of each
`summary*.json` (accuracies, ECE, confidences, feature cosines, the
validation scores and the best epoch), keyed by its path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

JOBS = (
    ("avmnist_smoke", "configs/avmnist.py:smoke",
     ("g2d", "joint", "mlb", "mmpareto")),
    ("mfeat_three_views", "configs/mfeat.py:three_views", ("g2d", "joint")),
)


def numbers(tree, prefix=""):
  """{path: number} of every int / float leaf (bools excluded)."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(numbers(v, f"{prefix}/{k}" if prefix else str(k)))
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    out[prefix] = tree
  return out


def run_jobs(workdir: str) -> dict[str, float]:
  record = {}
  for name, config, methods in JOBS:
    wd = os.path.join(workdir, name)
    for method in methods:
      cmd = [sys.executable, "-m", "g2d_jax.main", f"--config={config}",
             f"--workdir={wd}", f"--config.method={method}",
             f"--config.run_name={method}"]
      t0 = time.perf_counter()
      subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
      print(f"{name} {method}: {time.perf_counter() - t0:.0f} s", flush=True)
      with open(os.path.join(wd, f"summary_{method}.json")) as f:
        summary = json.load(f)
      for part in ("teachers", "student"):
        for k, v in numbers(summary[part]).items():
          record[f"{name}/{method}/{part}/{k}"] = v
  return record


def compare(before: dict[str, float], after: dict[str, float]) -> int:
  keys = sorted(set(before) | set(after))
  bad = [k for k in keys if before.get(k) != after.get(k)]
  for k in bad:
    print(f"DIFFERS {k}: before {before.get(k)!r} after {after.get(k)!r}")
  print(f"{len(keys) - len(bad)} of {len(keys)} numbers identical")
  return 1 if bad else 0


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--compare", default="",
                 help="an earlier --out file; exit 1 if any number differs")
  args = p.parse_args()
  record = run_jobs(args.workdir)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  if args.compare:
    with open(args.compare) as f:
      return compare(json.load(f), record)
  return 0


if __name__ == "__main__":
  sys.exit(main())
