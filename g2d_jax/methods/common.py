"""Small helpers the balancing methods share (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def scale_by_modality(grads, coeffs: Mapping[str, Array],
                      modalities: Sequence[str], *,
                      encoders_only: bool = False):
  """Multiplies every gradient labelled modality m by coeffs[m] (MLB), or
  with `encoders_only` only those of m's encoder (MSLR); the rest as is."""
  def visit(path, g):
    m = gating.leaf_modality(path, modalities)
    if m is None or (encoders_only and not gating.is_encoder_leaf(path, m)):
      return g
    return g * jnp.asarray(coeffs[m], g.dtype)
  return jax.tree_util.tree_map_with_path(visit, grads)
