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


def assert_batch_stats_move_in_train_mode_only(model, inputs):
  """Every BatchNorm statistic changes in a train-mode pass and none in an
  inference-mode pass."""
  variables = host_variables(model, inputs, train=False)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  for train, moved in ((True, True), (False, False)):
    _, state = apply(variables, inputs, train=train, mutable=("batch_stats",))
    changed = jax.tree.map(lambda a, b: bool(jnp.all(a != b)),
                           variables["batch_stats"], state["batch_stats"])
    unchanged = jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                             variables["batch_stats"], state["batch_stats"])
    assert all(jax.tree.leaves(changed if moved else unchanged)), train


def modules_created(fn):
  """The Flax modules whose methods run while `fn()` runs."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  seen = []

  def record(next_fun, args, kwargs, context):
    seen.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    fn()
  return seen
