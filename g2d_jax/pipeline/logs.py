"""A run's logs: JSON lines (`metrics.jsonl`, `steps.jsonl`, the source of
truth), the same scalars and the curves as TensorBoard event files, and
optionally Weights & Biases; plots."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from g2d_jax import artifacts
from g2d_jax.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_MODES = ("offline", "online", "disabled")


def logging_config() -> ml_collections.ConfigDict:
  """`config.logging`: where a run's metrics go besides metrics.jsonl."""
  return ml_collections.ConfigDict(dict(
      # TensorBoard event files in <stage dir>/tensorboard (tensorboardX).
      tensorboard=True,
      # Weights & Biases (pip install wandb); "offline" needs no account
      # (`wandb sync <dir>` uploads later).
      wandb=False,
      wandb_mode="offline",
      wandb_project="g2d_jax",
  ))


class JsonlWriter:
  """Appends one JSON object per line; `truncate_after` supports resuming."""

  def __init__(self, path: str):
    self.path = path

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(artifacts.to_jsonable(record), sort_keys=True) + "\n")

  def read(self) -> list[dict[str, Any]]:
    """The records; a last line cut short by a kill is dropped (the run
    that resumes replays it)."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        if i + 1 < len(lines) or line.endswith("\n"):
          raise
    return records

  def truncate_after(self, key: str, value: float) -> None:
    """Drops records with record[key] > value (written after a checkpoint)."""
    records = [r for r in self.read() if r.get(key, -1) <= value]

    def write(tmp: str) -> None:
      with open(tmp, "w") as f:
        for r in records:
          f.write(json.dumps(r, sort_keys=True) + "\n")

    artifacts.replace_file(self.path, write)


class MemoryJsonl:
  """A `JsonlWriter` that keeps its records in memory: the logs of a
  process other than 0 in a multi-process job, which writes no files."""

  def __init__(self):
    self.records: list[dict[str, Any]] = []

  def write(self, record: Mapping[str, Any]) -> None:
    self.records.append(json.loads(json.dumps(artifacts.to_jsonable(record))))

  def read(self) -> list[dict[str, Any]]:
    return list(self.records)

  def truncate_after(self, key: str, value: float) -> None:
    self.records = [r for r in self.records if r.get(key, -1) <= value]


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in record.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)
          and k not in ("epoch", "step")}


class RunLog:
  """One training stage's logs (`<directory>/metrics.jsonl`, `steps.jsonl`,
  `tensorboard/`, W&B), written together.

  The JSON lines are what a resumed run truncates and replays; TensorBoard
  is told to drop the events after the resumed step (`purge_step`), so its
  curves have no duplicated steps either.
  """

  def __init__(self, directory: str, name: str,
               config: ml_collections.ConfigDict | None = None,
               resume_step: int = 0, write: bool = True):
    """`write=False` keeps the records in memory and writes nothing (the
    processes other than 0 of a multi-process job)."""
    cfg = config if config is not None else logging_config()
    self.epochs: JsonlWriter | MemoryJsonl
    self.steps: JsonlWriter | MemoryJsonl
    self._tb = self._wandb = None
    if not write:
      self.epochs, self.steps = MemoryJsonl(), MemoryJsonl()
      return
    self.epochs = JsonlWriter(os.path.join(directory, "metrics.jsonl"))
    self.steps = JsonlWriter(os.path.join(directory, "steps.jsonl"))
    if cfg.tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # Events after the resumed step are dropped from the earlier files.
      # A unique file per writer: the default name has one-second resolution
      # and a quick rerun would overwrite the killed run's events.
      self._tb = SummaryWriter(os.path.join(directory, TENSORBOARD_DIR),
                               purge_step=resume_step + 1 if resume_step
                               else None,
                               filename_suffix=f".{os.getpid()}.{time.time_ns()}")
    if cfg.wandb:
      if cfg.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"config.logging.wandb_mode={cfg.wandb_mode!r} "
                          f"must be one of {WANDB_MODES}.")
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise ConfigError("config.logging.wandb=True needs Weights & Biases: "
                          "pip install wandb (or leave it False).") from None
      self._wandb = wandb.init(project=cfg.wandb_project, name=name,
                               dir=directory, mode=cfg.wandb_mode,
                               reinit="finish_previous")

  def step(self, record: Mapping[str, Any]) -> None:
    """A per-step record `{"step": s, "loss": ..., "kappa/<m>": ...}`."""
    self.steps.write(record)
    scalars = _scalars(record)
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"step/{k}", v, record["step"])
    if self._wandb is not None:
      self._wandb.log({f"step/{k}": v for k, v in scalars.items()},
                      step=record["step"])

  def epoch(self, record: Mapping[str, Any]) -> None:
    """An epoch record `{"epoch", "step", "train/...", "val/...", ...}`."""
    self.epochs.write(record)
    scalars = _scalars(record)
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, record["step"])
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(dict(scalars, epoch=record["epoch"]),
                      step=record["step"])

  def image(self, tag: str, png_path: str | None, step: int) -> None:
    """A PNG (the stage's curves) as an image at `step`."""
    if png_path is None or not os.path.exists(png_path):
      return
    if self._tb is not None:
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(png_path) as img:
        pixels = np.asarray(img.convert("RGB"))
      self._tb.add_image(tag, pixels, step, dataformats="HWC")
    if self._wandb is not None:
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb.log({tag: wandb.Image(png_path)}, step=step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


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
