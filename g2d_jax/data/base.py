"""Dataset containers and helpers shared by every data source.

A dataset is a `MultimodalDataset` holding three `Split`s. Inputs stay in their
storage dtype (often uint8, often a read-only `np.memmap`) until a batch is
requested, so a 70k-sample AV-MNIST costs page cache, not resident memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np

from g2d_jax import errors

SPLIT_NAMES = ("train", "val", "test")
TASKS = ("classification", "regression")

DATA_DIR_ENV = "G2D_DATA_DIR"
CACHE_DIR_ENV = "G2D_CACHE_DIR"


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: per-modality inputs, labels and the float conversion scales.

  Attributes:
    inputs: modality -> [N, ...] channels-last array in its storage dtype
      (uint8 allowed); may be a read-only `np.memmap`.
    labels: [N] int32 class ids (classification) or float32 in [0, 1]
      (regression).
    scales: modality -> factor; the model input is
      `inputs[m].astype(float32) * scales[m]`.
  """

  inputs: dict[str, np.ndarray]
  labels: np.ndarray
  scales: dict[str, float]

  def __post_init__(self):
    n = len(self.labels)
    if self.labels.ndim != 1:
      raise errors.DataError(
          f"labels must be 1-D, got shape {self.labels.shape}; pass one label"
          " per sample")
    for m, x in self.inputs.items():
      if x.shape[0] != n:
        raise errors.DataError(
            f"modality {m!r} has {x.shape[0]} samples but there are {n}"
            " labels; every modality needs one row per label")
      if m not in self.scales:
        raise errors.DataError(
            f"no scale for modality {m!r}; give scales[{m!r}] (1/255 for uint8"
            " pixels, 1.0 for float features)")

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Gathers samples `idx` as float32 model inputs.

    Args:
      idx: [B] integer sample indices into this split.

    Returns:
      {'index': int32 [B], 'label': [B], m: float32 [B, ...] per modality}.
    """
    idx = np.asarray(idx)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
      raise errors.DataError(
          f"batch indices must be a 1-D integer array, got {idx.dtype}"
          f" {idx.shape}")
    n = len(self)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
      raise errors.DataError(
          f"batch index out of range [0, {n}): min {idx.min()}, max"
          f" {idx.max()}")
    out = {"index": idx.astype(np.int32), "label": np.asarray(self.labels[idx])}
    for m, x in self.inputs.items():
      # Fancy indexing a memmap copies only the requested rows.
      out[m] = np.asarray(x[idx], dtype=np.float32) * np.float32(self.scales[m])
    return out


@dataclasses.dataclass(frozen=True)
class MultimodalDataset:
  """A named dataset with train/val/test splits.

  Attributes:
    name: dataset name, e.g. "avmnist"; synthetic data is always "synthetic".
    modalities: modality names in their meaningful order.
    splits: exactly "train", "val" and "test".
    num_classes: number of classes; 1 for regression.
    task: "classification" or "regression".
    fingerprint: JSON-able identity of the data (name, build settings, split
      sizes, sha256 of each split's labels), used by the teacher-output cache
      manifest to refuse outputs computed on other data.
  """

  name: str
  modalities: tuple[str, ...]
  splits: dict[str, Split]
  num_classes: int
  task: str
  fingerprint: dict

  def __post_init__(self):
    if set(self.splits) != set(SPLIT_NAMES):
      raise errors.DataError(
          f"dataset {self.name!r} has splits {sorted(self.splits)}; it needs"
          f" exactly {list(SPLIT_NAMES)}")
    if self.task not in TASKS:
      raise errors.ConfigError(
          f"task {self.task!r} is not one of {TASKS}")
    for s, split in self.splits.items():
      if tuple(split.inputs) != tuple(self.modalities):
        raise errors.DataError(
            f"split {s!r} has modalities {tuple(split.inputs)}, expected"
            f" {self.modalities} in that order")


def label_sha256(labels: np.ndarray, task: str = "classification") -> str:
  """Hashes labels in a canonical dtype (int32 or float32, little-endian)."""
  dtype = "<i4" if task == "classification" else "<f4"
  return hashlib.sha256(
      np.ascontiguousarray(np.asarray(labels), dtype=dtype).tobytes()
  ).hexdigest()


def make_fingerprint(name: str, settings: dict[str, Any],
                     splits: dict[str, Split], task: str) -> dict:
  """Builds the JSON-able dataset identity stored in downstream manifests."""
  return {
      "dataset": name,
      "settings": to_jsonable(settings),
      "split_sizes": {s: len(splits[s]) for s in SPLIT_NAMES},
      "label_sha256": {
          s: label_sha256(splits[s].labels, task) for s in SPLIT_NAMES},
  }


def to_jsonable(value: Any) -> Any:
  """Converts config values (tuples, ConfigDicts, numpy scalars) for JSON."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def resolve_data_dir(data_dir: str, required: tuple[str, ...] = ()) -> str:
  """Returns the data directory from the config or `G2D_DATA_DIR`.

  Args:
    data_dir: the config value; empty means "use the environment variable".
    required: sub-paths that must exist below the directory.

  Raises:
    DataError: neither is set, the directory or a required entry is missing.
  """
  source = "config.data.data_dir"
  if not data_dir:
    data_dir = os.environ.get(DATA_DIR_ENV, "")
    source = DATA_DIR_ENV
  if not data_dir:
    raise errors.DataError(
        f"{DATA_DIR_ENV} is not set and config.data.data_dir is empty: set"
        f" {DATA_DIR_ENV}=/path/to/data or pass --config.data.data_dir=... (to"
        " fetch the data: python -m g2d_jax.data.download --dest DIR)")
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(data_dir):
    raise errors.DataError(
        f"data directory {data_dir} (from {source}) does not exist: point"
        f" {source} at the folder holding mnist/, fsdd/, ... or fetch it with"
        f" python -m g2d_jax.data.download --dest {data_dir}")
  for sub in required:
    if not os.path.exists(os.path.join(data_dir, sub)):
      raise errors.DataError(
          f"{os.path.join(data_dir, sub)} is missing (data directory from"
          f" {source}): fetch it with python -m g2d_jax.data.download --dest"
          f" {data_dir}, or point {source} at a directory that has {sub}")
  return data_dir


def resolve_cache_dir(cache_dir: str) -> str:
  """Returns the cache root: config, else $G2D_CACHE_DIR, else ~/.cache."""
  cache_dir = (cache_dir or os.environ.get(CACHE_DIR_ENV, "")
               or os.path.join("~", ".cache", "g2d_jax"))
  return os.path.abspath(os.path.expanduser(cache_dir))


def check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
  """Validates class labels and returns them as int32.

  Raises:
    DataError: labels are not integral, not 1-D or outside [0, num_classes).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise errors.DataError(
        f"{what}: labels must have shape [N], got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    if not (np.issubdtype(labels.dtype, np.floating)
            and np.all(np.isfinite(labels))
            and np.all(labels == np.round(labels))):
      raise errors.DataError(
          f"{what}: labels must be integer class ids, got dtype {labels.dtype}"
          " with non-integral values; store class ids 0..C-1")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise errors.DataError(
        f"{what}: labels out of range: found values {int(labels.min())}.."
        f"{int(labels.max())}, expected 0..{num_classes - 1}; check the label"
        " file belongs to this dataset")
  return labels.astype(np.int32)
