"""Build-once caches: atomic, locked, manifest-checked, memory-mapped.

Every prepared array the library reads back later (built AV-MNIST, CREMA-D /
VGGSound / MIS-ME samples, the teacher outputs) lives in a directory that is

- built under an advisory lock, so concurrent runs build it once;
- written under a temporary name and renamed into place when complete
  (`artifacts.atomic_directory`), with `manifest.json` written last, so a
  run killed at any instant leaves either no directory or a complete one
  (and a `.tmp-*` leftover that the next build removes);
- accepted only if its manifest declares the expected identity (`build_once`)
  and its arrays have the expected shapes, dtypes and labels (`open_array`,
  `check_labels`); then opened with `mmap_mode="r"`, so a dataset costs page
  cache, not resident memory.

`materialize` builds this for loaders that describe each split as
per-sample readers (`SplitPlan`), or computes samples on demand instead
(`storage="on_demand"`, `LazySamples`); both give identical values.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeGuard

from absl import logging
import numpy as np

from g2d_jax import artifacts
from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.progress import Progress

MANIFEST = "manifest.json"
STORAGES = ("cache", "on_demand")


def read_manifest(directory: str) -> dict[str, Any] | None:
  """The directory's manifest, or None if there is none or it is unreadable."""
  try:
    return artifacts.read_json(os.path.join(directory, MANIFEST))
  except (OSError, ValueError):
    return None


def matches(manifest: Mapping[str, Any] | None,
            expected: Mapping[str, Any]) -> TypeGuard[dict[str, Any]]:
  """Whether a manifest is complete and has every `expected` entry."""
  return (manifest is not None and bool(manifest.get("complete"))
          and all(manifest.get(k) == v for k, v in expected.items()))


def build_once(final_dir: str, expected: Mapping[str, Any],
               build: Callable[[str], Mapping[str, Any]], *, what: str,
               replace_stale: bool = False) -> dict[str, Any]:
  """The manifest of `final_dir`, built first unless it is already there.

  Args:
    final_dir: the cache directory.
    expected: entries its manifest must have (JSON values, e.g. the key).
    build: `build(tmp_dir) -> manifest entries`; writes the arrays into
      `tmp_dir`. `expected`, `complete: True` and the build time are added,
      and the manifest is written last.
    what: how to name the cache in messages ("AV-MNIST cache").
    replace_stale: rebuild and replace a complete directory whose manifest
      differs (a cache at a fixed path, e.g. the teacher outputs); otherwise
      (a directory named by its key) such a directory is damaged: an error.

  Raises:
    DataError: an existing directory is not a valid cache (without
      `replace_stale`).
  """
  final_dir = os.path.abspath(final_dir)
  if matches(read_manifest(final_dir), expected):
    return read_manifest(final_dir)
  parent, name = os.path.split(final_dir)
  with artifacts.file_lock(os.path.join(parent, f".{name}.lock")):
    have = read_manifest(final_dir)
    if matches(have, expected):
      return have
    fix = f"delete {final_dir} and run again to rebuild it"
    if os.path.exists(final_dir) and not replace_stale:
      if have is None:
        raise errors.DataError(
            f"{final_dir} exists but has no manifest (not written by this"
            f" library's atomic build); {fix}")
      raise errors.DataError(f"{what} {final_dir} is incomplete or belongs"
                             f" to other settings; {fix}")
    artifacts.remove_stale_tmp(final_dir)
    t0 = time.monotonic()
    with artifacts.atomic_directory(final_dir, replace=True) as tmp:
      manifest = dict(build(tmp))
      manifest.update(expected)
      manifest.update(
          complete=True, build_seconds=round(time.monotonic() - t0, 2),
          created=datetime.datetime.now(datetime.timezone.utc).isoformat())
      # The manifest is written last: a directory without it is never valid.
      artifacts.write_json(os.path.join(tmp, MANIFEST), manifest)
  return read_manifest(final_dir)


def open_array(path: str, shape: Sequence[int], dtype: Any, fix: str
               ) -> np.ndarray:
  """A read-only memmap of a built array, checked for shape and dtype.

  Raises:
    DataError: the file is missing, unreadable or of another shape / dtype.
  """
  try:
    arr = np.load(path, mmap_mode="r")
  except (OSError, ValueError, EOFError) as e:
    raise errors.DataError(f"{path} is damaged or missing ({e}); {fix}"
                           ) from None
  if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
    raise errors.DataError(
        f"{path} has shape {arr.shape} {arr.dtype}, expected {tuple(shape)}"
        f" {np.dtype(dtype)}; {fix}")
  return arr


def check_labels(path: str, want_sha256: str, n: int, task: str, fix: str
                 ) -> np.ndarray:
  """Built labels [n], checked against the sha256 they must have.

  Raises:
    DataError: the file is missing, unreadable, or holds other labels.
  """
  try:
    labels = np.load(path)
  except (OSError, ValueError, EOFError) as e:
    raise errors.DataError(f"{path} is damaged or missing ({e}); {fix}"
                           ) from None
  if labels.shape != (n,) or base.label_sha256(labels, task) != want_sha256:
    raise errors.DataError(f"{path} does not match its manifest; {fix}")
  return labels


# ----------------------------------------------------------------------------
# Per-sample builds.


class LazySamples:
  """Read-only array-like [N, *shape] whose rows are computed when read.

  `x[i]` calls `fn(i)`; `x[idx]` for an integer array or slice stacks the
  rows. This is the `storage="on_demand"` backend: `Split.batch` only indexes
  its inputs, so a batch costs the samples it holds.
  """

  def __init__(self, fn: Callable[[int], np.ndarray], n: int,
               shape: Sequence[int], dtype):
    self._fn = fn
    self.shape = (int(n), *(int(d) for d in shape))
    self.dtype = np.dtype(dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def _row(self, i: int) -> np.ndarray:
    n = self.shape[0]
    if not -n <= i < n:
      raise IndexError(f"index {i} out of range for {n} samples")
    row = np.asarray(self._fn(int(i) % n))
    if row.shape != self.shape[1:]:
      raise errors.DataError(
          f"sample {i} has shape {row.shape}, expected {self.shape[1:]}; the"
          " source file is malformed")
    return row.astype(self.dtype, copy=False)

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self._row(int(key))
    if isinstance(key, slice):
      idx = np.arange(self.shape[0])[key]
    else:
      idx = np.asarray(key)
      if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"LazySamples supports an int, a slice or a 1-D int"
                        f" array as index, got {key!r}")
    out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
    for j, i in enumerate(idx):
      out[j] = self._row(int(i))
    return out

  def __array__(self, dtype=None, copy=None):
    del copy
    arr = self[np.arange(self.shape[0])]
    return arr if dtype is None else arr.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Reader:
  """How one modality's samples are made: `fn(i)` -> array `shape`, `dtype`."""
  fn: Callable[[int], np.ndarray]
  shape: tuple[int, ...]
  dtype: str


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """One split to materialise: per-modality readers, labels and sample ids."""
  readers: dict[str, Reader]
  labels: np.ndarray
  ids: list[str]


def _threads(requested: int) -> int:
  return requested or min(8, os.cpu_count() or 1)


def _write_split(out_dir: str, name: str, split: str, plan: SplitPlan,
                 threads: int) -> None:
  """Writes labels, ids and one .npy per modality of a split (threaded)."""
  os.makedirs(os.path.join(out_dir, split))
  n = len(plan.labels)
  np.save(os.path.join(out_dir, split, "labels.npy"), plan.labels)
  with open(os.path.join(out_dir, split, "ids.txt"), "w") as f:
    f.write("".join(i + "\n" for i in plan.ids))
  outs = {m: np.lib.format.open_memmap(
      os.path.join(out_dir, split, f"{m}.npy"), mode="w+", dtype=r.dtype,
      shape=(n, *r.shape)) for m, r in plan.readers.items()}

  def make(i: int) -> int:
    for m, r in plan.readers.items():
      row = np.asarray(r.fn(i))
      if row.shape != r.shape:
        raise errors.DataError(
            f"{name}: sample {plan.ids[i]} ({m}) has shape {row.shape},"
            f" expected {r.shape}")
      outs[m][i] = row
    return i

  progress = Progress(f"{name} build: {split}", n, unit="samples",
                      seconds=10.0)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for done, _ in enumerate(pool.map(make, range(n)), start=1):
      progress.update(done)
  for arr in outs.values():
    arr.flush()


def materialize(name: str, plans: dict[str, SplitPlan], *, storage: str,
                cache_dir: str, settings: dict, sources: str, task: str,
                build_threads: int = 0) -> tuple[dict, str]:
  """Turns split plans into per-split input arrays.

  Args:
    name: dataset name (cache sub-folder and log prefix).
    plans: split -> `SplitPlan`.
    storage: "cache" (build once, open read-only memmaps) or "on_demand"
      (`LazySamples` computing each row when read).
    cache_dir: cache root from the config (may be empty).
    settings: JSON-able build settings (part of the key).
    sources: identity hash of the source files (part of the key).
    task: "classification" or "regression" (label hashing).
    build_threads: worker threads of the build (0: automatic).

  Returns:
    ({split: {modality: array-like}}, key).

  Raises:
    DataError: a source is malformed or an existing cache is damaged.
  """
  labels_sha = {s: base.label_sha256(p.labels, task) for s, p in plans.items()}
  key = artifacts.canonical_hash({"settings": settings, "sources": sources,
                                  "splits": labels_sha})[:20]
  if storage == "on_demand":
    return {s: {m: LazySamples(r.fn, len(p.labels), r.shape, r.dtype)
                for m, r in p.readers.items()}
            for s, p in plans.items()}, key
  final = os.path.join(base.resolve_cache_dir(cache_dir), name, key)

  def build(tmp: str) -> dict[str, Any]:
    logging.info("%s build: %s -> %s", name, settings, final)
    for s, plan in plans.items():
      _write_split(tmp, name, s, plan, _threads(build_threads))
    return {"format": f"g2d_jax.{name}", "settings": settings,
            "sources_sha256": sources,
            "split_sizes": {s: len(p.labels) for s, p in plans.items()},
            "shapes": {m: list(r.shape) for m, r in
                       next(iter(plans.values())).readers.items()}}

  build_once(final, {"key": key}, build, what=f"{name} cache")
  fix = f"delete {final} and run again to rebuild it"
  arrays = {}
  for s, plan in plans.items():
    n = len(plan.labels)
    check_labels(os.path.join(final, s, "labels.npy"), labels_sha[s], n,
                 task, fix)
    arrays[s] = {m: open_array(os.path.join(final, s, f"{m}.npy"),
                               (n, *r.shape), r.dtype, fix)
                 for m, r in plan.readers.items()}
  return arrays, key
