"""Small helpers the balancing methods share (pure functions)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from g2d_jax import gating
from g2d_jax.errors import ConfigError

Array = jax.Array


def require_classification(task: str, name: str) -> None:
  if task != "classification":
    raise ConfigError(f"config.method={name!r} is defined for "
                      "classification only (its rule uses class "
                      f"probabilities); the dataset's task is {task!r}.")


def in_window(epoch: Array, start: int, end: int) -> Array:
  """`start <= epoch <= end` (inclusive, 0-indexed; end < 0: no end), traced.

  The released OGM-GE, PMR and MLB code test `starts <= epoch <= ends`.
  """
  epoch = jnp.asarray(epoch, jnp.int32)
  active = epoch >= start
  if end >= 0:
    active = active & (epoch <= end)
  return active


def is_encoder_leaf(path: tuple[Any, ...], modality: str) -> bool:
  """Whether the leaf is in modality's encoder, `encoders/<m>/backbone/...`
  (not its fusion head or projection, nor a method's extra heads)."""
  return gating.path_keys(path)[:3] == ["encoders", modality, "backbone"]
