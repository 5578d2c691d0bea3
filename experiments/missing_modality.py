r"""Missing-modality robustness of trained students (the paper's Table 11).

Re-runs the evaluation stage of finished students with every modality
missing at random at each rate (`config.eval.missing_rates`; a fixed seed,
at least one modality kept per sample; a missing modality's features are
zeros and late fusion averages the present modalities' logits: see
`g2d_jax.pipeline.evaluate.missing_modality_pattern`), then prints and writes
the table. Each student must be trained and evaluated already in
`--workdir` (run name `<run>`, summary `summary_<run>.json`, whose config
is reused exactly).

  G2D_DATA_DIR=../shared/data python experiments/missing_modality.py \
      --workdir=runs/mfeat3 --runs=joint,g2d \
      --out=experiments/results/missing_mfeat3.json
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from g2d_jax.pipeline import run as run_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the students.")
_RUNS = flags.DEFINE_list("runs", ["joint", "g2d"],
                          "run_name of each student ('' = the default one).")
_RATES = flags.DEFINE_list("rates", ["0", "0.2", "0.4", "0.6"],
                           "Missing rates.")
_OUT = flags.DEFINE_string("out", "", "Write the results (JSON) here.")


def main(argv):
  del argv
  rates = tuple(float(r) for r in _RATES.value)
  results = {}
  for name in _RUNS.value:
    path = os.path.join(_WORKDIR.value, f"summary_{name}.json" if name
                        else "summary.json")
    if not os.path.exists(path):
      raise SystemExit(f"error: {path} is missing; train and evaluate the "
                       f"student first (--config.run_name={name}).")
    with open(path) as f:
      cfg = ml_collections.ConfigDict(json.load(f)["config"])
    cfg.eval.missing_rates = rates
    summary = run_lib.run(cfg, _WORKDIR.value, mode="eval")["eval"]
    results[name] = summary["student"]["missing_modality"]
  kind = next(k for k in next(iter(next(iter(results.values())).values()))
              if k.startswith("test_"))
  lines = ["| missing rate | " + " | ".join(results) + " |",
           "|---|" + "---|" * len(results)]
  for r in rates:
    key = f"{r:g}"
    lines.append(f"| {100 * r:.0f}% | " + " | ".join(
        f"{100 * results[n][key][kind]:.2f}" for n in results) + " |")
  table = "\n".join(lines)
  print(f"{kind} with modalities missing at random:\n{table}")
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump({"rates": rates, "results": results, "table": table}, f,
                indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
