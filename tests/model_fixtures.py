"""Shared helpers for the model tests.

Forward tests fill variables on the host: XLA's CPU compile of `jax.random`
costs seconds per distinct shape here, and the values only need to be
reasonable, not Flax's initialisers (which have their own tests).
"""

import jax
import jax.numpy as jnp
import numpy as np


def host_variables(model, *args, seed=0, **kwargs):
  """The model's variables drawn by NumPy (kernels ~ N(0, 1/fan_in))."""
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']") or name.endswith("['scale']"):
      values = rng.uniform(0.5, 1.5, leaf.shape)
    elif leaf.ndim >= 2:
      values = rng.normal(0.0, 1 / np.sqrt(np.prod(leaf.shape[:-1])),
                          leaf.shape)
    else:
      values = rng.normal(0.0, 0.1, leaf.shape)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)
