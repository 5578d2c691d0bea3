"""Small helpers the balancing methods share (pure functions)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

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


def path_keys(path: tuple[Any, ...]) -> list[Any]:
  return [getattr(p, "key", getattr(p, "name", None)) for p in path]


def leaf_modality(path: tuple[Any, ...],
                  modalities: Sequence[str]) -> str | None:
  """The modality a parameter belongs to (first modality key on its path,
  as `g2d_jax.modality_labels`), or None for shared parameters."""
  for k in path_keys(path):
    if k in modalities:
      return k
  return None


def is_encoder_leaf(path: tuple[Any, ...], modality: str) -> bool:
  """Whether the leaf is in modality's encoder, `encoders/<m>/backbone/...`
  (not its fusion head or projection, nor a method's extra heads)."""
  keys = path_keys(path)
  return keys[:3] == ["encoders", modality, "backbone"]


def map_with_path(fn: Callable[[tuple[Any, ...], Array], Array],
                  tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(fn, tree)


def modality_order(mapping: Mapping[str, Any],
                   modalities: Sequence[str] | None) -> tuple[str, ...]:
  """The dataset's modality order if known, else the mapping's."""
  if modalities is None:
    return tuple(mapping)
  missing = [m for m in modalities if m not in mapping]
  if missing:
    raise ValueError(f"modalities {missing} are missing from {tuple(mapping)}.")
  return tuple(modalities)
