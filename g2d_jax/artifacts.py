"""Writing run artefacts safely: JSON, atomic files and directories, locks.

Everything the library writes that a later run reads (metrics, manifests,
plots, built data, the teacher cache) goes through here, so that a process
killed at any instant leaves either the old artefact or the new one, never a
half-written file that looks valid:

- `write_json` / `replace_file`: write a temporary file next to the target,
  then rename it over the target (atomic on POSIX).
- `atomic_directory`: build a directory under a temporary name, flush it,
  rename it into place; `remove_stale_tmp` clears what killed builds left.
- `file_lock`: an advisory lock serialising builds of the same artefact.

`to_jsonable` is the one normaliser from config and NumPy values to JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from absl import logging
import numpy as np


def to_jsonable(value: Any) -> Any:
  """A JSON-able copy: ConfigDicts and mappings become dicts with string
  keys, tuples lists, NumPy values Python numbers, and non-finite floats the
  strings "nan" / "inf" / "-inf" (JSON has no spelling for them)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)):
    return to_jsonable(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def plain(value: Any) -> Any:
  """The value as it reads back from JSON (tuples become lists, ...): the
  form to compare a stored record with."""
  return json.loads(json.dumps(to_jsonable(value)))


def canonical_hash(value: Any) -> str:
  """sha256 of the canonical (sorted, compact) JSON of `value`."""
  return hashlib.sha256(json.dumps(
      to_jsonable(value), sort_keys=True, separators=(",", ":")).encode()
  ).hexdigest()


def sha256_files(paths: list[str]) -> str:
  """sha256 of the files' contents concatenated in the given order."""
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


def replace_file(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp_path)`, then renames the result onto `path`.

  The temporary name keeps the file's extension (plotting libraries pick
  the format from it). On an exception the temporary file is removed and
  `path` is untouched.
  """
  stem, ext = os.path.splitext(path)
  tmp = f"{stem}.tmp-{os.getpid()}{ext}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON with sorted keys, atomically."""
  text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n"

  def write(tmp: str) -> None:
    with open(tmp, "w") as f:
      f.write(text)

  replace_file(path, write)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """Holds an exclusive advisory lock on `path` (created if absent)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def tmp_prefix(final_dir: str) -> str:
  """Prefix of the temporary directories used to build `final_dir`."""
  parent, base = os.path.split(os.path.abspath(final_dir))
  return os.path.join(parent, f".tmp-{base}-")


def remove_stale_tmp(final_dir: str) -> list[str]:
  """Deletes leftovers of interrupted builds of `final_dir`; returns them.

  Call only while holding the build lock for `final_dir`: no live build of it
  can exist then.
  """
  prefix = tmp_prefix(final_dir)
  parent, stem = os.path.dirname(prefix), os.path.basename(prefix)
  if not os.path.isdir(parent):
    return []
  removed = []
  for name in sorted(os.listdir(parent)):
    if name.startswith(stem):
      path = os.path.join(parent, name)
      logging.info("removing the leftover of an interrupted build: %s", path)
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def fsync_tree(path: str) -> None:
  """Flushes every file below `path` and the directories to stable storage."""
  for root, _, files in os.walk(path):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_directory(final_dir: str, *, replace: bool = False
                     ) -> Iterator[str]:
  """Yields a temporary directory that becomes `final_dir` if the block
  succeeds.

  On an exception the temporary directory is deleted and `final_dir` is
  untouched. If `final_dir` exists when the block ends: with `replace` it
  is swapped out (renamed aside, then deleted, so a reader sees the old or
  the new directory); without, it is kept (a concurrent writer won) and the
  new copy discarded.
  """
  final_dir = os.path.abspath(final_dir)
  os.makedirs(os.path.dirname(final_dir), exist_ok=True)
  tmp = tmp_prefix(final_dir) + str(os.getpid())
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  old = tmp_prefix(final_dir) + f"old-{os.getpid()}"
  try:
    yield tmp
    fsync_tree(tmp)
    if replace and os.path.isdir(final_dir):
      os.rename(final_dir, old)
    try:
      os.rename(tmp, final_dir)
    except OSError:
      if not os.path.isdir(final_dir):
        raise
      logging.info("%s was completed by another process; keeping it.",
                   final_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


# Names our writers give temporaries: `.tmp-<name>-[old-]<pid>` directories
# (atomic_directory) and `<stem>.tmp-<pid><ext>` files (replace_file); and
# `teacher_cache.tmp-*`, the teacher cache's temporaries before version 0.2.
_TMP_DIR = re.compile(r"^\.tmp-.+-(?:old-)?(\d+)$")
_TMP_FILE = re.compile(r"^.+\.tmp-(\d+)(?:\.[A-Za-z0-9]+)?$")
_LEGACY_TMP = re.compile(r"^teacher_cache\.tmp-")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_dead_temporaries(directory: str) -> list[str]:
  """Deletes, below `directory`, the temporaries our writers name after a
  process that is no longer running (what a kill leaves behind); returns
  them. A live process's temporaries are kept."""
  removed = []
  for root, dirs, files in os.walk(directory):
    for name in list(dirs):
      m = _TMP_DIR.match(name)
      if (m and not _alive(int(m.group(1)))) or _LEGACY_TMP.match(name):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(os.path.join(root, name))
        dirs.remove(name)
    for name in files:
      m = _TMP_FILE.match(name)
      if m and not _alive(int(m.group(1))):
        os.remove(os.path.join(root, name))
        removed.append(os.path.join(root, name))
  return removed
