"""Tests of the MultiBench AV-MNIST reader on a fixture in its exact layout."""

import os

import numpy as np
import pytest

from g2d_jax import errors
from g2d_jax.data import multibench

N_TRAIN, N_TEST = 60, 20


def _write_fixture(root, image_train_shape=(N_TRAIN, 784), audio_size=112,
                   train_labels=None):
  rng = np.random.default_rng(0)
  (root / "image").mkdir(parents=True)
  (root / "audio").mkdir()
  arrays = {
      "image/train_data.npy": rng.integers(0, 256, image_train_shape
                                           ).astype(np.uint8),
      # Float storage, [N, 28, 28]: both forms occur in copies of the data.
      "image/test_data.npy": rng.integers(0, 256, (N_TEST, 28, 28)
                                          ).astype(np.float32),
      "audio/train_data.npy": rng.integers(
          0, 256, (N_TRAIN, audio_size, audio_size)).astype(np.uint8),
      "audio/test_data.npy": rng.integers(0, 256, (N_TEST, 112, 112)
                                          ).astype(np.uint8),
      "train_labels.npy": (train_labels if train_labels is not None
                           else np.arange(N_TRAIN) % 10).astype(np.int64),
      "test_labels.npy": (np.arange(N_TEST) * 3 % 10).astype(np.int64),
  }
  for name, arr in arrays.items():
    np.save(root / name, arr)
  return arrays


def _cfg(root, num_val=10):
  cfg = multibench.default_config()
  cfg.data_dir = str(root)
  cfg.num_val = num_val
  return cfg


def test_reads_layout(tmp_path):
  arrays = _write_fixture(tmp_path / "avmnist")
  # data_dir may be the layout folder itself or its parent.
  for d in (tmp_path / "avmnist", tmp_path):
    ds = multibench.load(_cfg(d))
    assert ds.name == "avmnist_multibench"
    assert ds.modalities == ("audio", "image")
    assert {s: len(ds.splits[s]) for s in ds.splits} == {
        "train": 50, "val": 10, "test": 20}
  tr, va, te = (ds.splits[s] for s in ("train", "val", "test"))
  assert isinstance(tr.inputs["audio"], np.memmap)
  assert tr.inputs["image"].shape == (50, 28, 28, 1)
  assert tr.inputs["audio"].shape == (50, 112, 112, 1)
  np.testing.assert_array_equal(
      va.inputs["image"][3, :, :, 0],
      arrays["image/train_data.npy"][53].reshape(28, 28))
  np.testing.assert_array_equal(va.labels, np.arange(50, 60) % 10)
  assert va.labels.dtype == np.int32
  b = te.batch(np.array([7]))
  np.testing.assert_allclose(b["image"][0, :, :, 0],
                             arrays["image/test_data.npy"][7] / 255, rtol=1e-6)
  np.testing.assert_allclose(b["audio"][0, :, :, 0],
                             arrays["audio/test_data.npy"][7] / 255, rtol=1e-6)
  assert b["label"].tolist() == [1]


def test_default_val_is_last_5000_of_real_sized_layout(tmp_path):
  cfg = multibench.default_config()
  assert cfg.num_val == 5000


def test_wrong_audio_shape(tmp_path):
  _write_fixture(tmp_path, audio_size=100)
  with pytest.raises(errors.DataError, match=r"has shape \(60, 100, 100\);"
                     r" expected \[N, 112, 112\]"):
    multibench.load(_cfg(tmp_path))


def test_wrong_image_shape(tmp_path):
  _write_fixture(tmp_path, image_train_shape=(N_TRAIN, 780))
  with pytest.raises(errors.DataError, match=r"expected \[N, 784\] or"):
    multibench.load(_cfg(tmp_path))


def test_labels_out_of_range(tmp_path):
  _write_fixture(tmp_path, train_labels=np.arange(N_TRAIN) % 11)
  with pytest.raises(errors.DataError, match="labels out of range: found"
                     " values 0..10, expected 0..9"):
    multibench.load(_cfg(tmp_path))


def test_count_mismatch(tmp_path):
  _write_fixture(tmp_path)
  np.save(tmp_path / "train_labels.npy", np.zeros(59, np.int64))
  with pytest.raises(errors.DataError, match="sample counts differ: image 60,"
                     " audio 60, labels 59"):
    multibench.load(_cfg(tmp_path))


def test_missing_and_truncated(tmp_path):
  _write_fixture(tmp_path)
  os.remove(tmp_path / "audio" / "test_data.npy")
  with pytest.raises(errors.DataError, match="test_data.npy is missing"):
    multibench.load(_cfg(tmp_path))
  _write_fixture(tmp_path / "t")
  p = tmp_path / "t" / "audio" / "train_data.npy"
  p.write_bytes(p.read_bytes()[:5000])
  with pytest.raises(errors.DataError, match="not a readable .npy array"):
    multibench.load(_cfg(tmp_path / "t"))


def test_bad_num_val(tmp_path):
  _write_fixture(tmp_path)
  with pytest.raises(errors.ConfigError, match="num_val=60 must be in 1..59"):
    multibench.load(_cfg(tmp_path, num_val=60))
