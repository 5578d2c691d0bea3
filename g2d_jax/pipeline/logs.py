"""A run's log files: JSON lines (`metrics.jsonl`, `steps.jsonl`) and plots."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from g2d_jax import artifacts


class JsonlWriter:
  """Appends one JSON object per line; `truncate_after` supports resuming."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(artifacts.to_jsonable(record), sort_keys=True) + "\n")

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate_after(self, key: str, value: float) -> None:
    """Drops records with record[key] > value (written after a checkpoint)."""
    records = [r for r in self.read() if r.get(key, -1) <= value]

    def write(tmp: str) -> None:
      with open(tmp, "w") as f:
        for r in records:
          f.write(json.dumps(r, sort_keys=True) + "\n")

    artifacts.replace_file(self.path, write)


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
  artifacts.replace_file(path, lambda tmp: fig.savefig(tmp, dpi=110))
  plt.close(fig)
  return path
