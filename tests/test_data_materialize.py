"""The build-once cache: built once and reused, leftovers of killed builds
removed, stale caches refused or replaced, damaged arrays refused, and the
per-sample build equal to computing the samples on demand."""

import os

import numpy as np
import pytest

from g2d_jax import errors
from g2d_jax.data import materialize


def writer(calls, value=1.0):
  def build(tmp):
    calls.append(tmp)
    np.save(os.path.join(tmp, "x.npy"), np.full((3, 2), value, np.float32))
    return {"rows": 3}
  return build


def test_built_once_then_reused(tmp_path):
  final = str(tmp_path / "k1")
  calls = []
  m1 = materialize.build_once(final, {"key": "k1"}, writer(calls), what="c")
  m2 = materialize.build_once(final, {"key": "k1"}, writer(calls), what="c")
  assert len(calls) == 1 and m1 == m2
  assert (m1["key"], m1["rows"], m1["complete"]) == ("k1", 3, True)
  x = materialize.open_array(os.path.join(final, "x.npy"), (3, 2), np.float32,
                             "fix")
  assert isinstance(x, np.memmap) and not x.flags.writeable
  assert sorted(os.listdir(tmp_path)) == [".k1.lock", "k1"]


def test_a_killed_build_leaves_nothing_valid_and_its_leftover_is_removed(
    tmp_path):
  final = str(tmp_path / "k1")

  def killed(tmp):
    np.save(os.path.join(tmp, "x.npy"), np.zeros(3))
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    materialize.build_once(final, {"key": "k1"}, killed, what="c")
  assert not os.path.exists(final)
  # A SIGKILL leaves the temporary directory behind; the next build
  # removes it under the lock.
  stale = tmp_path / ".tmp-k1-99999"
  stale.mkdir()
  calls = []
  materialize.build_once(final, {"key": "k1"}, writer(calls), what="c")
  assert not stale.exists() and len(calls) == 1


def test_stale_caches_are_refused_or_replaced(tmp_path):
  final = str(tmp_path / "k1")
  materialize.build_once(final, {"key": "k1"}, writer([]), what="c")
  with pytest.raises(errors.DataError, match="belongs to other settings"):
    materialize.build_once(final, {"key": "k2"}, writer([]), what="c")
  calls = []
  m = materialize.build_once(final, {"key": "k2"}, writer(calls, 2.0),
                             what="c", replace_stale=True)
  assert m["key"] == "k2" and len(calls) == 1
  np.testing.assert_array_equal(np.load(os.path.join(final, "x.npy")), 2.0)
  os.makedirs(tmp_path / "bare")
  with pytest.raises(errors.DataError, match="has no manifest"):
    materialize.build_once(str(tmp_path / "bare"), {"key": "b"}, writer([]),
                           what="c")


def test_damaged_arrays_and_labels_are_refused(tmp_path):
  path = str(tmp_path / "x.npy")
  np.save(path, np.zeros((3, 2), np.float32))
  with pytest.raises(errors.DataError, match=r"expected \(3, 4\) float32"):
    materialize.open_array(path, (3, 4), np.float32, "rebuild")
  with open(path, "rb") as f:
    head = f.read(60)
  with open(path, "wb") as f:
    f.write(head)
  with pytest.raises(errors.DataError, match="is damaged or missing"):
    materialize.open_array(path, (3, 2), np.float32, "rebuild")
  labels = str(tmp_path / "labels.npy")
  np.save(labels, np.array([0, 1, 2], np.int32))
  from g2d_jax.data import base  # pylint: disable=g-import-not-at-top
  good = base.label_sha256(np.array([0, 1, 2]))
  np.testing.assert_array_equal(
      materialize.check_labels(labels, good, 3, "classification", "f"),
      [0, 1, 2])
  with pytest.raises(errors.DataError, match="does not match its manifest"):
    materialize.check_labels(labels, base.label_sha256(np.array([0, 1, 1])),
                             3, "classification", "f")


def test_cached_samples_equal_on_demand_samples(tmp_path):
  def plan(n):
    return materialize.SplitPlan(
        readers={"a": materialize.Reader(
            lambda i: np.full((2, 2), i * 0.5, np.float32), (2, 2),
            "float32")},
        labels=np.arange(n, dtype=np.int32) % 3, ids=[str(i) for i in range(n)])
  plans = {"train": plan(5), "val": plan(2), "test": plan(3)}
  kwargs = dict(cache_dir=str(tmp_path), settings={"s": 1}, sources="src",
                task="classification", build_threads=2)
  cached, key = materialize.materialize("toy", plans, storage="cache",
                                        **kwargs)
  lazy, key2 = materialize.materialize("toy", plans, storage="on_demand",
                                       **kwargs)
  assert key == key2
  assert os.path.isdir(tmp_path / "toy" / key)
  for s in plans:
    np.testing.assert_array_equal(np.asarray(cached[s]["a"]),
                                  np.asarray(lazy[s]["a"]))
  np.testing.assert_array_equal(cached["train"]["a"][[4, 0]][:, 0, 0],
                                [2.0, 0.0])
