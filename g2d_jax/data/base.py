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

import ml_collections

from g2d_jax import artifacts
from g2d_jax import errors
from g2d_jax.data import media

SPLIT_NAMES = ("train", "val", "test")
TASKS = ("classification", "regression")
# How a loader keeps prepared samples: "cache" (built once, memory-mapped;
# `data.materialize`) or "on_demand" (computed when read). Same values.
STORAGES = ("cache", "on_demand")

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
    views: augmented views per sample (`data.augment_views`, training
      splits of clip datasets): row `i * views + v` is view v of sample i,
      so `len(split)` counts rows and `num_samples` samples. Training
      batches read one view per sample and epoch
      (`pipeline.loader.train_batches`); a pass over all rows (teacher
      outputs) covers every view.
  """

  inputs: dict[str, np.ndarray]
  labels: np.ndarray
  scales: dict[str, float]
  views: int = 1

  def __post_init__(self):
    n = len(self.labels)
    if self.views < 1 or n % self.views:
      raise errors.DataError(
          f"a split with {self.views} views needs a multiple of {self.views}"
          f" rows, got {n}")
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

  @property
  def num_samples(self) -> int:
    """Samples (rows / views): what one training epoch visits."""
    return len(self) // self.views

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
      "settings": artifacts.to_jsonable(settings),
      "split_sizes": {s: len(splits[s]) for s in SPLIT_NAMES},
      "label_sha256": {
          s: label_sha256(splits[s].labels, task) for s in SPLIT_NAMES},
  }


# Fields of a user dataset's config (`user_data_config`) that say where the
# data is and how it is kept, not what the samples are.
LOCATION_FIELDS = ("name", "data_dir", "subdir", "cache_dir", "storage",
                   "build_threads")


def user_data_config(name: str, *, val_fraction: float | None = None
                     ) -> ml_collections.ConfigDict:
  """The fields every loader of a user-provided dataset (CREMA-D, VGGSound,
  MIS-ME) has; the loader adds its own after them."""
  cfg = ml_collections.ConfigDict()
  cfg.name = name
  # Folder holding `subdir`; empty means the G2D_DATA_DIR variable.
  cfg.data_dir = ""
  cfg.subdir = name
  # "cache": build once into a memory-mapped cache; "on_demand": compute a
  # sample when it is read. Both give identical values.
  cfg.storage = "cache"
  # Root of the built-array cache; empty means $G2D_CACHE_DIR, else
  # ~/.cache/g2d_jax.
  cfg.cache_dir = ""
  # Threads used to build the cache (0: min(8, CPU count)); speed only.
  cfg.build_threads = 0
  if val_fraction is not None:
    # Validation = this fraction of each class's kept training rows.
    cfg.val_fraction = val_fraction
    cfg.val_seed = 0
  # If > 0, keep only the first N samples of each split (tests, smoke runs).
  cfg.max_examples_per_split = 0
  return cfg


def build_settings(cfg, exclude: tuple[str, ...] = ("name",),
                   recipe_version: int | None = None) -> dict[str, Any]:
  """Every setting of a data config that changes the samples (JSON-able):
  all fields but `exclude` (paths, storage, threads, ...), plus the
  loader's recipe version, which a loader bumps whenever its code changes
  the built bytes, so stale caches are rebuilt."""
  settings = {k: artifacts.to_jsonable(v) for k, v in cfg.items()
              if k not in exclude}
  if recipe_version is not None:
    settings["recipe_version"] = recipe_version
  return settings


def default_data_dir() -> str:
  """Where the data lives when neither the config nor G2D_DATA_DIR says:
  `$XDG_DATA_HOME/g2d_jax`, else `~/.local/share/g2d_jax` (where
  `python -m g2d_jax.data.download` puts it by default)."""
  root = os.environ.get("XDG_DATA_HOME") or os.path.join(
      os.path.expanduser("~"), ".local", "share")
  return os.path.join(root, "g2d_jax")


def fetch_hint(data_dir: str) -> str:
  """One line on getting the data into `data_dir`."""
  return (f"fetch MNIST and FSDD with `python -m g2d_jax.data.download "
          f"--dest {data_dir}`; AV-MNIST's Speech Commands noise ships only "
          "inside the 2.3 GB speech_commands_v0.02.tar.gz: `curl -LO "
          "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz "
          f"&& python -m g2d_jax.data.download --dest {data_dir} --what= "
          "--speech_commands_archive speech_commands_v0.02.tar.gz`")


def resolve_data_dir(data_dir: str, required: tuple[str, ...] = ()) -> str:
  """Returns the data directory: the config's, else `G2D_DATA_DIR`'s, else
  `default_data_dir()`.

  Args:
    data_dir: the config value; empty means "use the environment variable"
      (or the default location when that is unset).
    required: sub-paths that must exist below the directory.

  Raises:
    DataError: the directory or a required entry is missing; the message
      says how to fetch the data.
  """
  source = "config.data.data_dir"
  if not data_dir:
    data_dir = os.environ.get(DATA_DIR_ENV, "")
    source = DATA_DIR_ENV
  if not data_dir:
    data_dir = default_data_dir()
    source = (f"the default location, as {DATA_DIR_ENV} and "
              "config.data.data_dir are unset")
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(data_dir):
    raise errors.DataError(
        f"data directory {data_dir} ({source}) does not exist: point"
        f" {DATA_DIR_ENV} or --config.data.data_dir at the folder holding"
        f" mnist/, fsdd/, ..., or {fetch_hint(data_dir)}")
  for sub in required:
    if not os.path.exists(os.path.join(data_dir, sub)):
      raise errors.DataError(
          f"{os.path.join(data_dir, sub)} is missing (data directory from"
          f" {source}): {fetch_hint(data_dir)}; or point {DATA_DIR_ENV} at a"
          f" directory that has {sub}")
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


def resolve_path(root: str, name: str) -> str:
  """`name` if absolute, else `root/name`."""
  return os.path.join(root, os.path.expanduser(name))


def dataset_root(cfg, label: str, contents: str) -> str:
  """`<data_dir>/<subdir>` of a user dataset, checked to exist.

  Args:
    cfg: the data config (`data_dir`, `subdir`).
    label: the dataset's name in messages ("CREMA-D").
    contents: what the folder should hold, for the message.
  """
  root = resolve_path(resolve_data_dir(cfg.data_dir), cfg.subdir)
  if not os.path.isdir(root):
    raise errors.DataError(
        f"{label} folder {root} is missing: put {contents} there, or point"
        " config.data.data_dir / config.data.subdir at your copy")
  return root


def media_folder(root: str, cfg, field: str, label: str) -> str:
  """The folder `config.data.<field>` names (relative to `root`), checked
  to exist; `label` names it in the message ("CREMA-D audio")."""
  folder = resolve_path(root, cfg[field])
  if not os.path.isdir(folder):
    raise errors.DataError(
        f"{label} folder {folder} is missing: set config.data.{field} to the"
        " folder (relative to the dataset folder or absolute)")
  return folder


def file_identity(path: str, root: str) -> str:
  """`relative path|size|mtime_ns` of a source file (for cache keys)."""
  st = os.stat(path)
  return f"{os.path.relpath(path, root)}|{st.st_size}|{st.st_mtime_ns}"


def cap(items, max_examples: int) -> list:
  """The first `max_examples` items (all if 0)."""
  items = list(items)
  return items[:max_examples] if max_examples else items


def carve_validation(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified train/val split of a training list.

  Per class, a permutation seeded by `seed` puts round(fraction * n_class) of
  the class's samples into val.

  Returns:
    (train indices, val indices), each sorted (original order kept).
  """
  rng = np.random.default_rng(seed)
  val = []
  labels = np.asarray(labels)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    val.append(idx[:int(round(fraction * len(idx)))])
  val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
  train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
  return train_idx, val_idx


def check_common_config(cfg) -> None:
  """Validates the storage, split and size fields shared by the loaders of
  user-provided datasets (CREMA-D, VGGSound, MIS-ME)."""
  if cfg.storage not in STORAGES:
    raise errors.ConfigError(
        f"config.data.storage={cfg.storage!r} must be one of {STORAGES}")
  if "val_fraction" in cfg and not 0.0 < cfg.val_fraction < 1.0:
    raise errors.ConfigError(
        f"config.data.val_fraction={cfg.val_fraction} must be in (0, 1): the"
        " validation split is carved out of the training rows")
  if cfg.max_examples_per_split < 0:
    raise errors.ConfigError(
        f"config.data.max_examples_per_split={cfg.max_examples_per_split}"
        " must be >= 0 (0 keeps every sample)")
  if cfg.build_threads < 0:
    raise errors.ConfigError(
        f"config.data.build_threads={cfg.build_threads} must be >= 0")
  if "image_size" in cfg and cfg.image_size < 1:
    raise errors.ConfigError(
        f"config.data.image_size={cfg.image_size} must be >= 1")
  if "stft_pad_mode" in cfg and cfg.stft_pad_mode not in media.PAD_MODES:
    raise errors.ConfigError(
        f"config.data.stft_pad_mode={cfg.stft_pad_mode!r} must be one of"
        f" {media.PAD_MODES} (librosa >= 0.10 pads with zeros, older versions"
        " reflect)")
