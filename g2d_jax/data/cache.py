"""Atomic on-disk builds: write into a temp directory, rename when complete.

A reader only ever sees a final directory that was renamed into place after
every file in it was written, flushed and listed in its manifest, so a build
killed half-way leaves at most a `.tmp-*` directory nobody will load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from typing import Iterator

from absl import logging


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
  """Prefix of the temp directories used to build `final_dir`."""
  parent, base = os.path.split(os.path.abspath(final_dir))
  return os.path.join(parent, f".tmp-{base}-")


def remove_stale_tmp(final_dir: str) -> None:
  """Deletes leftovers of interrupted builds of `final_dir`.

  Call only while holding the build lock for `final_dir`: no live build of it
  can exist then.
  """
  prefix = tmp_prefix(final_dir)
  parent, stem = os.path.dirname(prefix), os.path.basename(prefix)
  if not os.path.isdir(parent):
    return
  for name in os.listdir(parent):
    if name.startswith(stem):
      logging.info("Removing the leftover of an interrupted build: %s",
                   os.path.join(parent, name))
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


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
def atomic_directory(final_dir: str) -> Iterator[str]:
  """Yields a temp directory that becomes `final_dir` if the block succeeds.

  On an exception the temp directory is deleted and `final_dir` is untouched.
  If `final_dir` appeared meanwhile (a concurrent writer won), the new copy is
  discarded and the existing one kept.
  """
  final_dir = os.path.abspath(final_dir)
  os.makedirs(os.path.dirname(final_dir), exist_ok=True)
  tmp = tmp_prefix(final_dir) + str(os.getpid())
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
    fsync_tree(tmp)
    try:
      os.rename(tmp, final_dir)
    except OSError:
      if not os.path.isdir(final_dir):
        raise
      logging.info("%s was completed by another process; keeping it.",
                   final_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, obj) -> None:
  """Writes JSON (sorted keys, indented) to `path`."""
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def sha256_files(paths: list[str]) -> str:
  """sha256 of the files' contents concatenated in the given order."""
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


def settings_hash(obj) -> str:
  """sha256 of the canonical JSON of `obj`."""
  return hashlib.sha256(
      json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
  ).hexdigest()
