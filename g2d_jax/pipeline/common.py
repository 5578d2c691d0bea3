"""Helpers the pipeline stages share: models from the config, evaluation over
a split, fingerprints and stage completion markers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from g2d_jax import models
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.data.base import Split
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import metrics as metrics_lib
from g2d_jax.pipeline import steps

DONE = "done.json"


def to_dict(cfg: Any) -> Any:
  """A plain, JSON-able copy of a (nested) ConfigDict."""
  if isinstance(cfg, ml_collections.ConfigDict):
    cfg = cfg.to_dict()
  return json.loads(json.dumps(metrics_lib._jsonable(cfg)))  # pylint: disable=protected-access


def digest(obj: Any) -> str:
  """sha256 of the canonical JSON of `obj`."""
  blob = json.dumps(to_dict(obj), sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()


def weights_digest(tree: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def encoder_spec(config: ml_collections.ConfigDict, m: str) -> dict[str, Any]:
  """The encoder options of modality m (lists become tuples: Flax modules
  are hashed)."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in to_dict(config.model.encoders[m]).items()}


def teacher_model(config: ml_collections.ConfigDict,
                  dataset: MultimodalDataset, m: str) -> nn.Module:
  """Encoder + linear head for modality m (the student's branch structure)."""
  return models.make_unimodal(encoder_spec(config, m), dataset.num_classes, m)


def student_model(config: ml_collections.ConfigDict,
                  dataset: MultimodalDataset) -> nn.Module:
  return models.MultimodalModel(
      encoders={m: models.make_encoder(**encoder_spec(config, m))
                for m in dataset.modalities},
      num_outputs=dataset.num_classes, fusion=config.model.fusion,
      fusion_kwargs=to_dict(config.model.fusion_kwargs) or None,
      modalities=tuple(dataset.modalities))


def example_inputs(split: Split, n: int) -> dict[str, np.ndarray]:
  raw = split.batch(np.arange(n))
  return {m: raw[m] for m in split.inputs}


def new_state(model: nn.Module, tx: Any, split: Split, seed: int,
              mesh: jax.sharding.Mesh) -> steps.TrainState:
  """Initial TrainState, replicated on the mesh."""
  params, batch_stats = steps.init_variables(model, example_inputs(split, 2),
                                             seed)
  state = steps.TrainState(step=np.int32(0), params=params,
                           batch_stats=batch_stats, opt_state=tx.init(params))
  return mesh_lib.replicate(state, mesh)


def abstract_weights(model: nn.Module, split: Split, seed: int,
                     mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Shapes, dtypes and (replicated) shardings of {"params", "batch_stats"},
  without running anything: the restore target for a checkpoint."""
  params, batch_stats = jax.eval_shape(
      lambda: steps.init_variables(model, example_inputs(split, 2), seed))
  sharding = mesh_lib.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      {"params": params, "batch_stats": batch_stats})


def evaluate_split(eval_step: Any, params: Any, batch_stats: Any, split: Split,
                   batch_size: int, mesh: jax.sharding.Mesh,
                   task: str, teacher: Mapping[str, Any] | None = None,
                   present: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, float]:
  """Accuracy (or MAE) of the fused and per-modality outputs on a split.

  With `teacher` (the split's cached teacher outputs) the scores also hold
  the student-teacher feature cosine per modality (`cosine/<m>`). With
  `present` ({m: [N] 0/1}) the student is scored with missing modalities.
  """
  sums: dict[str, float] = {}
  pending = []
  keys = frozenset({"features"}) if teacher else frozenset()
  for batch in loader.eval_batches(split, batch_size, teacher=teacher,
                                   teacher_keys=keys, present=present):
    pending.append(eval_step(params, batch_stats,
                             mesh_lib.shard_batch(batch, mesh)))
  for counts in jax.device_get(pending):
    for k, v in counts.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  del task
  return metrics_lib.summarize_counts(sums, max(1, len(pending)))


def stage_done(directory: str, fingerprint: Mapping[str, Any]) -> dict | None:
  """The stage's done record if it finished with this fingerprint."""
  path = os.path.join(directory, DONE)
  if not os.path.exists(path):
    return None
  record = metrics_lib.read_json(path)
  if record.get("fingerprint") != to_dict(fingerprint):
    return None
  return record


def mark_done(directory: str, fingerprint: Mapping[str, Any],
              result: Mapping[str, Any]) -> None:
  metrics_lib.write_json(os.path.join(directory, DONE),
                         {"fingerprint": to_dict(fingerprint), **result})
