"""Models and initial training states from a config and a dataset."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from g2d_jax import artifacts
from g2d_jax import models
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.data.base import Split
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps


def encoder_spec(config: ml_collections.ConfigDict, m: str) -> dict[str, Any]:
  """The encoder options of modality m (lists become tuples: Flax modules
  are hashed)."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in artifacts.plain(config.model.encoders[m]).items()}


def teacher_model(config: ml_collections.ConfigDict,
                  dataset: MultimodalDataset, m: str) -> nn.Module:
  """Encoder + linear head for modality m (the student's branch structure)."""
  return models.make_unimodal(encoder_spec(config, m), dataset.num_classes, m,
                              compute_dtype=config.model.dtype)


def student_model(config: ml_collections.ConfigDict,
                  dataset: MultimodalDataset) -> nn.Module:
  """The multimodal student without a method's extra heads."""
  return models.MultimodalModel(
      encoders={m: models.make_encoder(**encoder_spec(config, m))
                for m in dataset.modalities},
      num_outputs=dataset.num_classes, fusion=config.model.fusion,
      fusion_kwargs=artifacts.plain(config.model.fusion_kwargs) or None,
      modalities=tuple(dataset.modalities),
      compute_dtype=config.model.dtype)


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
