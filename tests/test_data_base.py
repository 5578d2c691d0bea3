"""Tests of the Split/MultimodalDataset containers and shared helpers."""

import hashlib
import os

import numpy as np
import pytest

from g2d_jax import errors
from g2d_jax.data import base


def _split(n=5):
  return base.Split(
      inputs={"a": np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1),
              "b": np.linspace(0, 1, n * 3, dtype=np.float32).reshape(n, 3)},
      labels=np.arange(n, dtype=np.int32) % 3,
      scales={"a": 1 / 255, "b": 1.0})


def test_batch_gathers_and_scales():
  s = _split()
  b = s.batch(np.array([4, 1]))
  assert set(b) == {"index", "label", "a", "b"}
  assert b["index"].dtype == np.int32 and b["index"].tolist() == [4, 1]
  assert b["label"].tolist() == [1, 1]
  assert b["a"].dtype == np.float32 and b["a"].shape == (2, 2, 2, 1)
  np.testing.assert_allclose(b["a"][0].ravel(), np.arange(16, 20) / 255,
                             rtol=1e-6)
  np.testing.assert_array_equal(b["b"], s.inputs["b"][[4, 1]])
  assert len(s) == 5


def test_batch_from_memmap(tmp_path):
  p = tmp_path / "x.npy"
  np.save(p, np.arange(30, dtype=np.uint8).reshape(10, 3))
  mm = np.load(p, mmap_mode="r")
  s = base.Split({"x": mm}, np.zeros(10, np.int32), {"x": 0.5})
  np.testing.assert_array_equal(s.batch(np.array([9]))["x"], [[13.5, 14, 14.5]])


def test_batch_rejects_bad_indices():
  s = _split()
  with pytest.raises(errors.DataError, match=r"out of range \[0, 5\)"):
    s.batch(np.array([5]))
  with pytest.raises(errors.DataError, match="1-D integer"):
    s.batch(np.array([0.5]))


def test_split_validates_shapes():
  with pytest.raises(errors.DataError, match="has 3 samples but there are 4"):
    base.Split({"x": np.zeros((3, 2))}, np.zeros(4, np.int32), {"x": 1.0})
  with pytest.raises(errors.DataError, match="no scale for modality 'x'"):
    base.Split({"x": np.zeros((4, 2))}, np.zeros(4, np.int32), {})


def test_dataset_validates_splits():
  s = _split()
  with pytest.raises(errors.DataError, match="needs exactly"):
    base.MultimodalDataset("d", ("a", "b"), {"train": s}, 3, "classification",
                           {})
  with pytest.raises(errors.DataError, match="expected .* in that order"):
    base.MultimodalDataset("d", ("b", "a"), dict.fromkeys(base.SPLIT_NAMES, s),
                           3, "classification", {})


def test_label_hash_is_canonical():
  y = np.array([1, 2, 3])
  expected = hashlib.sha256(np.array([1, 2, 3], "<i4").tobytes()).hexdigest()
  assert base.label_sha256(y.astype(np.int64)) == expected
  assert base.label_sha256(y.astype(np.uint8)) == expected


def test_fingerprint_is_jsonable():
  import json
  s = _split()
  fp = base.make_fingerprint("d", {"t": (1, 2), "x": np.float32(0.5)},
                             dict.fromkeys(base.SPLIT_NAMES, s),
                             "classification")
  assert json.loads(json.dumps(fp)) == fp
  assert fp["split_sizes"] == {"train": 5, "val": 5, "test": 5}
  assert fp["settings"] == {"t": [1, 2], "x": 0.5}


def test_check_labels():
  np.testing.assert_array_equal(base.check_labels(np.array([0., 9.]), 10, "f"),
                                [0, 9])
  with pytest.raises(errors.DataError, match=r"f: labels out of range: found "
                     r"values 0..10, expected 0..9"):
    base.check_labels(np.array([0, 10]), 10, "f")
  with pytest.raises(errors.DataError, match="integer class ids"):
    base.check_labels(np.array([0.5]), 10, "f")


def test_resolve_data_dir_messages(monkeypatch, tmp_path):
  monkeypatch.delenv("G2D_DATA_DIR", raising=False)
  monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
  default = str(tmp_path / "xdg" / "g2d_jax")
  assert base.default_data_dir() == default
  with pytest.raises(errors.DataError) as e:
    base.resolve_data_dir("")
  msg = str(e.value)
  assert msg.startswith(f"data directory {default} (the default location, as"
                        " G2D_DATA_DIR and config.data.data_dir are unset)"
                        " does not exist")
  assert f"python -m g2d_jax.data.download --dest {default}" in msg
  assert "2.3 GB speech_commands_v0.02.tar.gz" in msg and "\n" not in msg
  (tmp_path / "xdg" / "g2d_jax" / "mnist").mkdir(parents=True)
  assert base.resolve_data_dir("", ("mnist",)) == default
  with pytest.raises(errors.DataError, match="does not exist"):
    base.resolve_data_dir(str(tmp_path / "nope"))
  monkeypatch.setenv("G2D_DATA_DIR", str(tmp_path))
  assert base.resolve_data_dir("") == str(tmp_path)
  with pytest.raises(errors.DataError, match="mnist is missing"):
    base.resolve_data_dir("", ("mnist",))


def test_resolve_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv("G2D_CACHE_DIR", raising=False)
  assert base.resolve_cache_dir("") == os.path.expanduser(
      "~/.cache/g2d_jax")
  monkeypatch.setenv("G2D_CACHE_DIR", str(tmp_path))
  assert base.resolve_cache_dir("") == str(tmp_path)
  assert base.resolve_cache_dir("/x/y") == "/x/y"


def test_split_views_count_rows_and_samples():
  x = np.zeros((12, 2), np.float32)
  s = base.Split({"a": x}, np.zeros(12, np.int32), {"a": 1.0}, views=4)
  assert (len(s), s.num_samples, s.views) == (12, 3, 4)
  with pytest.raises(errors.DataError, match="multiple of 5 rows, got 12"):
    base.Split({"a": x}, np.zeros(12, np.int32), {"a": 1.0}, views=5)
