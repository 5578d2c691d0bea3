"""Stage 2: run the frozen teachers over every split once, data-parallel.

The paper's appendix A.6.3 precomputes teacher outputs instead of running the
teachers every step. This job shards each batch over all devices (the
'data' mesh; what `pmap` did, expressed with `jit` + `NamedSharding`) and
writes, per split and modality, index-aligned float32 arrays

    <workdir>/teacher_cache/<split>/<modality>.features.npy   [N, D]
    <workdir>/teacher_cache/<split>/<modality>.logits.npy     [N, C]

and `manifest.json` (format version, teacher weight digests, the dataset
fingerprint, shapes and dtypes). It is a build-once cache
(`data.materialize.build_once`): written under a temporary name and renamed
when complete, so a crash never leaves a cache that looks valid, and
rebuilt when its manifest no longer matches. In a multi-process job each
process writes its own rows of the arrays, and process 0 the manifest after
all of them. `load_cache` refuses a cache
whose manifest or arrays do not match the data and teachers it is given.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from g2d_jax import artifacts
from g2d_jax.data import materialize
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.errors import CacheMismatchError
from g2d_jax.errors import DataError
from g2d_jax.pipeline import build
from g2d_jax.pipeline import distributed
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import teachers as teachers_lib

FORMAT = 1
KEYS = ("features", "logits")


def cache_dir(workdir: str) -> str:
  return os.path.join(workdir, "teacher_cache")


def expected_manifest(dataset: MultimodalDataset,
                      teacher_digests: dict[str, str]) -> dict[str, Any]:
  """What a cache for this data and these teachers must declare.

  With training views (`data.augment_views` K > 1) the rows are (sample,
  view) pairs, `splits` counts rows and `views` gives K per split; the data
  fingerprint holds K and the transform settings. Without views the
  manifest has no `views` entry (as before views existed).
  """
  want = {
      "format": FORMAT, "data": dataset.fingerprint,
      "teachers": dict(sorted(teacher_digests.items())),
      "splits": {s: len(dataset.splits[s]) for s in dataset.splits}}
  views = {s: getattr(dataset.splits[s], "views", 1) for s in dataset.splits}
  if any(v > 1 for v in views.values()):
    want["views"] = views
  return artifacts.plain(want)


def teacher_outputs(model: Any, weights: Any, split: Any, batch_size: int,
                    mesh: jax.sharding.Mesh, out_features: np.ndarray,
                    out_logits: np.ndarray) -> None:
  """Runs one teacher (eval mode) over a split into the given arrays."""
  m = model.modality

  @jax.jit
  def forward(weights, inputs):
    out, _ = steps.apply_model(model, weights["params"],
                               weights["batch_stats"], inputs, train=False)
    return out.features[m], out.logits

  for batch in loader.eval_batches(split, batch_size):
    inputs = mesh_lib.shard_batch({m: batch["inputs"][m]}, mesh)
    # This process's rows only: in a multi-process job each process writes
    # its own rows of the arrays.
    feats, logits = map(distributed.local_part, forward(weights, inputs))
    keep = batch["mask"]
    rows = batch["index"][keep]
    out_features[rows] = feats[keep]
    out_logits[rows] = logits[keep].reshape(len(rows), -1)


def run(config: ml_collections.ConfigDict, dataset: MultimodalDataset,
        workdir: str, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Writes the teacher cache unless an identical one exists; returns its
  manifest."""
  digests = teachers_lib.teacher_digests(config, dataset, workdir)
  want = expected_manifest(dataset, digests)
  final = cache_dir(workdir)
  have = materialize.read_manifest(final)
  if materialize.matches(have, want):
    logging.info("teacher cache at %s matches; skipping", final)
    return have
  if have is not None:
    logging.info("teacher cache at %s is stale; rebuilding", final)
  loaded = {m: teachers_lib.load_teacher(config, dataset, workdir, m, mesh)
            for m in dataset.modalities}
  shapes = {}
  for split_name, split in dataset.splits.items():
    for m, (model, weights) in loaded.items():
      probe = jax.eval_shape(
          lambda w, x, model=model: steps.apply_model(
              model, w["params"], w["batch_stats"], x, train=False)[0],
          weights, build.example_inputs(split, 1))
      shapes[f"{split_name}/{m}"] = {
          "features": [len(split), probe.features[m].shape[-1]],
          "logits": [len(split), int(np.prod(probe.logits.shape[1:]))]}
  built = dict(shapes=shapes, dtype="float32", devices=len(mesh.devices.flat))

  def arrays(directory: str, split_name: str, m: str, mode: str
             ) -> dict[str, np.memmap]:
    os.makedirs(os.path.join(directory, split_name), exist_ok=True)
    return {key: np.lib.format.open_memmap(
        os.path.join(directory, split_name, f"{m}.{key}.npy"), mode=mode,
        dtype=np.float32, shape=tuple(shapes[f"{split_name}/{m}"][key]))
            for key in KEYS}

  def fill(directory: str, mode: str) -> dict[str, Any]:
    """Runs every teacher over every split into the arrays: creating them
    (mode "w+"), or into the arrays process 0 created ("r+"), this
    process's rows only."""
    for split_name, split in dataset.splits.items():
      for m, (model, weights) in loaded.items():
        logging.info("precompute: %s teacher on %s (%d examples)", m,
                     split_name, len(split))
        out = arrays(directory, split_name, m, mode)
        teacher_outputs(model, weights, split, config.eval.batch_size, mesh,
                        out["features"], out["logits"])
        for a in out.values():
          a.flush()
    return built

  if not distributed.multiprocess():
    return materialize.build_once(final, want, lambda tmp: fill(tmp, "w+"),
                                  what="teacher cache", replace_stale=True)

  # Several processes (`final` on a filesystem they share): process 0
  # creates the arrays, every process writes its own rows, and only after
  # all of them have flushed (a barrier) does process 0 write the manifest
  # and rename the directory, so a cache missing a shard is never complete.
  tmp = f"{final}.tmp-multiprocess"
  t0 = time.monotonic()
  if distributed.is_primary():
    shutil.rmtree(tmp, ignore_errors=True)
    for split_name in dataset.splits:
      for m in dataset.modalities:
        for a in arrays(tmp, split_name, m, "w+").values():
          a.flush()
  distributed.barrier("teacher cache: arrays created")
  fill(tmp, "r+")
  distributed.barrier("teacher cache: every process wrote its rows")
  if distributed.is_primary():
    artifacts.write_json(os.path.join(tmp, materialize.MANIFEST), {
        **built, **want, "complete": True,
        "build_seconds": round(time.monotonic() - t0, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
  distributed.barrier("teacher cache: complete")
  manifest = materialize.read_manifest(final)
  assert manifest is not None, final
  return manifest


def load_cache(workdir: str, dataset: MultimodalDataset,
               teacher_digests: dict[str, str] | None
               ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """{split: {modality: {"features", "logits"}}} memory-mapped, after checking
  the manifest against this dataset (and these teachers, if given) and every
  array against the manifest's shapes."""
  final = cache_dir(workdir)
  fix = f"delete {final} and run --mode=precompute."
  have = materialize.read_manifest(final)
  if have is None or not have.get("complete"):
    raise CacheMismatchError(
        f"no complete teacher cache at {final}; run --mode=precompute (or "
        "--mode=all) first.")
  checks = {"format": FORMAT,
            "data": artifacts.plain(dataset.fingerprint),
            "splits": {s: len(dataset.splits[s]) for s in dataset.splits}}
  if teacher_digests is not None:
    checks["teachers"] = dict(sorted(teacher_digests.items()))
  for key, value in checks.items():
    if have.get(key) != value:
      raise CacheMismatchError(
          f"the teacher cache at {final} does not match this run: its "
          f"'{key}' differs ({_short(have.get(key))} vs expected "
          f"{_short(value)}). Delete {final} and run --mode=precompute.")
  out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
  for split_name in dataset.splits:
    out[split_name] = {}
    for m in dataset.modalities:
      shapes = have.get("shapes", {}).get(f"{split_name}/{m}", {})
      out[split_name][m] = {}
      for key in KEYS:
        path = os.path.join(final, split_name, f"{m}.{key}.npy")
        try:
          out[split_name][m][key] = materialize.open_array(
              path, shapes.get(key, ()), np.float32, fix)
        except DataError as e:
          raise CacheMismatchError(
              f"the teacher cache at {final} does not match its manifest: "
              f"{e}") from None
  return out


def _short(v: Any) -> str:
  s = repr(v)
  return s if len(s) < 120 else s[:117] + "..."
