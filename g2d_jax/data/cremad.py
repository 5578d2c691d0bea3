"""CREMA-D in the layout read by the official G2D (and OGM-GE) code.

Users bring the data; nothing of CREMA-D ships with this library. Layout under
`root` = `<data_dir>/<subdir>` (every name is a config field; relative names
are resolved against `root`, absolute ones are used as given):

  train.csv                 `<clip id>,<label>` per row, no header, e.g.
                            `1088_IOM_NEU_XX,NEU` (OGM-GE / G2D split files,
                            6698 rows; a UTF-8 byte-order mark is accepted)
  test.csv                  the same for the test set (744 rows)
  AudioWAV/<clip id>.wav    the CREMA-D audio (16 kHz mono PCM in the release)
  Image-01-FPS/<clip id>/   1-fps JPEG frames `{frame index:05d}.jpg`, as
                            written by the official data/CREMAD/
                            video_preprocessing.py from VideoFlash/*.flv

Classes: NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, ANG 5 (official `class_dict`).
As in the official loader a CSV row is kept only if both its wav file and its
frame folder exist; skipped rows are counted in the log. An unknown label is
an error (the official code raises a KeyError).

Audio (official `CremadDataset.__getitem__`): load at 22050 Hz (mono: channels
averaged), `np.tile(x, 3)[:66150]` (3 s, looping short clips), clip to
[-1, 1], STFT with n_fft 512, hop 353, periodic Hann window of 512, centred
frames (`center=True`, the signal padded by n_fft // 2 on both sides), then
`log(|S| + 1e-7)`: float32 [257 frequency bins, 188 frames], stored as
[N, 257, 188, 1]. No normalisation (the official code has it commented out).

Visual: the frame folder's image files (.jpg/.jpeg/.png) in sorted name order;
frame `files[i]` for i in `np.random.RandomState(999).choice(n, size=1,
replace=False)`, the official `np.random.seed(999); np.random.choice(...)`
inside `__getitem__` without touching the global NumPy state. The choice
depends only on the frame count (n = 1..8 gives 0, 1, 1, 2, 3, 2, 3, 3). The
frame is converted to RGB, resized to 224 x 224 with PIL's bilinear filter
(torchvision's `Resize((224, 224))` on a PIL image does exactly this) and
stored as uint8; the model input is `(x / 255 - mean) / std` with the
ImageNet mean and std (`ToTensor` + `Normalize`), applied on read by
`NormalizedImages`. Shape [N, T=1, 224, 224, 3].

Splits: test = the kept rows of test.csv. The official code has no validation
set; here `val` is carved out of the kept train.csv rows, per class: a
permutation seeded by `val_seed` sends round(val_fraction * n_class) of each
class's rows to val (default 0.1: about 670 clips, the paper's 669). Train and
val keep CSV order.

Storage: `storage="cache"` (default) builds every split once into
`<cache_dir>/cremad/<key>/` (float32 spectrograms, uint8 frames, labels, clip
ids, a manifest; written to a temp directory and renamed when complete, then
opened with `mmap_mode="r"`), so a run does not hold 2.5 GB in RAM. The key
hashes the build settings and the identity of every source file used (path,
size, mtime). `storage="on_demand"` computes a sample when it is read (no disk
use, slower per step); both give identical values.

Deviations from the official code:
- Resampling to 22050 Hz uses scipy's polyphase filter (`resample_poly`);
  librosa 0.10 uses soxr. CREMA-D's 16 kHz audio is always resampled, so the
  spectrograms differ slightly (a different anti-aliasing filter).
- The STFT is computed in float64 and rounded to float32 (librosa: float32).
- The centre padding mode is a config field, `stft_pad_mode`: "constant"
  (zeros; the default of librosa >= 0.10, current when G2D was released) or
  "reflect" (librosa < 0.10). It changes only the first and last frames.
- No train-time augmentation. The official train transform is
  RandomResizedCrop(224) + RandomHorizontalFlip; here every split uses the
  deterministic test transform, because teacher outputs are precomputed per
  sample index (DESIGN section 2) and samples must not change between reads.
- Clips shorter than 1 s are tiled as often as needed to fill 3 s (the
  official `np.tile(x, 3)` would give a shorter array and fail at batching).
- Non-image files in a frame folder are ignored (the official code counts
  every entry); an existing frame folder without frames is an error unless
  `skip_empty_frame_folders` is set.

The helpers `NormalizedImages`, `LazySamples`, `materialize`, `log_stft`,
`read_wav_mono`, `load_rgb`, `official_frame_choice`, `list_frames` and
`carve_validation` are shared with the VGGSound and MIS-ME loaders.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import struct
import time
import warnings
from typing import Callable, Sequence

from absl import logging
import ml_collections
import numpy as np
import scipy.io.wavfile

from g2d_jax import errors
from g2d_jax.data import audio as audio_lib
from g2d_jax.data import base
from g2d_jax.data import cache

NAME = "cremad"
# Bump whenever the code changes the built bytes, so stale caches are rebuilt.
RECIPE_VERSION = 1
MODALITIES = ("audio", "visual")
CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
NUM_CLASSES = len(CLASSES)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LOG_EPS = 1e-7
PAD_MODES = ("constant", "reflect")
STORAGES = ("cache", "on_demand")

# Fields that do not change the samples (not part of the key / fingerprint).
NON_BUILD_FIELDS = ("name", "data_dir", "subdir", "cache_dir", "storage",
                    "build_threads", "train_csv", "test_csv", "audio_dir",
                    "visual_dir")


def default_config() -> ml_collections.ConfigDict:
  """Settings of the CREMA-D loader (official G2D recipe by default)."""
  cfg = ml_collections.ConfigDict()
  cfg.name = NAME
  # Folder holding `subdir`; empty means the G2D_DATA_DIR variable.
  cfg.data_dir = ""
  cfg.subdir = "cremad"
  # Split files and media folders, relative to <data_dir>/<subdir> or
  # absolute.
  cfg.train_csv = "train.csv"
  cfg.test_csv = "test.csv"
  cfg.audio_dir = "AudioWAV"
  cfg.visual_dir = "Image-01-FPS"
  # "cache": build once into a memory-mapped cache; "on_demand": compute a
  # sample when it is read. Both give identical values.
  cfg.storage = "cache"
  # Root of the built-array cache; empty means $G2D_CACHE_DIR, else
  # ~/.cache/g2d_jax.
  cfg.cache_dir = ""
  # Threads used to build the cache (0: min(8, CPU count)); speed only.
  cfg.build_threads = 0
  # Validation = this fraction of each class's kept train.csv rows.
  cfg.val_fraction = 0.1
  cfg.val_seed = 0
  # If > 0, keep only the first N samples of each split (tests, smoke runs).
  cfg.max_examples_per_split = 0

  # --- audio (official values) ---
  cfg.sample_rate = 22050
  cfg.num_samples = 66150           # 3 s at 22050 Hz
  cfg.n_fft = 512
  cfg.hop_length = 353
  # Centre padding of the STFT: "constant" (librosa >= 0.10) or "reflect"
  # (librosa < 0.10).
  cfg.stft_pad_mode = "constant"

  # --- visual (official values) ---
  cfg.num_frames = 1                # frames per clip (official: 1)
  cfg.frame_seed = 999              # seed of the official choice trick
  cfg.image_size = 224
  # An existing frame folder without images: False raises, True drops the
  # sample (like a missing folder).
  cfg.skip_empty_frame_folders = False
  return cfg


# ----------------------------------------------------------------------------
# Shared helpers (also used by vggsound.py and misme.py).


class LazySamples:
  """Read-only array-like [N, *shape] whose rows are computed when read.

  `x[i]` calls `fn(i)`; `x[idx]` for an integer array or slice stacks the
  rows. This is the `storage="on_demand"` backend: `Split.batch` only indexes
  its inputs, so a batch costs the samples it holds.
  """

  def __init__(self, fn: Callable[[int], np.ndarray], n: int,
               shape: Sequence[int], dtype):
    self._fn = fn
    self.shape = (int(n), *(int(d) for d in shape))
    self.dtype = np.dtype(dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def _row(self, i: int) -> np.ndarray:
    n = self.shape[0]
    if not -n <= i < n:
      raise IndexError(f"index {i} out of range for {n} samples")
    row = np.asarray(self._fn(int(i) % n))
    if row.shape != self.shape[1:]:
      raise errors.DataError(
          f"sample {i} has shape {row.shape}, expected {self.shape[1:]}; the"
          " source file is malformed")
    return row.astype(self.dtype, copy=False)

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self._row(int(key))
    if isinstance(key, slice):
      idx = np.arange(self.shape[0])[key]
    else:
      idx = np.asarray(key)
      if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"LazySamples supports an int, a slice or a 1-D int"
                        f" array as index, got {key!r}")
    out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
    for j, i in enumerate(idx):
      out[j] = self._row(int(i))
    return out

  def __array__(self, dtype=None, copy=None):
    del copy
    arr = self[np.arange(self.shape[0])]
    return arr if dtype is None else arr.astype(dtype)


class NormalizedImages:
  """uint8 RGB images [N, ..., 3] read as float32 `(x / 255 - mean) / std`.

  The torchvision `ToTensor()` + `Normalize(mean, std)` of the official
  loaders, applied on read so the storage stays uint8 (4x smaller). Use
  scale 1.0 for such a modality in `Split.scales`.
  """

  def __init__(self, images, mean: Sequence[float], std: Sequence[float]):
    if images.shape[-1] != 3:
      raise errors.DataError(
          f"NormalizedImages expects RGB images [..., 3], got {images.shape}")
    self._images = images
    self._mean = np.asarray(mean, np.float32)
    self._std = np.asarray(std, np.float32)
    self.shape = tuple(images.shape)
    self.dtype = np.dtype(np.float32)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def raw(self):
    """The underlying uint8 images."""
    return self._images

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    x = np.asarray(self._images[key]).astype(np.float32) / np.float32(255.0)
    return (x - self._mean) / self._std

  def __array__(self, dtype=None, copy=None):
    del copy
    arr = self[np.arange(self.shape[0])]
    return arr if dtype is None else arr.astype(dtype)


def read_wav_mono(path: str, sample_rate: int | None = None) -> np.ndarray:
  """Reads a PCM/float WAV file as float64 mono, like `librosa.load`.

  Integer PCM is scaled to [-1, 1) (int16 / 32768, ...), channels are
  averaged (librosa's `mono=True`), and the signal is resampled to
  `sample_rate` with scipy's polyphase filter if the file has another rate.

  Raises:
    DataError: the file is missing, unreadable, empty or of an unsupported
      sample type.
  """
  if not os.path.exists(path):
    raise errors.DataError(f"{path} is missing; restore the audio file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)
      sr, x = scipy.io.wavfile.read(path)
  except (ValueError, OSError, EOFError, struct.error) as e:
    raise errors.DataError(
        f"{path} is not a readable WAV file ({e}); it is truncated or not PCM"
        " audio: replace it (e.g. ffmpeg -i VIDEO -acodec pcm_s16le OUT.wav)"
    ) from None
  if x.dtype == np.int16:
    x = x.astype(np.float64) / 32768.0
  elif x.dtype == np.int32:
    x = x.astype(np.float64) / 2147483648.0
  elif x.dtype == np.uint8:
    x = (x.astype(np.float64) - 128.0) / 128.0
  elif np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float64)
  else:
    raise errors.DataError(f"{path} has unsupported sample type {x.dtype};"
                           " convert it to 16-bit PCM")
  if x.ndim == 2:
    x = x.mean(axis=1)
  if x.size == 0:
    raise errors.DataError(f"{path} holds no samples; replace the file")
  if sample_rate is not None and int(sr) != int(sample_rate):
    x = audio_lib.resample(x, int(sr), int(sample_rate))
  return x


def log_stft(x: np.ndarray, n_fft: int, hop_length: int,
             pad_mode: str = "constant") -> np.ndarray:
  """`log(|STFT| + 1e-7)` of a centred STFT, as `librosa.stft` defaults.

  Args:
    x: [T] waveform.
    n_fft: frame and FFT length (window length too).
    hop_length: frame step.
    pad_mode: "constant" (zeros) or "reflect": how the signal is padded by
      n_fft // 2 on both sides (librosa's `center=True`).

  Returns:
    float32 [n_fft // 2 + 1, 1 + T // hop_length] (frequency, time); frame j
    is centred on sample j * hop_length, periodic Hann window.
  """
  if pad_mode not in PAD_MODES:
    raise errors.ConfigError(
        f"stft_pad_mode={pad_mode!r} must be one of {PAD_MODES}")
  half = n_fft // 2
  padded = np.pad(np.asarray(x, np.float64), half, mode=pad_mode)
  spec = audio_lib.stft(padded, n_fft, hop_length)
  return np.log(np.abs(spec) + LOG_EPS).T.astype(np.float32)


def load_rgb(path: str, size: int) -> np.ndarray:
  """Opens an image as RGB and resizes it to size x size (PIL bilinear).

  This is torchvision's `Resize((size, size))` on a PIL image.

  Returns:
    uint8 [size, size, 3].

  Raises:
    DataError: Pillow is missing, or the file is missing or not an image.
  """
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.DataError(
        "reading frames needs Pillow: pip install pillow (it is installed"
        " with matplotlib)") from None
  try:
    with Image.open(path) as img:
      img = img.convert("RGB").resize((size, size), Image.BILINEAR)
      return np.asarray(img, dtype=np.uint8)
  except FileNotFoundError:
    raise errors.DataError(f"{path} is missing; restore the frame") from None
  except OSError as e:
    raise errors.DataError(
        f"{path} is not a readable image ({e}); re-extract the frames of this"
        " clip") from None


def list_frames(folder: str) -> list[str]:
  """Image file names (.jpg/.jpeg/.png) of a frame folder, sorted by name."""
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS))


def official_frame_choice(num_frames: int, size: int,
                          seed: int = 999) -> np.ndarray:
  """Frame indices of the official `np.random.seed(seed); np.random.choice(
  num_frames, size=size, replace=False)`, without the global NumPy state.

  Raises:
    DataError: fewer frames than requested.
  """
  if num_frames < size:
    raise errors.DataError(
        f"a frame folder has {num_frames} frames but {size} are needed")
  return np.random.RandomState(seed).choice(num_frames, size=size,
                                            replace=False)


def carve_validation(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Stratified train/val split of a training list.

  Per class, a permutation seeded by `seed` puts round(fraction * n_class) of
  the class's samples into val.

  Returns:
    (train indices, val indices), each sorted (original order kept).
  """
  rng = np.random.default_rng(seed)
  val = []
  labels = np.asarray(labels)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    val.append(idx[:int(round(fraction * len(idx)))])
  val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
  train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
  return train_idx, val_idx


def file_identity(path: str, root: str) -> str:
  """`relative path|size|mtime_ns` of a source file (for cache keys)."""
  st = os.stat(path)
  return f"{os.path.relpath(path, root)}|{st.st_size}|{st.st_mtime_ns}"


def resolve_path(root: str, name: str) -> str:
  """`name` if absolute, else `root/name`."""
  return os.path.join(root, os.path.expanduser(name))


def check_common_config(cfg) -> None:
  """Validates the storage, split and size fields shared by the loaders."""
  if cfg.storage not in STORAGES:
    raise errors.ConfigError(
        f"config.data.storage={cfg.storage!r} must be one of {STORAGES}")
  if "val_fraction" in cfg and not 0.0 < cfg.val_fraction < 1.0:
    raise errors.ConfigError(
        f"config.data.val_fraction={cfg.val_fraction} must be in (0, 1): the"
        " validation split is carved out of the training rows")
  if cfg.max_examples_per_split < 0:
    raise errors.ConfigError(
        f"config.data.max_examples_per_split={cfg.max_examples_per_split}"
        " must be >= 0 (0 keeps every sample)")
  if cfg.build_threads < 0:
    raise errors.ConfigError(
        f"config.data.build_threads={cfg.build_threads} must be >= 0")
  if "image_size" in cfg and cfg.image_size < 1:
    raise errors.ConfigError(
        f"config.data.image_size={cfg.image_size} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Reader:
  """How one modality's samples are made: `fn(i)` -> array `shape`, `dtype`."""
  fn: Callable[[int], np.ndarray]
  shape: tuple[int, ...]
  dtype: str


@dataclasses.dataclass(frozen=True)
class SplitPlan:
  """One split to materialise: per-modality readers, labels and sample ids."""
  readers: dict[str, Reader]
  labels: np.ndarray
  ids: list[str]


def _threads(requested: int) -> int:
  return requested or min(8, os.cpu_count() or 1)


def _write_split(out_dir: str, name: str, split: str, plan: SplitPlan,
                 threads: int) -> None:
  """Writes labels, ids and one .npy per modality of a split (threaded)."""
  os.makedirs(os.path.join(out_dir, split))
  n = len(plan.labels)
  np.save(os.path.join(out_dir, split, "labels.npy"), plan.labels)
  with open(os.path.join(out_dir, split, "ids.txt"), "w") as f:
    f.write("".join(i + "\n" for i in plan.ids))
  outs = {m: np.lib.format.open_memmap(
      os.path.join(out_dir, split, f"{m}.npy"), mode="w+", dtype=r.dtype,
      shape=(n, *r.shape)) for m, r in plan.readers.items()}

  def make(i: int) -> int:
    for m, r in plan.readers.items():
      row = np.asarray(r.fn(i))
      if row.shape != r.shape:
        raise errors.DataError(
            f"{name}: sample {plan.ids[i]} ({m}) has shape {row.shape},"
            f" expected {r.shape}")
      outs[m][i] = row
    return i

  t0 = last = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for done, _ in enumerate(pool.map(make, range(n)), start=1):
      now = time.monotonic()
      if now - last >= 10.0 or done == n:
        last = now
        logging.info("%s build: %s %d/%d (%.1f samples/s)", name, split,
                     done, n, done / max(now - t0, 1e-9))
  for arr in outs.values():
    arr.flush()


def _open_split(build_dir: str, split: str, plan: SplitPlan, task: str,
                fix: str) -> dict[str, np.ndarray]:
  """Opens a built split read-only and checks it against the plan."""
  n = len(plan.labels)
  arrays = {}
  try:
    for m, r in plan.readers.items():
      arr = np.load(os.path.join(build_dir, split, f"{m}.npy"), mmap_mode="r")
      if arr.shape != (n, *r.shape) or arr.dtype != np.dtype(r.dtype):
        raise errors.DataError(
            f"{split}/{m}.npy has shape {arr.shape} {arr.dtype}, expected"
            f" {(n, *r.shape)} {r.dtype}; {fix}")
      arrays[m] = arr
    labels = np.load(os.path.join(build_dir, split, "labels.npy"))
  except (OSError, ValueError) as e:
    raise errors.DataError(f"cache {build_dir} is damaged ({e}); {fix}"
                           ) from None
  if (labels.shape != (n,) or base.label_sha256(labels, task)
      != base.label_sha256(plan.labels, task)):
    raise errors.DataError(
        f"cache {build_dir}: {split}/labels.npy does not match the data;"
        f" {fix}")
  return arrays


def materialize(name: str, plans: dict[str, SplitPlan], *, storage: str,
                cache_dir: str, settings: dict, sources: str, task: str,
                build_threads: int = 0) -> tuple[dict, str]:
  """Turns split plans into per-split input arrays.

  Args:
    name: dataset name (cache sub-folder and log prefix).
    plans: split -> `SplitPlan`.
    storage: "cache" (build once, open read-only memmaps) or "on_demand"
      (`LazySamples` computing each row when read).
    cache_dir: cache root from the config (may be empty).
    settings: JSON-able build settings (part of the key).
    sources: identity hash of the source files (part of the key).
    task: "classification" or "regression" (label hashing).
    build_threads: worker threads of the build (0: automatic).

  Returns:
    ({split: {modality: array-like}}, key).

  Raises:
    DataError: a source is malformed or an existing cache is damaged.
  """
  key = cache.settings_hash({"settings": settings, "sources": sources,
                             "splits": {s: base.label_sha256(p.labels, task)
                                        for s, p in plans.items()}})[:20]
  if storage == "on_demand":
    return {s: {m: LazySamples(r.fn, len(p.labels), r.shape, r.dtype)
                for m, r in p.readers.items()}
            for s, p in plans.items()}, key
  root = os.path.join(base.resolve_cache_dir(cache_dir), name)
  final = os.path.join(root, key)
  manifest_path = os.path.join(final, "manifest.json")
  if not os.path.exists(manifest_path):
    with cache.file_lock(os.path.join(root, f".{key}.lock")):
      if not os.path.exists(manifest_path):
        if os.path.exists(final):
          raise errors.DataError(
              f"{final} exists but has no manifest (not written by this"
              " library's atomic build); delete it and run again")
        cache.remove_stale_tmp(final)
        logging.info("%s build: %s -> %s", name, settings, final)
        t0 = time.monotonic()
        with cache.atomic_directory(final) as tmp:
          for s, plan in plans.items():
            _write_split(tmp, name, s, plan, _threads(build_threads))
          cache.write_json(os.path.join(tmp, "manifest.json"), {
              "format": f"g2d_jax.{name}",
              "key": key,
              "settings": settings,
              "sources_sha256": sources,
              "split_sizes": {s: len(p.labels) for s, p in plans.items()},
              "shapes": {m: list(r.shape) for m, r in
                         next(iter(plans.values())).readers.items()},
              "build_seconds": round(time.monotonic() - t0, 2),
              "created": datetime.datetime.now(
                  datetime.timezone.utc).isoformat(),
              "complete": True,
          })
  fix = f"delete {final} and run again to rebuild it"
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.DataError(f"cache {final} has no readable manifest ({e});"
                           f" {fix}") from None
  if not manifest.get("complete") or manifest.get("key") != key:
    raise errors.DataError(f"cache {final} is incomplete or belongs to other"
                           f" settings; {fix}")
  return {s: _open_split(final, s, p, task, fix)
          for s, p in plans.items()}, key


def cap(items: Sequence, max_examples: int) -> list:
  """The first `max_examples` items (all if 0)."""
  items = list(items)
  return items[:max_examples] if max_examples else items


# ----------------------------------------------------------------------------
# CREMA-D.


@dataclasses.dataclass(frozen=True)
class Sample:
  """One kept CREMA-D clip: id, label, wav path and chosen frame paths."""
  clip_id: str
  label: int
  wav: str
  frames: tuple[str, ...]


def validate_config(cfg) -> None:
  """Raises ConfigError for a bad setting."""
  check_common_config(cfg)
  if cfg.stft_pad_mode not in PAD_MODES:
    raise errors.ConfigError(
        f"config.data.stft_pad_mode={cfg.stft_pad_mode!r} must be one of"
        f" {PAD_MODES} (librosa >= 0.10 pads with zeros, older versions"
        " reflect)")
  for field in ("sample_rate", "num_samples", "n_fft", "hop_length",
                "num_frames"):
    if cfg[field] < 1:
      raise errors.ConfigError(f"config.data.{field}={cfg[field]} must be >= 1")


def root_dir(cfg) -> str:
  """`<data_dir>/<subdir>`, checked to exist."""
  data_dir = base.resolve_data_dir(cfg.data_dir)
  root = resolve_path(data_dir, cfg.subdir)
  if not os.path.isdir(root):
    raise errors.DataError(
        f"CREMA-D folder {root} is missing: put train.csv, test.csv,"
        f" {cfg.audio_dir}/ and {cfg.visual_dir}/ there, or point"
        " config.data.data_dir / config.data.subdir at your copy")
  return root


def read_split_csv(path: str) -> list[tuple[str, int]]:
  """Reads an OGM-GE / G2D split file: rows `<clip id>,<label>`.

  Raises:
    DataError: the file is missing, a row is malformed or a label unknown.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: it is the OGM-GE / G2D split file"
        " (data/CREMAD/train.csv and test.csv of the official code); put it"
        " there or set config.data.train_csv / test_csv")
  rows = []
  class_ids = {c: i for i, c in enumerate(CLASSES)}
  with open(path, encoding="utf-8-sig", newline="") as f:
    for line_no, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip():
        continue
      if len(row) < 2:
        raise errors.DataError(
            f"{path} line {line_no}: expected `<clip id>,<label>`, got"
            f" {row!r}")
      clip_id, label = row[0].strip(), row[1].strip()
      if label not in class_ids:
        raise errors.DataError(
            f"{path} line {line_no}: unknown label {label!r} for clip"
            f" {clip_id!r}; CREMA-D labels are {list(CLASSES)}: fix the row"
            " or use the official split file")
      rows.append((clip_id, class_ids[label]))
  if not rows:
    raise errors.DataError(f"{path} has no rows; use the official split file")
  return rows


def list_samples(cfg) -> tuple[dict[str, list[Sample]], str]:
  """Kept samples of train.csv ("train") and test.csv ("test").

  Returns:
    ({"train": [...], "test": [...]}, sha256 identity of every source used).

  Raises:
    DataError: a split file or media folder is missing, an empty frame
      folder (unless skipped), or no sample of a split has both files.
  """
  root = root_dir(cfg)
  audio_dir = resolve_path(root, cfg.audio_dir)
  visual_dir = resolve_path(root, cfg.visual_dir)
  for what, d, field in (("audio", audio_dir, "audio_dir"),
                         ("frame", visual_dir, "visual_dir")):
    if not os.path.isdir(d):
      raise errors.DataError(
          f"CREMA-D {what} folder {d} is missing: set config.data.{field} to"
          " the folder (relative to the CREMA-D folder or absolute)")
  h = hashlib.sha256()
  out = {}
  for part, csv_name in (("train", cfg.train_csv), ("test", cfg.test_csv)):
    path = resolve_path(root, csv_name)
    rows = read_split_csv(path)
    h.update(file_identity(path, root).encode())
    kept, missing, empty = [], 0, 0
    for clip_id, label in rows:
      wav = os.path.join(audio_dir, clip_id + ".wav")
      folder = os.path.join(visual_dir, clip_id)
      if not (os.path.exists(wav) and os.path.exists(folder)):
        missing += 1
        continue
      names = list_frames(folder)
      if len(names) < cfg.num_frames:
        if cfg.skip_empty_frame_folders:
          empty += 1
          continue
        raise errors.DataError(
            f"frame folder {folder} has {len(names)} frames, {cfg.num_frames}"
            " needed: re-extract the frames of this clip, or set"
            " config.data.skip_empty_frame_folders=True to drop such clips")
      chosen = official_frame_choice(len(names), cfg.num_frames,
                                     cfg.frame_seed)
      frames = tuple(os.path.join(folder, names[i]) for i in chosen)
      h.update(file_identity(wav, root).encode())
      h.update(("|".join(names)).encode())
      for p in frames:
        h.update(file_identity(p, root).encode())
      kept.append(Sample(clip_id, label, wav, frames))
    if missing or empty:
      logging.info("CREMA-D %s: kept %d of %d rows (%d without wav or frame"
                   " folder, %d with too few frames)", csv_name, len(kept),
                   len(rows), missing, empty)
    if not kept:
      raise errors.DataError(
          f"no row of {path} has both {audio_dir}/<id>.wav and"
          f" {visual_dir}/<id>/: check config.data.audio_dir and visual_dir")
    out[part] = kept
  return out, h.hexdigest()


def spectrogram(wav_path: str, cfg) -> np.ndarray:
  """The official CREMA-D log spectrogram of one clip: float32 [F, T, 1]."""
  x = read_wav_mono(wav_path, cfg.sample_rate)
  reps = max(3, math.ceil(cfg.num_samples / len(x)))
  x = np.clip(np.tile(x, reps)[:cfg.num_samples], -1.0, 1.0)
  return log_stft(x, cfg.n_fft, cfg.hop_length, cfg.stft_pad_mode)[..., None]


def audio_shape(cfg) -> tuple[int, int, int]:
  """[frequency bins, frames, 1] of the spectrogram ((257, 188, 1))."""
  return (cfg.n_fft // 2 + 1, 1 + cfg.num_samples // cfg.hop_length, 1)


def frames_array(paths: Sequence[str], size: int) -> np.ndarray:
  """uint8 [T, size, size, 3] of the given frames, in order."""
  return np.stack([load_rgb(p, size) for p in paths])


def build_settings(cfg) -> dict:
  """Every setting that changes the samples (JSON-able)."""
  settings = {k: base.to_jsonable(v) for k, v in cfg.items()
              if k not in NON_BUILD_FIELDS}
  settings["recipe_version"] = RECIPE_VERSION
  return settings


def load(cfg) -> base.MultimodalDataset:
  """Loads CREMA-D (see the module docstring for layout and recipe).

  Inputs: audio float32 [N, 257, 188, 1] (scale 1), visual float32
  [N, 1, 224, 224, 3] ImageNet-normalised on read (uint8 underneath).

  Raises:
    ConfigError: a bad setting.
    DataError: missing or malformed files, unknown labels.
  """
  validate_config(cfg)
  samples, sources = list_samples(cfg)
  labels_train = np.array([x.label for x in samples["train"]], np.int32)
  tr, va = carve_validation(labels_train, cfg.val_fraction, cfg.val_seed)
  chosen = {"train": [samples["train"][i] for i in tr],
            "val": [samples["train"][i] for i in va],
            "test": samples["test"]}
  chosen = {s: cap(v, cfg.max_examples_per_split) for s, v in chosen.items()}
  shape_a = audio_shape(cfg)
  shape_v = (cfg.num_frames, cfg.image_size, cfg.image_size, 3)
  plans = {}
  for s in base.SPLIT_NAMES:
    items = chosen[s]
    plans[s] = SplitPlan(
        readers={
            "audio": Reader(lambda i, items=items: spectrogram(items[i].wav,
                                                               cfg),
                            shape_a, "float32"),
            "visual": Reader(lambda i, items=items: frames_array(
                items[i].frames, cfg.image_size), shape_v, "uint8"),
        },
        labels=np.array([x.label for x in items], np.int32),
        ids=[x.clip_id for x in items])
  settings = build_settings(cfg)
  arrays, key = materialize(NAME, plans, storage=cfg.storage,
                            cache_dir=cfg.cache_dir, settings=settings,
                            sources=sources, task="classification",
                            build_threads=cfg.build_threads)
  splits = {
      s: base.Split(
          inputs={"audio": arrays[s]["audio"],
                  "visual": NormalizedImages(arrays[s]["visual"],
                                             IMAGENET_MEAN, IMAGENET_STD)},
          labels=plans[s].labels, scales={"audio": 1.0, "visual": 1.0})
      for s in base.SPLIT_NAMES}
  fingerprint = base.make_fingerprint(NAME, settings, splits,
                                      "classification")
  fingerprint["sources"] = sources
  fingerprint["build_key"] = key
  return base.MultimodalDataset(
      name=NAME, modalities=MODALITIES, splits=splits,
      num_classes=NUM_CLASSES, task="classification", fingerprint=fingerprint)
