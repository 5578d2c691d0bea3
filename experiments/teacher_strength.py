r"""Teacher strength: how much do stronger teachers give G2D and UMT?

For each teacher length in `--teacher_epochs`, trains the unimodal teachers
for that many epochs (`--config.teacher.epochs=E`, one runs directory per
length, so the caches never mix), then each method of `--methods` at its
release default on `--seed`, and reports the teachers' test accuracy and
confidence (mean true-class probability on the test split) next to the
student's fused test accuracy and ECE before and after temperature scaling.
Finished runs are reused, like the leaderboard's.

  # AV-MNIST quick, teachers of 4, 12 and 24 epochs, seed 0 (about 1.5 h
  # on 2 cores)
  G2D_DATA_DIR=../shared/data python experiments/teacher_strength.py \
      --config=configs/avmnist.py:quick --teacher_epochs=4,12,24 \
      --students=g2d,umt --out=runs/teacher_strength --parallel=2 --pin

A length equal to the config's own `teacher.epochs` can reuse the
leaderboard's runs of the same protocol: `--default_runs_root` (its
`--runs_root`; run names are the leaderboard's, `<protocol>_<method>_t0`),
or `--bank` (the leaderboard's bank; other lengths are banked in its
`teacher<E>/` folders).

Writes `<out>/teacher_strength.json`, `.md` and `.png` (student accuracy
and ECE against the teachers' mean confidence, a line per method).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import leaderboard as lb  # noqa: E402  pylint: disable=g-import-not-at-top
from g2d_jax import methods  # noqa: E402  pylint: disable=g-import-not-at-top
from g2d_jax.errors import ConfigError  # noqa: E402  pylint: disable=g-import-not-at-top

# pylint: disable=protected-access

# --config, --protocol, --out, --runs_root, --parallel, --pin and --timeout
# are the leaderboard's flags (imported with it); these are this script's.
_EPOCHS = flags.DEFINE_string("teacher_epochs", "4,12,24",
                              "comma-separated teacher lengths (epochs)")
_STUDENTS = flags.DEFINE_string("students", "g2d,umt",
                                "comma-separated methods that use teachers")
_SEED = flags.DEFINE_integer("seed", 0, "the seed of every run")
_DEFAULT_ROOT = flags.DEFINE_string(
    "default_runs_root", None, "a leaderboard's --runs_root, reused for the "
    "config's own teacher length")


def parse_epochs(spec: str) -> list[int]:
  """'4,12,24' -> [4, 12, 24]; ConfigError on anything else."""
  try:
    epochs = [int(x) for x in spec.split(",") if x.strip()]
  except ValueError:
    epochs = []
  if not epochs or min(epochs) < 1 or len(set(epochs)) != len(epochs):
    raise ConfigError(f"--teacher_epochs={spec!r}: give distinct whole "
                      "numbers >= 1, e.g. --teacher_epochs=4,12,24.")
  return epochs


def parse_methods(spec: str) -> list[str]:
  """The methods to run (`--students`)."""
  names = [m.strip() for m in spec.split(",") if m.strip()]
  known = set(methods.available())
  bad = [m for m in names if m not in known]
  if bad or not names:
    raise ConfigError(f"--students={spec!r}: unknown {bad}; choose from "
                      f"{sorted(known)}.")
  return names


def teacher_row(summary: Mapping[str, Any]) -> dict[str, Any]:
  """The teachers' test accuracy (%) and mean true-class probability."""
  teachers = summary["teachers"]
  acc = {m: 100.0 * t["test_accuracy"] for m, t in teachers.items()}
  conf = {m: t["test_true_class_prob"] for m, t in teachers.items()}
  return {"accuracy": acc, "confidence": conf,
          "mean_confidence": sum(conf.values()) / len(conf)}


def collect(epochs: Sequence[int], names: Sequence[str],
            summaries: Mapping[tuple[int, str], Mapping[str, Any]]
            ) -> list[dict[str, Any]]:
  """One row per (teacher length, method), from the run summaries."""
  rows = []
  for e in epochs:
    for m in names:
      summary = summaries[(e, m)]
      s = lb.scores(summary, m)
      rows.append({"teacher_epochs": e, "method": m,
                   "teachers": teacher_row(summary), "test": s["test"],
                   "modality": s["modality"], "ece": s["ece"],
                   "ece_calibrated": s["ece_calibrated"]})
  return rows


def _pct(v: float | None) -> str:
  return "-" if v is None else f"{100 * v:.1f}"


def write_report(out: str, rows: Sequence[Mapping[str, Any]],
                 meta: Mapping[str, Any]) -> None:
  """teacher_strength.{json,md,png} in `out`, each written whole."""
  os.makedirs(out, exist_ok=True)
  modalities = sorted(rows[0]["teachers"]["accuracy"])
  lines = [f"# Teacher strength ({meta['config']}, seed {meta['seed']}, "
           f"protocol {meta['protocol']})", "", f"`{meta['command']}`", "",
           "| teacher epochs | method | " + " | ".join(
               f"teacher {m} acc / conf" for m in modalities) +
           " | fused test acc | " + " | ".join(
               f"{m} head" for m in modalities) + " | ECE % | ECE % (T) |",
           "|" + "---|" * (5 + 2 * len(modalities))]
  for r in rows:
    t = r["teachers"]
    lines.append(
        f"| {r['teacher_epochs']} | {r['method']} | " + " | ".join(
            f"{t['accuracy'][m]:.1f} / {t['confidence'][m]:.3f}"
            for m in modalities) + f" | {r['test']:.2f} | " + " | ".join(
                f"{r['modality'][m]:.1f}" for m in modalities) +
        f" | {_pct(r['ece'])} | {_pct(r['ece_calibrated'])} |")
  files = {"teacher_strength.md": "\n".join(lines) + "\n",
           "teacher_strength.json": json.dumps(
               {"meta": dict(meta), "rows": list(rows)}, indent=1) + "\n"}
  for name, text in files.items():
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))
  plot(os.path.join(out, "teacher_strength.png"), rows)


def plot(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_acc, ax_ece) = plt.subplots(1, 2, figsize=(9, 3.6))
  for m in dict.fromkeys(r["method"] for r in rows):
    mine = sorted((r for r in rows if r["method"] == m),
                  key=lambda r: r["teachers"]["mean_confidence"])
    x = [r["teachers"]["mean_confidence"] for r in mine]
    ax_acc.plot(x, [r["test"] for r in mine], "o-", label=m)
    for r, xi in zip(mine, x):
      ax_acc.annotate(f"{r['teacher_epochs']} ep", (xi, r["test"]),
                      fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax_ece.plot(x, [100 * (r["ece"] or 0) for r in mine], "o-",
                label=f"{m}, raw")
    ax_ece.plot(x, [100 * (r["ece_calibrated"] or 0) for r in mine], "s--",
                label=f"{m}, temperature-scaled")
  ax_acc.set(xlabel="teachers' mean test true-class probability",
             ylabel="fused test accuracy (%)")
  ax_ece.set(xlabel="teachers' mean test true-class probability",
             ylabel="fused test ECE (%)")
  ax_acc.legend(fontsize=8)
  ax_ece.legend(fontsize=7)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def bank_dir(bank: str | None, epochs: int, default: int) -> str | None:
  """Where runs with `epochs`-epoch teachers are banked: the leaderboard's
  own bank for the config's teacher length (its runs are the same), a
  folder of it per other length."""
  if not bank:
    return None
  bank = os.path.abspath(bank)
  return bank if epochs == default else os.path.join(bank,
                                                     f"teacher{epochs}")


def main(argv):
  del argv
  try:
    epochs = parse_epochs(_EPOCHS.value)
    names = parse_methods(_STUDENTS.value)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  out = os.path.abspath(lb._OUT.value)
  root = os.path.abspath(lb._RUNS_ROOT.value or os.path.join(out, "runs"))
  default = lb.load_config(lb._CONFIG.value).teacher.epochs
  summaries = {}
  for e in epochs:
    reuse = _DEFAULT_ROOT.value if e == default else None
    runner = lb.Runner(
        lb._CONFIG.value, os.path.abspath(reuse) if reuse else
        os.path.join(root, f"teacher{e}"), lb._PROTOCOL.value,
        [f"teacher.epochs={e}"], lb._PARALLEL.value, lb._PIN.value,
        lb._TIMEOUT.value, bank_dir(lb._BANK.value, e, default))
    runner.total = len(names)
    got = runner.map(lambda m, r=runner: r.student(_SEED.value, m, 0, {}),
                     names)
    summaries.update({(e, m): s for m, s in zip(names, got)})
  rows = collect(epochs, names, summaries)
  write_report(out, rows, {
      "config": lb._CONFIG.value, "seed": _SEED.value,
      "protocol": lb._PROTOCOL.value, "teacher_epochs": epochs,
      "command": " ".join(["python experiments/teacher_strength.py",
                           *sys.argv[1:]])})
  print(f"wrote {out}/teacher_strength.md")


if __name__ == "__main__":
  flags.FLAGS.set_default("config", "configs/avmnist.py:quick")
  app.run(main)
