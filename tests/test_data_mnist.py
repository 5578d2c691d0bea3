"""Tests of the MNIST IDX reader: hand-written bytes and the real files."""

import gzip
import os
import struct

import numpy as np
import pytest

from g2d_jax import errors
from g2d_jax.data import mnist
from tests.conftest import DATA_DIR


def _idx_images(images: np.ndarray) -> bytes:
  n, h, w = images.shape
  return struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels) -> bytes:
  return struct.pack(">II", 2049, len(labels)) + bytes(labels)


def test_parse_images_hand_written():
  data = (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x02"
          + b"\x00\x00\x00\x03" + bytes(range(12)))
  arr = mnist.parse_idx(data, expected_magic=2051)
  assert arr.shape == (2, 2, 3) and arr.dtype == np.uint8
  assert arr[1, 0].tolist() == [6, 7, 8]
  assert arr[0, 1, 2] == 5


def test_parse_labels_hand_written():
  arr = mnist.parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x04\x07\x00\x09\x01",
                        expected_magic=2049, expected_shape=(4,))
  assert arr.tolist() == [7, 0, 9, 1]


@pytest.mark.parametrize("data, match", [
    (b"\x00\x00", "too short for an IDX header"),
    (b"\x00\x00\x08\x01\x00\x00", "truncated inside its header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02",
     "is truncated: expected 13 bytes, got 10"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "longer than declared"),
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "not a uint8 IDX file"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00",
     "not a uint8 IDX file"),
])
def test_parse_rejects_bad_bytes(data, match):
  with pytest.raises(errors.DataError, match=match) as e:
    mnist.parse_idx(data, "x-idx1-ubyte")
  assert "python -m g2d_jax.data.download" in str(e.value)


def test_parse_rejects_swapped_magic_and_shape():
  labels = _idx_labels([1, 2, 3])
  with pytest.raises(errors.DataError, match="magic 2049, expected 2051"):
    mnist.parse_idx(labels, "f", expected_magic=2051)
  with pytest.raises(errors.DataError,
                     match=r"declares shape \(3,\), expected"):
    mnist.parse_idx(labels, "f", expected_shape=(4,))


def test_truncated_gz_names_size_and_fix(tmp_path):
  payload = _idx_images(np.zeros((50, 28, 28)))
  gz = gzip.compress(payload)
  path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
  path.parent.mkdir()
  path.write_bytes(gz[: len(gz) // 2])
  with pytest.raises(errors.DataError) as e:
    mnist.read_idx_file(str(path), 2051)
  msg = str(e.value)
  assert ("train-images-idx3-ubyte.gz is truncated: expected 47,040,016"
          " bytes") in msg
  assert f"python -m g2d_jax.data.download --dest {tmp_path}" in msg


def test_raw_and_gz_read_equal(tmp_path):
  imgs = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
  (tmp_path / "a").write_bytes(_idx_images(imgs))
  (tmp_path / "b.gz").write_bytes(gzip.compress(_idx_images(imgs)))
  a = mnist.read_idx_file(str(tmp_path / "a"), 2051, (2, 28, 28))
  b = mnist.read_idx_file(str(tmp_path / "b.gz"), 2051, (2, 28, 28))
  np.testing.assert_array_equal(a, imgs)
  np.testing.assert_array_equal(b, imgs)


def test_missing_file_message(tmp_path):
  with pytest.raises(errors.DataError, match="is missing; re-download"):
    mnist.read_idx_file(str(tmp_path / "nope.gz"))


def test_label_out_of_range(tmp_path):
  d = tmp_path / "mnist"
  d.mkdir()
  (d / "train-images-idx3-ubyte").write_bytes(
      _idx_images(np.zeros((60000, 28, 28), np.uint8)))
  (d / "train-labels-idx1-ubyte").write_bytes(_idx_labels([3] * 59999 + [12]))
  with pytest.raises(errors.DataError, match="label 12 outside 0..9"):
    mnist.load_mnist(str(d))


def test_real_mnist_headers_and_class_counts():
  d = mnist.load_mnist(os.path.join(DATA_DIR, "mnist"))
  assert d["train"][0].shape == (60000, 28, 28)
  assert d["test"][0].shape == (10000, 28, 28)
  np.testing.assert_array_equal(
      np.bincount(d["train"][1]),
      [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
  np.testing.assert_array_equal(
      np.bincount(d["test"][1]),
      [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
