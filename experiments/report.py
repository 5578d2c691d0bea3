r"""The paper's AV-MNIST analyses as figures, rebuilt from saved suite runs.

Reads the runs of `experiments/avmnist_suite.py` (`<root>/seed<S>/`) and
writes PNGs to `--out_dir` (default experiments/figures):

  fig1_accuracy_curves.png   per-modality and fused test accuracy by epoch,
                             joint vs G2D (the paper's Fig. 1; mean and range
                             over seeds; test is never used for selection)
  fig3_teacher_confidence.png teacher confidence per modality over the
                             training batches of the G2D run (Fig. 3), with
                             which modality SMP trains
  fig4_modality_gap.png      2-D PCA of the student's per-modality features
                             on test samples, joint vs G2D (Fig. 4), with the
                             centroid distance of the L2-normalised features
  fig5_feature_alignment.png cosine similarity of student and teacher
                             features per modality by epoch (Fig. 5)
  fig6_confidence_ratio.png  the weak modality's confidence inside the
                             student over its teacher's, by epoch (Fig. 6)

  python experiments/report.py --root=runs/suite --seeds=0,1,2

It also prints the numbers behind each figure (final-epoch values).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_ROOT = flags.DEFINE_string("root", "runs/suite", "Suite directory.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to include.")
_OUT = flags.DEFINE_string("out_dir", os.path.join(ROOT, "experiments",
                                                   "figures"), "PNG folder.")
_JOINT = flags.DEFINE_string("joint_run", "joint", "The joint-training run.")
_G2D = flags.DEFINE_string("g2d_run", "g2d", "The G2D run.")
_GAP_SAMPLES = flags.DEFINE_integer("gap_samples", 1000,
                                    "Test samples in the modality-gap plot.")


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt



def _style(ax):
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def _save(plt, fig, out):
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def _jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _workdirs(root: str, seeds) -> list[str]:
  return [os.path.join(root, f"seed{s}") for s in seeds
          if os.path.isdir(os.path.join(root, f"seed{s}"))]


def history(workdir: str, run: str) -> list[dict]:
  return _jsonl(os.path.join(workdir, f"student_{run}", "metrics.jsonl"))


def curve(workdirs, run: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, [seeds, epochs] values) of one metric; NaN where missing."""
  hs = [history(w, run) for w in workdirs]
  hs = [h for h in hs if h]
  if not hs:
    return np.array([]), np.zeros((0, 0))
  epochs = sorted({r["epoch"] for h in hs for r in h})
  vals = np.full((len(hs), len(epochs)), np.nan)
  for i, h in enumerate(hs):
    for r in h:
      if key in r:
        vals[i, epochs.index(r["epoch"])] = r[key]
  return np.array(epochs), vals


def teacher_val(workdir: str, m: str, key: str) -> float | None:
  path = os.path.join(workdir, "teachers", m, "done.json")
  if not os.path.exists(path):
    return None
  return json.load(open(path))["best"]["val"].get(key)


def _band(ax, x, vals, label, **kw):
  if vals.size == 0:
    return
  mean = np.nanmean(vals, 0)
  line, = ax.plot(x, mean, marker=".", label=label, **kw)
  if vals.shape[0] > 1:
    ax.fill_between(x, np.nanmin(vals, 0), np.nanmax(vals, 0),
                    color=line.get_color(), alpha=0.15)


def modalities_of(workdirs, run) -> list[str]:
  for w in workdirs:
    path = os.path.join(w, f"summary_{run}.json")
    if os.path.exists(path):
      return json.load(open(path))["modalities"]
  return ["audio", "image"]


def weak_modality(workdirs, mods) -> str:
  """The modality whose teacher has the lower validation accuracy."""
  acc = {m: np.nanmean([teacher_val(w, m, "accuracy/fused") or np.nan
                        for w in workdirs]) for m in mods}
  return min(acc, key=acc.get)


def fig1(workdirs, runs, mods, out):
  plt = _plt()
  fig, axes = plt.subplots(1, len(mods) + 1, figsize=(4.2 * (len(mods) + 1),
                                                      3.4), squeeze=False)
  heads = [("fused", "test/accuracy/fused")] + [
      (m, f"test/accuracy/modality/{m}") for m in mods]
  print("Fig. 1 (final-epoch test accuracy, mean over seeds):")
  for ax, (name, key) in zip(axes[0], heads):
    for run in runs:
      x, v = curve(workdirs, run, key)
      _band(ax, x, 100 * v, run)
      if v.size:
        print(f"  {run:8s} {name:6s} {100 * np.nanmean(v[:, -1]):.2f}")
    if name != "fused":
      t = [teacher_val(w, name, "accuracy/fused") for w in workdirs]
      t = [x for x in t if x is not None]
      if t:
        ax.axhline(100 * np.mean(t), color="gray", ls="--",
                   label=f"{name} teacher (val)")
    ax.set_title(f"{name} accuracy (test)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("%")
    _style(ax)
  _save(plt, fig, out)


def fig3(workdirs, run, mods, out):
  plt = _plt()
  steps = _jsonl(os.path.join(workdirs[0], f"student_{run}", "steps.jsonl"))
  if not steps or f"confidence/{mods[0]}" not in steps[0]:
    print(f"Fig. 3: no per-step teacher confidence in {workdirs[0]}/"
          f"student_{run} (SMP off?); skipped")
    return
  fig, ax = plt.subplots(figsize=(8, 3.4))
  x = np.array([s["step"] for s in steps])
  w = max(1, len(steps) // 200)
  for m in mods:
    v = np.array([s[f"confidence/{m}"] for s in steps])
    smooth = np.convolve(v, np.ones(w) / w, mode="valid")
    ax.plot(x[:len(smooth)], smooth, label=f"{m} teacher")
    k = np.array([s[f"kappa/{m}"] for s in steps])
    total = np.array([sum(s[f"kappa/{n}"] for n in mods) for s in steps])
    alone = (k > 0) & (total < len(mods))
    ax.fill_between(x, 0, 0.04, where=alone, step="mid", alpha=0.4,
                    label=f"SMP trains {m} alone")
    print(f"Fig. 3: {m} teacher confidence on training batches: mean "
          f"{v.mean():.3f}; SMP trains {m} alone on "
          f"{np.mean(alone):.1%} of the steps")
  ax.set_xlabel("training step")
  ax.set_ylabel("teacher confidence (Eq. 5)")
  ax.set_ylim(0, 1)
  _style(ax)
  ax.set_title(f"teacher confidence per training batch ({run}, moving "
               f"average of {w})")
  _save(plt, fig, out)


def fig5(workdirs, runs, mods, out):
  plt = _plt()
  fig, axes = plt.subplots(1, len(mods), figsize=(4.5 * len(mods), 3.4),
                           squeeze=False)
  print("Fig. 5 (final-epoch val cosine student vs teacher features):")
  for ax, m in zip(axes[0], mods):
    for run in runs:
      x, v = curve(workdirs, run, f"val/cosine/{m}")
      _band(ax, x, v, run)
      if v.size:
        print(f"  {run:8s} {m:6s} {np.nanmean(v[:, -1]):.3f}")
    ax.set_title(f"{m}: cosine(student, teacher) on val")
    ax.set_xlabel("epoch")
    _style(ax)
  _save(plt, fig, out)


def fig6(workdirs, runs, weak, out):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.4))
  print(f"Fig. 6 (weak modality {weak}: student/teacher confidence on val):")
  for run in runs:
    x, v = curve(workdirs, run, f"val/true_class_prob/modality/{weak}")
    if not v.size:
      continue
    t = np.array([[teacher_val(w, weak, "true_class_prob/fused") or np.nan]
                  for w in workdirs if history(w, run)])
    ratio = v / t
    _band(ax, x, ratio, run)
    print(f"  {run:8s} {np.nanmean(ratio[:, -1]):.3f}")
  ax.axhline(1.0, color="gray", ls="--")
  ax.set_title(f"confidence ratio of {weak} (student / teacher)")
  ax.set_xlabel("epoch")
  _style(ax)
  _save(plt, fig, out)


def student_features(workdir: str, run: str, n: int):
  """{m: [n, D]} pooled features of the best student on the first n test
  samples, from the run's own config (summary_<run>.json)."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from g2d_jax import data  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import steps  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import student as student_lib  # pylint: disable=g-import-not-at-top
  summary = json.load(open(os.path.join(workdir, f"summary_{run}.json")))
  cfg = ml_collections.ConfigDict(summary["config"])
  ds = data.load_dataset(cfg.data)
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  student, weights, _ = student_lib.load_student(cfg, ds, workdir, mesh)
  test = ds.splits["test"]
  x = test.batch(np.arange(min(n, len(test))))
  out, _ = steps.apply_model(student.model, weights["params"],
                             weights["batch_stats"],
                             {m: x[m] for m in ds.modalities}, train=False)
  return {m: np.asarray(v, np.float64) for m, v in out.features.items()}


def fig4(workdirs, runs, out, n):
  plt = _plt()
  fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4),
                           squeeze=False)
  print("Fig. 4 (modality gap: distance of the centroids of the "
        "L2-normalised features, seed of the first workdir):")
  for ax, run in zip(axes[0], runs):
    if not os.path.exists(os.path.join(workdirs[0], f"summary_{run}.json")):
      continue
    feats = student_features(workdirs[0], run, n)
    dims = {v.shape[1] for v in feats.values()}
    if len(dims) != 1:
      print(f"  {run}: feature sizes differ {dims}; no common space")
      continue
    unit = {m: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True),
                              1e-12) for m, v in feats.items()}
    allv = np.concatenate(list(unit.values()))
    mu = allv.mean(0)
    _, _, vt = np.linalg.svd(allv - mu, full_matrices=False)
    mods = list(unit)
    gap = float(np.linalg.norm(unit[mods[0]].mean(0) - unit[mods[1]].mean(0)))
    for m, v in unit.items():
      p = (v - mu) @ vt[:2].T
      ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.4, label=m)
    ax.set_title(f"{run}: gap {gap:.3f}")
    ax.legend(markerscale=4, fontsize=8)
    print(f"  {run:8s} {gap:.3f}")
  _save(plt, fig, out)


def main(argv):
  del argv
  workdirs = _workdirs(os.path.abspath(_ROOT.value), _SEEDS.value)
  if not workdirs:
    raise SystemExit(f"error: no seed<S> folders under {_ROOT.value}; run "
                     "experiments/avmnist_suite.py first.")
  os.makedirs(_OUT.value, exist_ok=True)
  runs = [_JOINT.value, _G2D.value]
  mods = modalities_of(workdirs, _G2D.value)
  weak = weak_modality(workdirs, mods)
  fig1(workdirs, runs, mods, os.path.join(_OUT.value,
                                          "fig1_accuracy_curves.png"))
  fig3(workdirs, _G2D.value, mods,
       os.path.join(_OUT.value, "fig3_teacher_confidence.png"))
  fig5(workdirs, runs, mods,
       os.path.join(_OUT.value, "fig5_feature_alignment.png"))
  fig6(workdirs, runs, weak, os.path.join(_OUT.value,
                                          "fig6_confidence_ratio.png"))
  fig4(workdirs, runs, os.path.join(_OUT.value, "fig4_modality_gap.png"),
       _GAP_SAMPLES.value)
  print(f"figures in {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
