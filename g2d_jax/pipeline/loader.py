"""grain input pipelines: shuffled training batches, padded eval batches, and
the SMP gate that the pipeline computes per batch next to the data.

Each batch is a dict of host NumPy arrays:
  {"index": [B], "label": [B], "inputs": {m: [B, ...] float32},
   "teacher": {"logits": {m: [B, C]}, "features": {m: [B, D]}}   (if asked),
   "mask": [B] bool                                              (eval only)}
Teacher rows are joined to samples by their index in the split, so the
teacher cache must be index-aligned with the data (the manifest checks it).
In a multi-process job every process forms the same global batches and
keeps its own rows of each (`distributed.local_rows`).

The order of training batches is a pure function of (seed, epoch), and a
batch is addressable by its step within the epoch, so resuming mid-epoch is
slicing the epoch's batch sequence: no iterator state to save.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import g2d_jax
from g2d_jax import methods as methods_lib
from g2d_jax import schedule
from g2d_jax.data.base import Split
from g2d_jax.pipeline import distributed

Array = jax.Array

# A background thread assembles the next batches while the device computes.
_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch (independent streams per epoch)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def view_index(seed: int, epoch: int, idx: np.ndarray, views: int
               ) -> np.ndarray:
  """The view each sample shows in an epoch: `hash(seed, epoch, i) mod K`
  (splitmix64 chained over the three), int64 [B] in [0, views)."""
  with np.errstate(over="ignore"):
    h = _splitmix64(np.array([seed % 2**64], np.uint64)
                    + np.uint64(0x9E3779B97F4A7C15))
    h = _splitmix64(h ^ np.uint64(epoch % 2**64))
    h = _splitmix64(h ^ np.asarray(idx).astype(np.uint64))
  return (h % np.uint64(views)).astype(np.int64)


def view_rows(split: Split, seed: int, epoch: int, idx: np.ndarray
              ) -> np.ndarray:
  """Rows of samples `idx` in this epoch (the samples themselves without
  views)."""
  idx = np.asarray(idx, np.int64)
  if split.views == 1:
    return idx
  return idx * split.views + view_index(seed, epoch, idx, split.views)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Training drops the last partial batch so every step has one shape."""
  return num_examples // batch_size


def _fetcher(split: Split, teacher: Mapping[str, Any] | None,
             teacher_keys: frozenset[str],
             gate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
             present: Mapping[str, np.ndarray] | None = None):
  """`fetch(rows)` -> the batch of a global batch's `rows`: this process's
  share of them (all of them in a one-process run), with the gate of the
  whole global batch, so every process runs the same gating pattern."""
  def fetch(rows: np.ndarray) -> dict[str, Any]:
    rows = np.asarray(rows, np.int64)
    idx = distributed.local_rows(rows)
    raw = split.batch(idx)
    batch = {"index": idx.astype(np.int32), "label": raw["label"],
             "inputs": {m: raw[m] for m in split.inputs}}
    if present is not None:
      batch["present"] = {m: np.asarray(v[idx], np.float32)
                          for m, v in present.items()}
    if teacher_keys:
      assert teacher is not None, "teacher_keys need the teacher cache"
      batch["teacher"] = {
          key: {m: np.asarray(teacher[m][key][idx]) for m in teacher}
          for key in sorted(teacher_keys)}
    if gate is not None:
      if len(idx) == len(rows):
        batch["gate"] = gate(batch)
      else:
        # What the gate reads (labels, cached teacher logits) for the whole
        # global batch. Without SMP the gate reads nothing.
        whole: dict[str, Any] = {"label": np.asarray(split.labels[rows])}
        if teacher is not None:
          whole["teacher"] = {"logits": {
              m: np.asarray(teacher[m]["logits"][rows]) for m in teacher}}
        batch["gate"] = gate(whole)
    return batch
  return fetch


def train_batches(split: Split, batch_size: int, *, seed: int, epoch: int,
                  start_step: int = 0,
                  teacher: Mapping[str, Any] | None = None,
                  teacher_keys: frozenset[str] = frozenset(),
                  gate: Callable[[dict[str, Any], int], dict[str, Any]]
                  | None = None) -> Iterator[dict[str, Any]]:
  """The shuffled, full batches of one epoch, from `start_step` on.

  A split with views shuffles its samples and reads each one's view of
  this epoch (`view_rows`); `batch["index"]` is the row, which joins the
  teacher outputs of that view. `gate(batch, epoch)`, if given, adds the
  SMP gate of each batch (computed here, in the loader's threads, from the
  batch's teacher logits).
  """
  ds = (grain.MapDataset.range(split.num_samples)
        .shuffle(seed=epoch_seed(seed, epoch))
        .batch(batch_size, drop_remainder=True))
  batch_gate = None if gate is None else (lambda b: gate(b, epoch))
  fetch = _fetcher(split, teacher, teacher_keys, batch_gate)
  if split.views > 1:
    ds = ds[start_step:].map(
        lambda idx: fetch(view_rows(split, seed, epoch, idx)))
  else:
    ds = ds[start_step:].map(fetch)
  return iter(ds.to_iter_dataset(_READ))


def eval_batches(split: Split, batch_size: int, *,
                 teacher: Mapping[str, Any] | None = None,
                 teacher_keys: frozenset[str] = frozenset(),
                 present: Mapping[str, np.ndarray] | None = None,
                 ) -> Iterator[dict[str, Any]]:
  """All samples in order; the last batch is padded and masked out.

  `present` ({m: [N] 0/1} over the split) adds each sample's missing-modality
  pattern as `batch["present"]`.
  """
  n = len(split)
  fetch = _fetcher(split, teacher, teacher_keys, present=present)

  def padded(start: int) -> dict[str, Any]:
    idx = np.arange(start, min(start + batch_size, n))
    mask = np.ones(batch_size, bool)
    mask[len(idx):] = False
    batch = fetch(np.concatenate(
        [idx, np.full(batch_size - len(idx), idx[0], idx.dtype)]))
    batch["mask"] = distributed.local_rows(mask)
    return batch

  ds = grain.MapDataset.range(0, n, batch_size).map(padded)
  return iter(ds.to_iter_dataset(_READ))


ALL = -1  # pattern: every modality trains (or a fractional gate)


class GateSpec:
  """SMP gating of the student, computed per batch next to the data.

  The gate depends only on the batch's cached teacher logits, its labels and
  the epoch, so the input pipeline computes it (with the core functions
  `teacher_confidence`, `smp_kappa`, `partial_kappa`, jitted on the host CPU
  device) before the step runs. The step receives kappa as a traced
  argument, and the host also knows the gating *pattern* (which single
  modality trains, or all), which lets it run a step specialised to that
  pattern: the frozen branches' backward passes are never computed.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               modalities: Sequence[str], task: str):
    g = config.gating
    self.enabled = methods_lib.smp_enabled(config)
    self.modalities = tuple(modalities)
    self.taus = schedule.gating_taus(config) if self.enabled else ()
    self.semantics = g.semantics
    self.scope = g.freeze_scope
    # Hold a frozen branch's BatchNorm statistics (only where SMP gates).
    self.hold_frozen_stats = (self.enabled
                              and g.frozen_batch_stats == "hold")
    self.partial = g.suppression == "partial"
    self.strength = float(g.partial_strength)
    self.task = task
    # Skipping a frozen branch's backward is exact only for 0/1 gates.
    self.skip_frozen = (self.enabled and bool(g.skip_frozen_backward)
                        and not self.partial)
    self._device = jax.local_devices(backend="cpu")[0]
    self._compute = jax.jit(self.kappa)

  def kappa(self, teacher_logits: Mapping[str, Array], labels: Array,
            epoch: Array) -> tuple[dict[str, Array], dict[str, Array]]:
    """(kappa, teacher confidence) of a batch: Eq. 5-7 (or Table 6)."""
    rho = g2d_jax.teacher_confidence(teacher_logits, labels, task=self.task)
    if self.partial:
      part = g2d_jax.partial_kappa(rho, self.strength, self.modalities)
      active = g2d_jax.smp_active(epoch, self.taus)
      kappa = {m: jnp.where(active, part[m], 1.0) for m in self.modalities}
    else:
      kappa = g2d_jax.smp_kappa(rho, epoch, self.taus, self.modalities)
    return kappa, rho

  def for_batch(self, batch: Mapping[str, Any], epoch: int) -> dict[str, Any]:
    """{"kappa", "confidence", "pattern"} of a host batch (host values)."""
    if not self.enabled:
      return {"kappa": {m: np.float32(1.0) for m in self.modalities},
              "confidence": {}, "pattern": ALL}
    args = jax.device_put((batch["teacher"]["logits"], batch["label"],
                           np.int32(epoch)), self._device)
    kappa, rho = jax.device_get(self._compute(*args))
    k = [float(kappa[m]) for m in self.modalities]
    pattern = ALL
    if self.skip_frozen and sorted(k) == [0.0] * (len(k) - 1) + [1.0]:
      pattern = k.index(1.0)
    return {"kappa": kappa, "confidence": rho, "pattern": pattern}
