"""Reader for MultiBench's AV-MNIST `.npy` layout (the data the paper used).

Layout under `root` (as read by the official G2D and MultiBench loaders):

  image/train_data.npy   [60000, 784] or [60000, 28, 28]   pixel values 0..255
  image/test_data.npy    [10000, 784] or [10000, 28, 28]
  audio/train_data.npy   [60000, 112, 112]                 spectrogram 0..255
  audio/test_data.npy    [10000, 112, 112]
  train_labels.npy       [60000] class ids 0..9
  test_labels.npy        [10000]

Validation is the last `num_val` training samples (MultiBench: train[55000:]).
Arrays are opened with `mmap_mode="r"` and only reshaped (no copy) to
channels-last [N, 28, 28, 1] and [N, 112, 112, 1]. Both modalities are
divided by 255 (`pixel_scale`), as the official loader does, whatever their
storage dtype.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from g2d_jax import errors
from g2d_jax.data import base

NAME = "avmnist_multibench"
MODALITIES = ("audio", "image")
NUM_CLASSES = 10


def default_config() -> ml_collections.ConfigDict:
  """Settings of the MultiBench AV-MNIST reader."""
  cfg = ml_collections.ConfigDict()
  cfg.name = NAME
  # Folder with image/, audio/, train_labels.npy, test_labels.npy, or its
  # parent holding it as avmnist/; empty means the G2D_DATA_DIR variable.
  cfg.data_dir = ""
  # The last num_val training samples form the validation split.
  cfg.num_val = 5000
  # Model input = stored value * pixel_scale (MultiBench stores 0..255).
  cfg.pixel_scale = 1.0 / 255.0
  return cfg


def _load_npy(path: str, root: str) -> np.ndarray:
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: {root} must hold MultiBench's AV-MNIST layout"
        " (image/{train,test}_data.npy, audio/{train,test}_data.npy,"
        " {train,test}_labels.npy); fix config.data.data_dir, or use"
        " --config.data.name=avmnist to build AV-MNIST from MNIST and FSDD")
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise errors.DataError(
        f"{path} is not a readable .npy array ({e}); it is truncated or"
        " corrupt: replace it with an intact copy") from None
  if not isinstance(arr, np.ndarray):
    raise errors.DataError(f"{path} must hold one array, not an archive")
  if not (np.issubdtype(arr.dtype, np.integer)
          or np.issubdtype(arr.dtype, np.floating)):
    raise errors.DataError(
        f"{path} has dtype {arr.dtype}; expected uint8 or float pixel values")
  return arr


def _image(arr: np.ndarray, path: str) -> np.ndarray:
  if arr.ndim == 2 and arr.shape[1] == 784:
    return arr.reshape(arr.shape[0], 28, 28, 1)
  if arr.ndim == 3 and arr.shape[1:] == (28, 28):
    return arr.reshape(*arr.shape, 1)
  raise errors.DataError(
      f"{path} has shape {arr.shape}; expected [N, 784] or [N, 28, 28] images"
      " (MultiBench layout); is image/ swapped with audio/?")


def _audio(arr: np.ndarray, path: str) -> np.ndarray:
  if arr.ndim == 3 and arr.shape[1:] == (112, 112):
    return arr.reshape(*arr.shape, 1)
  raise errors.DataError(
      f"{path} has shape {arr.shape}; expected [N, 112, 112] spectrograms"
      " (MultiBench layout); is audio/ swapped with image/?")


def load(cfg) -> base.MultimodalDataset:
  """Opens MultiBench AV-MNIST arrays read-only.

  Raises:
    DataError: missing files, wrong shapes or dtypes, mismatched sample counts
      or labels outside 0..9.
  """
  base_dir = base.resolve_data_dir(cfg.data_dir)
  root = base_dir
  for cand in (base_dir, os.path.join(base_dir, "avmnist")):
    if os.path.isdir(os.path.join(cand, "image")):
      root = cand
      break
  parts = {}
  for part in ("train", "test"):
    paths = {m: os.path.join(root, m, f"{part}_data.npy") for m in MODALITIES}
    label_path = os.path.join(root, f"{part}_labels.npy")
    image = _image(_load_npy(paths["image"], root), paths["image"])
    audio_arr = _audio(_load_npy(paths["audio"], root), paths["audio"])
    labels = np.asarray(_load_npy(label_path, root))
    labels = base.check_labels(labels.reshape(-1) if labels.ndim == 2
                               and labels.shape[1] == 1 else labels,
                               NUM_CLASSES, label_path)
    n = len(labels)
    if image.shape[0] != n or audio_arr.shape[0] != n:
      raise errors.DataError(
          f"{part} sample counts differ: image {image.shape[0]}, audio"
          f" {audio_arr.shape[0]}, labels {n}; the files under {root} are"
          " from different versions or truncated")
    parts[part] = ({"audio": audio_arr, "image": image}, labels)
  n_train = len(parts["train"][1])
  if not 0 < cfg.num_val < n_train:
    raise errors.ConfigError(
        f"config.data.num_val={cfg.num_val} must be in 1..{n_train - 1} (the"
        f" training files hold {n_train} samples)")
  cut = n_train - cfg.num_val
  x_tr, y_tr = parts["train"]
  scales = dict.fromkeys(MODALITIES, float(cfg.pixel_scale))
  splits = {
      "train": base.Split({m: x_tr[m][:cut] for m in MODALITIES}, y_tr[:cut],
                          scales),
      "val": base.Split({m: x_tr[m][cut:] for m in MODALITIES}, y_tr[cut:],
                        scales),
      "test": base.Split(*parts["test"], scales),
  }
  settings = {"num_val": cfg.num_val, "pixel_scale": cfg.pixel_scale,
              "dtypes": {m: str(x_tr[m].dtype) for m in MODALITIES}}
  return base.MultimodalDataset(
      name=NAME, modalities=MODALITIES, splits=splits, num_classes=NUM_CLASSES,
      task="classification",
      fingerprint=base.make_fingerprint(NAME, settings, splits,
                                        "classification"))
