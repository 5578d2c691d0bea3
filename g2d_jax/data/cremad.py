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
                            video_preprocessing.py from VideoFlash/*.flv,
                            or by `python -m g2d_jax.data.prepare cremad`

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
- Train-time augmentation is off by default: every split uses the
  deterministic test transform, because teacher outputs are precomputed per
  sample (`pipeline.precompute`). The official train transform is
  RandomResizedCrop(224) + RandomHorizontalFlip, redrawn at every read;
  `config.data.augment_views=K` (K > 1) gives each training
  sample K cached views with the official train transform per frame
  (`clips.augmented_frames`: RandomResizedCrop + RandomHorizontalFlip,
  view v of sample i drawn from (augment_seed, i, v)); the teacher outputs
  are cached per view and the student reads view hash(seed, epoch, i) mod
  K in each epoch. Validation and test keep the deterministic transform.
- Clips shorter than 1 s are tiled as often as needed to fill 3 s (the
  official `np.tile(x, 3)` would give a shorter array and fail at batching).
- Non-image files in a frame folder are ignored (the official code counts
  every entry); an existing frame folder without frames is an error unless
  `skip_empty_frame_folders` is set.

The media helpers (`data.media`) and the build-once cache
(`data.materialize`) are shared with the VGGSound and MIS-ME loaders.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os

from absl import logging
import ml_collections
import numpy as np

from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import clips
from g2d_jax.data import media

NAME = "cremad"
# Bump whenever the code changes the built bytes, so stale caches are rebuilt.
RECIPE_VERSION = 1
MODALITIES = clips.MODALITIES
CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
NUM_CLASSES = len(CLASSES)

# Fields that do not change the samples (not part of the key / fingerprint).
NON_BUILD_FIELDS = base.LOCATION_FIELDS + ("train_csv", "test_csv",
                                           "audio_dir", "visual_dir")


def default_config() -> ml_collections.ConfigDict:
  """Settings of the CREMA-D loader (official G2D recipe by default)."""
  cfg = base.user_data_config(NAME, val_fraction=0.1)
  # Split files and media folders, relative to <data_dir>/<subdir> or
  # absolute.
  cfg.train_csv = "train.csv"
  cfg.test_csv = "test.csv"
  cfg.audio_dir = "AudioWAV"
  cfg.visual_dir = "Image-01-FPS"

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
  # Training views (official train transform, cached): off by default.
  clips.augment_config(cfg)
  return cfg


# ----------------------------------------------------------------------------
# CREMA-D.


def validate_config(cfg) -> None:
  """Raises ConfigError for a bad setting."""
  base.check_common_config(cfg)
  for field in ("sample_rate", "num_samples", "n_fft", "hop_length",
                "num_frames"):
    if cfg[field] < 1:
      raise errors.ConfigError(f"config.data.{field}={cfg[field]} must be >= 1")


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


def list_samples(cfg) -> tuple[dict[str, list[clips.Clip]], str]:
  """Kept samples of train.csv ("train") and test.csv ("test").

  Returns:
    ({"train": [...], "test": [...]}, sha256 identity of every source used).

  Raises:
    DataError: a split file or media folder is missing, an empty frame
      folder (unless skipped), or no sample of a split has both files.
  """
  root = base.dataset_root(cfg, "CREMA-D", f"train.csv, test.csv,"
                           f" {cfg.audio_dir}/ and {cfg.visual_dir}/")
  audio_dir = base.media_folder(root, cfg, "audio_dir", "CREMA-D audio")
  visual_dir = base.media_folder(root, cfg, "visual_dir", "CREMA-D frame")
  h = hashlib.sha256()
  out = {}
  for part, csv_name in (("train", cfg.train_csv), ("test", cfg.test_csv)):
    path = base.resolve_path(root, csv_name)
    rows = read_split_csv(path)
    h.update(base.file_identity(path, root).encode())
    kept, missing, empty = [], 0, 0
    for clip_id, label in rows:
      wav = os.path.join(audio_dir, clip_id + ".wav")
      folder = os.path.join(visual_dir, clip_id)
      if not (os.path.exists(wav) and os.path.exists(folder)):
        missing += 1
        continue
      names = media.list_frames(folder)
      if len(names) < cfg.num_frames:
        if cfg.skip_empty_frame_folders:
          empty += 1
          continue
        raise errors.DataError(
            f"frame folder {folder} has {len(names)} frames, {cfg.num_frames}"
            " needed: re-extract the frames of this clip, or set"
            " config.data.skip_empty_frame_folders=True to drop such clips")
      chosen = media.official_frame_choice(len(names), cfg.num_frames,
                                           cfg.frame_seed)
      clip = clips.Clip(clip_id, label, wav, tuple(
          os.path.join(folder, names[i]) for i in chosen))
      clips.clip_identity(h, clip, names, root)
      kept.append(clip)
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
  x = media.load_audio(wav_path, cfg.sample_rate)
  reps = max(3, math.ceil(cfg.num_samples / len(x)))
  x = np.clip(np.tile(x, reps)[:cfg.num_samples], -1.0, 1.0)
  return media.log_stft(x, cfg.n_fft, cfg.hop_length,
                        cfg.stft_pad_mode)[..., None]


def audio_shape(cfg) -> tuple[int, int, int]:
  """[frequency bins, frames, 1] of the spectrogram ((257, 188, 1))."""
  return (cfg.n_fft // 2 + 1, 1 + cfg.num_samples // cfg.hop_length, 1)


def build_settings(cfg) -> dict:
  """Every setting that changes the samples (JSON-able)."""
  return base.build_settings(cfg, NON_BUILD_FIELDS, RECIPE_VERSION)


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
  return clips.load_clips(
      NAME, cfg, samples, sources, lambda c: spectrogram(c.wav, cfg),
      audio_shape(cfg), NUM_CLASSES, build_settings(cfg))
