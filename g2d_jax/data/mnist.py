"""MNIST IDX reader with header validation.

IDX layout (big-endian): two zero bytes, a dtype code (0x08 = uint8), the
number of dimensions, one uint32 per dimension, then the raw values. Images
are magic 2051 (= 0x00000803, shape [n, 28, 28]); labels magic 2049
(= 0x00000801, shape [n]). Files may be gzip-compressed (`.gz`) or raw.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from g2d_jax import errors

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049

# name -> (magic, shape, uncompressed bytes, md5 of the uncompressed content).
FILES = {
    "train-images-idx3-ubyte": (IMAGE_MAGIC, (60000, 28, 28), 47040016,
                                "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (LABEL_MAGIC, (60000,), 60008,
                                "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (IMAGE_MAGIC, (10000, 28, 28), 7840016,
                               "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (LABEL_MAGIC, (10000,), 10008,
                               "27ae3e4e09519cfbb04c329615203637"),
}



def _fix(data_dir: str = "DATA_DIR") -> str:
  return f"re-download with python -m g2d_jax.data.download --dest {data_dir}"


def parse_idx(data: bytes, name: str = "IDX data",
              expected_magic: int | None = None,
              expected_shape: tuple[int, ...] | None = None,
              fix: str = "") -> np.ndarray:
  """Parses uint8 IDX bytes into an array, validating the header.

  Args:
    data: the uncompressed file content.
    name: file name used in error messages.
    expected_magic: if given, the required magic number (2051 or 2049).
    expected_shape: if given, the required shape.
    fix: how to fix a bad file, appended to error messages.

  Returns:
    A read-only uint8 array of the header's shape (a view of `data`).

  Raises:
    DataError: bad magic, unsupported dtype, wrong shape or truncated content.
  """
  fix = fix or _fix()
  if len(data) < 4:
    raise errors.DataError(
        f"{name} is truncated: {len(data)} bytes, too short for an IDX header;"
        f" {fix}")
  magic = struct.unpack(">I", data[:4])[0]
  zero, dtype_code, ndim = data[0:2], data[2], data[3]
  if zero != b"\x00\x00" or dtype_code != 0x08 or ndim < 1:
    raise errors.DataError(
        f"{name} is not a uint8 IDX file (magic {magic:#010x}, expected"
        f" {expected_magic or 2051} for images or 2049 for labels); it may be"
        f" corrupt or still compressed: {fix}")
  if expected_magic is not None and magic != expected_magic:
    raise errors.DataError(
        f"{name} has magic {magic}, expected {expected_magic}"
        f" ({'images' if expected_magic == IMAGE_MAGIC else 'labels'});"
        f" the file is swapped or corrupt: {fix}")
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise errors.DataError(
        f"{name} is truncated inside its header ({len(data)} of {header_len}"
        f" bytes); {fix}")
  shape = struct.unpack(f">{ndim}I", data[4:header_len])
  if expected_shape is not None and tuple(shape) != tuple(expected_shape):
    raise errors.DataError(
        f"{name} declares shape {tuple(shape)}, expected"
        f" {tuple(expected_shape)}; {fix}")
  expected_len = header_len + int(np.prod(shape, dtype=np.int64))
  if len(data) != expected_len:
    what = "truncated" if len(data) < expected_len else "longer than declared"
    raise errors.DataError(
        f"{name} is {what}: expected {expected_len:,} bytes, got"
        f" {len(data):,}; {fix}")
  arr = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)
  return arr


def read_idx_file(path: str, expected_magic: int | None = None,
                  expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Reads a raw or gzip-compressed IDX file; see `parse_idx`.

  Raises:
    DataError: the file is missing, not valid gzip, or fails `parse_idx`.
  """
  base = os.path.basename(path)
  # Files live in DATA_DIR/mnist/, so the downloader's --dest is two up.
  fix = _fix(os.path.dirname(os.path.dirname(os.path.abspath(path))))
  if not os.path.exists(path):
    raise errors.DataError(f"{path} is missing; {fix}")
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    data, complete, err = gunzip(raw)
    if not complete:
      expected = FILES.get(base[:-3] if base.endswith(".gz") else base)
      if err:
        raise errors.DataError(
            f"{base} is corrupt (gzip error: {err}); {fix}")
      if expected is not None:
        detail = (f"expected {expected[2]:,} bytes, got {len(data):,} before"
                  " the compressed stream ends")
      else:
        detail = f"the compressed stream ends after {len(data):,} bytes"
      raise errors.DataError(f"{base} is truncated: {detail}; {fix}")
  else:
    data = raw
  return parse_idx(data, base, expected_magic, expected_shape, fix)


def gunzip(raw: bytes) -> tuple[bytes, bool, str]:
  """Decompresses gzip bytes as far as they go.

  Returns:
    (data, complete, error): the bytes recovered, whether every gzip member
    ended properly, and a zlib error message ("" if none).
  """
  chunks, complete = [], False
  while raw:
    d = zlib.decompressobj(wbits=31)
    try:
      chunks.append(d.decompress(raw))
    except zlib.error as e:
      return b"".join(chunks), False, str(e)
    complete = d.eof
    if not complete:
      return b"".join(chunks), False, ""
    # Some tools pad gzip files with zero bytes after the last member.
    raw = d.unused_data.lstrip(b"\x00")
  return b"".join(chunks), complete, ""


def find_file(mnist_dir: str, stem: str) -> str:
  """Returns the path of `stem` (.gz preferred, raw accepted) in `mnist_dir`."""
  for cand in (stem + ".gz", stem):
    path = os.path.join(mnist_dir, cand)
    if os.path.exists(path):
      return path
  return os.path.join(mnist_dir, stem + ".gz")


def load_mnist(mnist_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loads the four MNIST files from `mnist_dir`.

  Returns:
    {"train": (images uint8 [60000, 28, 28], labels uint8 [60000]),
     "test": (images uint8 [10000, 28, 28], labels uint8 [10000])}.

  Raises:
    DataError: a file is missing, truncated, corrupt or has a wrong header, or
      a label is outside 0..9.
  """
  out = {}
  for split, prefix in (("train", "train"), ("test", "t10k")):
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
      stem = f"{prefix}-{kind}"
      magic, shape, _, _ = FILES[stem]
      arrays.append(read_idx_file(find_file(mnist_dir, stem), magic, shape))
    labels = arrays[1]
    if labels.max() > 9:
      raise errors.DataError(
          f"{prefix}-labels-idx1-ubyte has label {int(labels.max())} outside"
          f" 0..9; the file is corrupt: "
          + _fix(os.path.dirname(os.path.abspath(mnist_dir))))
    out[split] = (arrays[0], labels)
  return out
