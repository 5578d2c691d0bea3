"""Orbax checkpoints: the latest training state (for resuming) and the
best-on-validation weights (for evaluation and the teacher cache)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

# Test hook: `G2D_KILL_AT=<point>[:<n>]` SIGKILLs this process the n-th time
# (default 1st) it reaches <point>, to test that a rerun resumes from
# whatever a kill leaves. Points: "after_best_save" (the best weights are
# committed, the latest state of the same step is not), "after_latest_save"
# (a resumable checkpoint is committed).
KILL_ENV = "G2D_KILL_AT"
_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
  """SIGKILLs the process here if `G2D_KILL_AT` names this point."""
  spec = os.environ.get(KILL_ENV, "")
  if not spec:
    return
  point, _, nth = spec.partition(":")
  if point != name:
    return
  _kill_counts[name] = _kill_counts.get(name, 0) + 1
  if _kill_counts[name] == int(nth or 1):
    os.kill(os.getpid(), signal.SIGKILL)


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
  directory renamed when complete), so an interrupted save is never read;
  the temporary directories a kill leaves are removed when the managers
  open. A run killed between the two saves of an epoch has committed its
  best weights for a step whose latest state it has not: the rerun replays
  that epoch and saves the same step again, which replaces the existing
  checkpoint (the replayed state is bit-identical).
  """

  @_quietly
  def __init__(self, directory: str, keep: int = 2):
    opts = lambda n: ocp.CheckpointManagerOptions(
        max_to_keep=n, create=True, enable_async_checkpointing=False,
        cleanup_tmp_directories=True)
    # Orbax refuses relative paths; workdirs are often given relative.
    directory = os.path.abspath(directory)
    self.directory = directory
    self._latest = ocp.CheckpointManager(os.path.join(directory, "latest"),
                                         options=opts(keep))
    self._best = ocp.CheckpointManager(os.path.join(directory, "best"),
                                       options=opts(1))

  @staticmethod
  def _save(manager: ocp.CheckpointManager, step: int, **items: Any) -> None:
    if step in manager.all_steps():
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()

  @staticmethod
  def _restore(manager: ocp.CheckpointManager, name: str, like: Any):
    step = manager.latest_step()
    if step is None:
      return None
    r = manager.restore(step, args=ocp.args.Composite(**{
        name: ocp.args.StandardRestore(_abstract(like)),
        "meta": ocp.args.JsonRestore()}))
    return r[name], r["meta"]

  @_quietly
  def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._save(self._latest, step, state=ocp.args.StandardSave(state),
               meta=ocp.args.JsonSave(meta))
    kill_point("after_latest_save")

  @_quietly
  def restore_latest(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of the newest checkpoint, shaped and sharded as
    `like`."""
    return self._restore(self._latest, "state", like)

  @_quietly
  def save_best(self, step: int, weights: Any, meta: dict[str, Any]) -> None:
    self._save(self._best, step, weights=ocp.args.StandardSave(weights),
               meta=ocp.args.JsonSave(meta))
    kill_point("after_best_save")

  @_quietly
  def restore_best(self, like: Any) -> tuple[Any, dict[str, Any]] | None:
    return self._restore(self._best, "weights", like)

  @_quietly
  def close(self) -> None:
    self._latest.close()
    self._best.close()
