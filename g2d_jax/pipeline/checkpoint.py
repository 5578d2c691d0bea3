"""Orbax checkpoints: the latest training state (for resuming) and the
best-on-validation weights (for evaluation and the teacher cache)."""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


@contextlib.contextmanager
def _quiet():
  """Orbax logs every save and restore at INFO through absl; keep the run's
  log readable by raising the threshold while it works."""
  level = logging.get_verbosity()
  logging.set_verbosity(min(level, logging.WARNING))  # absl: lower is quieter
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _quietly(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with _quiet():
      return fn(*args, **kwargs)
  return wrapper


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class RunCheckpoints:
  """`<directory>/latest/<step>` and `<directory>/best/<step>`.

  Both are orbax CheckpointManagers, whose writes are atomic (a temporary
  directory renamed when complete), so an interrupted save is never read.
  """

  @_quietly
  def __init__(self, directory: str, keep: int = 2):
    opts = lambda n: ocp.CheckpointManagerOptions(
        max_to_keep=n, create=True, enable_async_checkpointing=False)
    # Orbax refuses relative paths; workdirs are often given relative.
    directory = os.path.abspath(directory)
    self.directory = directory
    self._latest = ocp.CheckpointManager(os.path.join(directory, "latest"),
                                         options=opts(keep))
    self._best = ocp.CheckpointManager(os.path.join(directory, "best"),
                                       options=opts(1))

  @_quietly
  def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)
    self._latest.wait_until_finished()

  @_quietly
  def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest checkpoint, shaped and sharded like `like`."""
    step = self._latest.latest_step()
    if step is None:
      return None
    r = self._latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(like)),
        meta=ocp.args.JsonRestore()))
    return r.state, r.meta

  @_quietly
  def save_best(self, step: int, weights: Any, meta: dict[str, Any]) -> None:
    self._best.save(step, args=ocp.args.Composite(
        weights=ocp.args.StandardSave(weights), meta=ocp.args.JsonSave(meta)),
                    force=True)
    self._best.wait_until_finished()

  @_quietly
  def restore_best(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    step = self._best.latest_step()
    if step is None:
      return None
    r = self._best.restore(step, args=ocp.args.Composite(
        weights=ocp.args.StandardRestore(_abstract(like)),
        meta=ocp.args.JsonRestore()))
    return r.weights, r.meta

  @_quietly
  def close(self) -> None:
    self._latest.close()
    self._best.close()
