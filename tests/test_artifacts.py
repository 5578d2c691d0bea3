"""Atomic files and directories, locks, hashes and the JSON normaliser."""

import hashlib
import json
import os
import threading
import time

import numpy as np
import pytest

from g2d_jax import artifacts


def test_atomic_directory_success(tmp_path):
  final = tmp_path / "root" / "build"
  with artifacts.atomic_directory(str(final)) as tmp:
    assert not final.exists()
    with open(os.path.join(tmp, "a.txt"), "w") as f:
      f.write("hi")
  assert (final / "a.txt").read_text() == "hi"
  assert os.listdir(tmp_path / "root") == ["build"]


def test_atomic_directory_failure_leaves_nothing(tmp_path):
  final = tmp_path / "build"
  with pytest.raises(RuntimeError):
    with artifacts.atomic_directory(str(final)) as tmp:
      open(os.path.join(tmp, "half.npy"), "w").close()
      raise RuntimeError("killed")
  assert os.listdir(tmp_path) == []


def test_concurrent_winner_is_kept(tmp_path):
  final = tmp_path / "build"
  with artifacts.atomic_directory(str(final)) as tmp:
    final.mkdir()
    (final / "winner").write_text("1")
    open(os.path.join(tmp, "loser"), "w").close()
  assert os.listdir(final) == ["winner"]
  assert os.listdir(tmp_path) == ["build"]


def test_remove_stale_tmp(tmp_path):
  final = tmp_path / "k"
  stale = tmp_path / ".tmp-k-123"
  other = tmp_path / ".tmp-kk-1"
  stale.mkdir()
  other.mkdir()
  artifacts.remove_stale_tmp(str(final))
  assert not stale.exists() and other.exists()


def test_hashes(tmp_path):
  (tmp_path / "a").write_bytes(b"ab")
  (tmp_path / "b").write_bytes(b"c")
  assert artifacts.sha256_files([str(tmp_path / "a"), str(tmp_path / "b")]) == (
      hashlib.sha256(b"abc").hexdigest())
  assert artifacts.canonical_hash({"b": 1, "a": 2}) == (
      hashlib.sha256(b'{"a":2,"b":1}').hexdigest())


def test_file_lock_excludes_a_second_holder(tmp_path):
  """A second acquirer (its own open file, as another process would have)
  waits until the first releases the lock."""
  path = str(tmp_path / "l" / ".lock")
  events = []
  held = threading.Event()

  def first():
    with artifacts.file_lock(path):
      events.append("first in")
      held.set()
      time.sleep(0.3)
      events.append("first out")

  t = threading.Thread(target=first)
  t.start()
  held.wait(5)
  with artifacts.file_lock(path):
    events.append("second in")
  t.join()
  assert events == ["first in", "first out", "second in"]


def test_atomic_directory_replace_swaps_an_existing_one(tmp_path):
  final = tmp_path / "build"
  final.mkdir()
  (final / "old").write_text("0")
  with artifacts.atomic_directory(str(final), replace=True) as tmp:
    open(os.path.join(tmp, "new"), "w").close()
  assert os.listdir(final) == ["new"]
  assert os.listdir(tmp_path) == ["build"]


def test_write_json_is_atomic_and_normalises(tmp_path):
  path = str(tmp_path / "a.json")
  artifacts.write_json(path, {"x": (1, np.float32(0.5)), "y": float("nan"),
                              "z": np.arange(2)})
  assert json.loads(open(path).read()) == {"x": [1, 0.5], "y": "nan",
                                           "z": [0, 1]}

  def crash(tmp):
    open(tmp, "w").write("half")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    artifacts.replace_file(path, crash)
  assert json.loads(open(path).read())["x"] == [1, 0.5]   # untouched
  assert os.listdir(tmp_path) == ["a.json"]                # no temp left
  assert artifacts.plain({"t": (1, 2)}) == {"t": [1, 2]}
