"""Metrics as JSON lines, a progress line with steps/s and ETA, and plots."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging
import numpy as np


def _jsonable(v: Any) -> Any:
  if isinstance(v, Mapping):
    return {str(k): _jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  if isinstance(v, (np.generic, np.ndarray)):
    return _jsonable(v.tolist())
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file, then rename)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(_jsonable(obj), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


class JsonlWriter:
  """Appends one JSON object per line; `truncate_after` supports resuming."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate_after(self, key: str, value: float) -> None:
    """Drops records with record[key] > value (written after a checkpoint)."""
    records = [r for r in self.read() if r.get(key, -1) <= value]
    tmp = f"{self.path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, self.path)


class Progress:
  """Logs `step i/n, steps/s, ETA` every `every` steps (and at the end)."""

  def __init__(self, name: str, total_steps: int, done_steps: int = 0,
               every: int = 100):
    self.name, self.total, self.every = name, total_steps, max(1, every)
    self.done = done_steps
    self._t0, self._n0 = time.perf_counter(), done_steps

  def update(self, step: int, extra: str = "") -> None:
    self.done = step
    if step % self.every and step != self.total:
      return
    dt = time.perf_counter() - self._t0
    rate = (step - self._n0) / dt if dt > 0 else float("nan")
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    logging.info("%s step %d/%d (%.1f%%) %.2f steps/s ETA %s %s", self.name,
                 step, self.total, 100.0 * step / max(1, self.total), rate,
                 format_seconds(eta), extra)


def format_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(round(s))
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def mean_metrics(step_metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Averages per-step scalars; turns `correct/...` counts into accuracies."""
  step_metrics = list(step_metrics)
  if not step_metrics:
    return {}
  keys = step_metrics[0].keys()
  sums = {k: float(np.sum([np.asarray(m[k], np.float64) for m in step_metrics]))
          for k in keys}
  return summarize_counts(sums, len(step_metrics))


def summarize_counts(sums: Mapping[str, float], steps: int) -> dict[str, float]:
  """Turns summed per-batch values into rates: `correct/<head>` counts into
  `accuracy/<head>`, `abs_err/<head>` into `mae/<head>`, other per-sample
  sums `psum/<name>` into means `<name>`, the per-bin sums
  `ece_bins/<head>/{correct,conf}/<b>` into the expected calibration error
  `ece/<head>` (see `g2d_jax.calibration`); anything else is a per-step
  scalar averaged over `steps`."""
  out = {}
  count = sums.get("count", 0.0)
  gaps: dict[str, dict[str, dict[str, float]]] = {}
  for k, v in sums.items():
    if k == "count":
      continue
    if k.startswith("ece_bins/"):
      head, stat, b = k[len("ece_bins/"):].rsplit("/", 2)
      gaps.setdefault(head, {}).setdefault(b, {})[stat] = v
    elif k.startswith("correct/"):
      out["accuracy/" + k[len("correct/"):]] = v / count if count else 0.0
    elif k.startswith("abs_err/"):
      out["mae/" + k[len("abs_err/"):]] = v / count if count else 0.0
    elif k.startswith("psum/"):
      out[k[len("psum/"):]] = v / count if count else 0.0
    else:
      out[k] = v / steps
  for head, bins in gaps.items():
    gap = sum(abs(b.get("correct", 0.0) - b.get("conf", 0.0))
              for b in bins.values())
    out["ece/" + head] = gap / count if count else 0.0
  return out


def plot_curves(records: list[Mapping[str, Any]], path: str, title: str,
                groups: Mapping[str, str]) -> str | None:
  """One PNG with a panel per metric prefix in `groups` ({prefix: ylabel}).

  Each panel draws every record key starting with the prefix against epoch.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [(p, y) for p, y in groups.items()
            if any(k.startswith(p) for r in records for k in r)]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6),
                           squeeze=False)
  for ax, (prefix, ylabel) in zip(axes[0], panels):
    keys = sorted({k for r in records for k in r if k.startswith(prefix)})
    for k in keys:
      pts = [(r["epoch"], r[k]) for r in records if k in r]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
              label=k[len(prefix):].strip("/") or k)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path
