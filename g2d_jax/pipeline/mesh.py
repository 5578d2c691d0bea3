"""Data parallelism over a one-axis device mesh named 'data'.

The same code runs on one CPU, N fake CPU devices and N GPUs: parameters are
replicated, batches are split along their leading axis, and `jit` inserts the
gradient all-reduce (and BatchNorm's cross-device batch statistics) because
the step is written over the global batch.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from g2d_jax.pipeline import distributed


def data_mesh(devices: list[Any] | None = None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices with one axis, 'data'."""
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a host batch: arrays split along their leading (batch) axis,
  scalar arrays replicated, Python ints (host-side flags) left alone. In a
  multi-process job the arrays hold this process's rows of the global
  batch (`distributed.local_rows`)."""
  split, rep = batch_sharded(mesh), replicated(mesh)
  several = distributed.multiprocess()

  def place(x):
    if isinstance(x, int):
      return x
    x = np.asarray(x)
    if several and x.ndim:
      return distributed.global_batch(x, split)
    return jax.device_put(x, split if x.ndim else rep)
  return jax.tree.map(place, batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(tree, replicated(mesh))
