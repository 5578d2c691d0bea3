"""Small helpers the balancing methods share (pure functions)."""

from __future__ import annotations

import jax

from g2d_jax.errors import ConfigError

Array = jax.Array


def require_classification(task: str, name: str) -> None:
  if task != "classification":
    raise ConfigError(f"config.method={name!r} is defined for "
                      "classification only (its rule uses class "
                      f"probabilities); the dataset's task is {task!r}.")
