"""Records of finished stages (`done.json`) and digests of trained weights.

A stage writes its record last, with the fingerprint of its settings; a
rerun with the same fingerprint finds it and skips the stage.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from g2d_jax import artifacts
from g2d_jax.pipeline import distributed

DONE = "done.json"


def weights_digest(tree: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def stage_done(directory: str, fingerprint: Mapping[str, Any]) -> dict | None:
  """The stage's done record if it finished with this fingerprint."""
  path = os.path.join(directory, DONE)
  if not os.path.exists(path):
    return None
  record = artifacts.read_json(path)
  if record.get("fingerprint") != artifacts.plain(fingerprint):
    return None
  return record


def mark_done(directory: str, fingerprint: Mapping[str, Any],
              result: Mapping[str, Any]) -> dict[str, Any]:
  """Writes the stage's record (process 0 of a multi-process job); returns
  it as it reads back."""
  record = artifacts.plain({"fingerprint": fingerprint, **result})
  if distributed.is_primary():
    artifacts.write_json(os.path.join(directory, DONE), record)
  return record
