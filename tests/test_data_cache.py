"""Tests of the atomic build directory helpers."""

import hashlib
import os

import pytest

from g2d_jax.data import cache


def test_atomic_directory_success(tmp_path):
  final = tmp_path / "root" / "build"
  with cache.atomic_directory(str(final)) as tmp:
    assert not final.exists()
    with open(os.path.join(tmp, "a.txt"), "w") as f:
      f.write("hi")
  assert (final / "a.txt").read_text() == "hi"
  assert os.listdir(tmp_path / "root") == ["build"]


def test_atomic_directory_failure_leaves_nothing(tmp_path):
  final = tmp_path / "build"
  with pytest.raises(RuntimeError):
    with cache.atomic_directory(str(final)) as tmp:
      open(os.path.join(tmp, "half.npy"), "w").close()
      raise RuntimeError("killed")
  assert os.listdir(tmp_path) == []


def test_concurrent_winner_is_kept(tmp_path):
  final = tmp_path / "build"
  with cache.atomic_directory(str(final)) as tmp:
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
  cache.remove_stale_tmp(str(final))
  assert not stale.exists() and other.exists()


def test_hashes(tmp_path):
  (tmp_path / "a").write_bytes(b"ab")
  (tmp_path / "b").write_bytes(b"c")
  assert cache.sha256_files([str(tmp_path / "a"), str(tmp_path / "b")]) == (
      hashlib.sha256(b"abc").hexdigest())
  assert cache.settings_hash({"b": 1, "a": 2}) == cache.settings_hash(
      {"a": 2, "b": 1})


def test_file_lock_reentrant_across_calls(tmp_path):
  with cache.file_lock(str(tmp_path / "l" / ".lock")):
    pass
  with cache.file_lock(str(tmp_path / "l" / ".lock")):
    pass
