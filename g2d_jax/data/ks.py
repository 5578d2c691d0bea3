"""Kinetics-Sounds in the layout written by `python -m g2d_jax.data.prepare`.

Users bring the videos (Kinetics-400 clips of the Kinetics-Sounds classes);
`python -m g2d_jax.data.prepare kinetics_sounds --raw DIR --out
$G2D_DATA_DIR/kinetics_sounds` turns them into this layout under `root` =
`<data_dir>/<subdir>` (every name is a config field, relative to `root` or
absolute):

  classes.txt               one class name per line, in class-id order (the
                            prepare tool writes its chosen list, ks31 by
                            default)
  train.csv, test.csv       rows `<clip id>,<class name>`, no header (csv
                            quoting); test = the Kinetics validation clips
  audio/<clip id>.wav       16 kHz mono 16-bit PCM, the clip's whole audio
  frames/<clip id>/frame_00001.jpg ... frame_00010.jpg
                            one frame per second, frame i taken at the
                            middle of second i - 1 (OGM-GE's moviepy frame
                            script); fewer for clips shorter than 10 s

Classes: the lines of classes.txt, ids in file order (`num_classes` is
their count: 31 for the default ks31 list). OGM-GE, G2D, PMR and
BalanceBenchmark all train with 31 classes, but none publishes the names
behind its labels 0..30, so the id order of a released checkpoint is not
known. Class names are compared with underscores read as spaces and case
ignored (the Kinetics folder spelling `playing_bass_guitar` is `playing
bass guitar`). A CSV row with a class that is not in classes.txt is an
error. As in BalanceBenchmark's `KS_dataset.py`, a row is kept only if its
wav exists and its frame folder holds more than 3 frames (`min_frames =
4`); dropped rows are counted in the log.

Audio (OGM-GE's data/KineticSound/process_audio.py, whose `.npy` files
BalanceBenchmark loads as they are): the waveform in [-1, 1] (int16 / 32768,
as `torchaudio.load`), minus its mean, then torchaudio's Kaldi `fbank` with
`htk_compat=True, use_energy=False, window_type='hanning', num_mel_bins=128,
dither=0.0, frame_shift=10` and Kaldi's other defaults (25 ms frames,
pre-emphasis 0.97, per-frame DC removal, FFT size 512, mel bins from 20 Hz to
Nyquist, log power with a float32-epsilon floor; `data.fbank.kaldi_fbank`
computes it in NumPy). The frames are zero-padded at the end (or cut) to
1024 and then, padding included, mapped by `(x + 4.503877) / (2 * 5.141276)`
(the release pads before it normalises, so padded rows hold 0.438, not 0):
float32 [N, 1024 frames, 128 mel bins, 1], (time, mel) as released.
A 10 s clip has 998 frames.

Visual: 3 frames, for every split the frames BalanceBenchmark's loader uses
at test time: with n frames in the folder, seg = n // 3 and frame
`i * seg + max(seg // 2, 1)` (1-based, i = 0, 1, 2) if n > 6, else frame 1
three times; file `frame_{t:05d}.jpg`. Ten frames give frames 1, 4, 7; seven
give 1, 3, 5. Each frame: RGB, PIL bilinear resize to 224 x 224 (torchvision
`Resize((224, 224))`), ImageNet mean/std on read: float32 [N, 3, 224, 224,
3].

Splits: test = the kept rows of test.csv. The releases have no validation
set (OGM-GE's readme leaves carving one to the user; BalanceBenchmark's KS
config says `validation: false`); `val` is carved out of the kept train.csv
rows per class (`val_fraction`, default 0.1, seeded by `val_seed`). Train and
val keep CSV order.

Storage: `storage="cache"` (default) builds every split once into a
memory-mapped cache under `<cache_dir>/kinetics_sounds/<key>/` (0.5 MB of
fbank and 0.45 MB of frames per clip); `storage="on_demand"` computes each
sample when read. Both give identical values.

Deviations from the releases:
- BalanceBenchmark's training loader draws one random frame from each third
  of the clip (frames 1-3, 4-6, 7-9 of ten) and applies RandomResizedCrop +
  RandomHorizontalFlip. Teacher outputs are precomputed per sample index
  here (`pipeline.precompute`), so by default every split uses the
  deterministic test-time frames and transform.
  `config.data.augment_views=K` (K > 1) gives each training sample K
  cached views with the official train transform per frame
  (`clips.augmented_frames`: RandomResizedCrop + RandomHorizontalFlip,
  view v of sample i drawn from (augment_seed, i, v)); the teacher outputs
  are cached per view and the student reads view hash(seed, epoch, i) mod
  K in each epoch. Validation and test keep the deterministic transform.
  The frames of a view are the test-time ones (1, 4, 7), not a random
  frame per third.
- The fbank is computed in float64 and rounded to float32 once (torchaudio:
  float32 throughout).
- A wav at another rate is resampled to `sample_rate` (polyphase filter);
  the release uses the file's own rate. A stereo file is averaged to mono
  (torchaudio's fbank would read the first channel). The prepared files are
  16 kHz mono, so neither applies to them.
- Frames are counted among image files only (the release counts every entry
  of the folder).
"""

from __future__ import annotations

import csv
import hashlib
import os

from absl import logging
import ml_collections
import numpy as np

from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import clips
from g2d_jax.data import fbank
from g2d_jax.data import media

NAME = "kinetics_sounds"
RECIPE_VERSION = 1
MODALITIES = clips.MODALITIES
PREPARE_HINT = ("python -m g2d_jax.data.prepare kinetics_sounds --raw DIR"
                " --out $G2D_DATA_DIR/kinetics_sounds")

NON_BUILD_FIELDS = base.LOCATION_FIELDS + ("classes_file", "train_csv",
                                           "test_csv", "audio_dir",
                                           "frames_dir")


def default_config() -> ml_collections.ConfigDict:
  """Settings of the Kinetics-Sounds loader (OGM-GE / BalanceBenchmark)."""
  cfg = base.user_data_config(NAME, val_fraction=0.1)
  # Class list, split files and media folders, relative to
  # <data_dir>/<subdir> or absolute.
  cfg.classes_file = "classes.txt"
  cfg.train_csv = "train.csv"
  cfg.test_csv = "test.csv"
  cfg.audio_dir = "audio"
  cfg.frames_dir = "frames"

  # --- audio (OGM-GE process_audio.py) ---
  cfg.sample_rate = 16000
  cfg.num_mel_bins = 128
  cfg.frame_length_ms = 25.0
  cfg.frame_shift_ms = 10.0
  cfg.window = "hanning"            # torchaudio `window_type`
  cfg.target_length = 1024          # frames, zero-padded or cut
  cfg.norm_mean = -4.503877         # (x - mean) / (2 * std)
  cfg.norm_std = 5.141276

  # --- visual (BalanceBenchmark KS_dataset.py, test-time choice) ---
  cfg.num_frames = 3
  cfg.min_frames = 4                # keep folders with more than 3 frames
  cfg.image_size = 224
  # Training views (official train transform, cached): off by default.
  clips.augment_config(cfg)
  return cfg


def validate_config(cfg) -> None:
  """Raises ConfigError for a bad setting."""
  base.check_common_config(cfg)
  for field in ("sample_rate", "target_length", "num_frames", "min_frames"):
    if cfg[field] < 1:
      raise errors.ConfigError(f"config.data.{field}={cfg[field]} must be >= 1")
  if cfg.num_mel_bins < 4:
    raise errors.ConfigError(
        f"config.data.num_mel_bins={cfg.num_mel_bins} must be >= 4 (Kaldi's"
        " minimum)")
  if cfg.window not in fbank.WINDOWS:
    raise errors.ConfigError(
        f"config.data.window={cfg.window!r} must be one of {fbank.WINDOWS}")
  if not cfg.norm_std > 0:
    raise errors.ConfigError(
        f"config.data.norm_std={cfg.norm_std} must be > 0")
  size, shift, _ = fbank.window_sizes(cfg.sample_rate, cfg.frame_length_ms,
                                      cfg.frame_shift_ms)
  if size < 2 or shift < 1:
    raise errors.ConfigError(
        f"config.data.frame_length_ms={cfg.frame_length_ms} and"
        f" frame_shift_ms={cfg.frame_shift_ms} give a {size}-sample window"
        f" every {shift} samples at {cfg.sample_rate} Hz; use >= 2 and >= 1")


def class_key(name: str) -> str:
  """How class names are compared (as `data.prepare` does): underscores
  read as spaces, case and runs of white space ignored."""
  return " ".join(name.replace("_", " ").lower().split())


def read_classes(path: str, label: str, hint: str) -> list[str]:
  """The class names of a prepared classes.txt (one per line, id order).

  Args:
    path: the file.
    label: the dataset's name in messages ("Kinetics-Sounds").
    hint: the prepare command that writes the file.

  Raises:
    DataError: the file is missing, empty or lists a class twice.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: it is the {label} class list (one name per line"
        f" in class-id order) that `{hint}` writes; run it, or set"
        " config.data.classes_file")
  with open(path, encoding="utf-8-sig") as f:
    names = [ln.strip() for ln in f if ln.strip()]
  if not names:
    raise errors.DataError(f"{path} lists no class; re-run `{hint}`")
  seen: dict[str, int] = {}
  for i, n in enumerate(names):
    if class_key(n) in seen:
      raise errors.DataError(
          f"{path}: class {n!r} (line {i + 1}) repeats line"
          f" {seen[class_key(n)] + 1}; each class once, re-run `{hint}`")
    seen[class_key(n)] = i
  return names


def read_split_csv(path: str, class_ids: dict[str, int],
                   classes_path: str) -> list[tuple[str, int]]:
  """Reads a prepared split file: rows `<clip id>,<class name>`.

  Args:
    path: the CSV.
    class_ids: `class_key(name)` -> class id.
    classes_path: classes.txt, for the message.

  Raises:
    DataError: the file is missing, a row is malformed or its class is not
      in classes.txt.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: it is a Kinetics-Sounds split file (rows"
        f" `<clip id>,<class name>`) that `{PREPARE_HINT}` writes; run it, or"
        " set config.data.train_csv / test_csv")
  rows = []
  with open(path, encoding="utf-8-sig", newline="") as f:
    for line_no, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip():
        continue
      if len(row) != 2:
        raise errors.DataError(
            f"{path} line {line_no}: expected `<clip id>,<class name>`, got"
            f" {row!r}")
      clip_id, name = row[0].strip(), row[1]
      if class_key(name) not in class_ids:
        raise errors.DataError(
            f"{path} line {line_no}: class {name.strip()!r} of clip"
            f" {clip_id!r} is not in {classes_path}; the split files and the"
            f" class list come from different runs: re-run `{PREPARE_HINT}`"
            " with the class list you train on")
      rows.append((clip_id, class_ids[class_key(name)]))
  if not rows:
    raise errors.DataError(f"{path} has no rows; re-run `{PREPARE_HINT}`")
  return rows


def frame_name(t: int) -> str:
  """File name of the 1-based frame t of a prepared frame folder."""
  return f"frame_{t:05d}.jpg"


def balancebenchmark_frames(n: int, k: int = 3) -> list[int]:
  """BalanceBenchmark's test-time frames (1-based) of a folder of n.

  seg = n // k; frame i * seg + max(seg // 2, 1) for i < k if n > 6, else
  frame 1 k times (the release's threshold, written for k = 3).
  """
  if n <= 6:
    return [1] * k
  seg = n // k
  return [i * seg + max(seg // 2, 1) for i in range(k)]


def chosen_frames(folder: str, names: list[str], ts: list[int],
                  hint: str) -> tuple[str, ...]:
  """Paths of frames `ts` (1-based) of a folder whose image files are
  `names`.

  Raises:
    DataError: a chosen frame file is not there.
  """
  have = set(names)
  for t in ts:
    if frame_name(t) not in have:
      raise errors.DataError(
          f"{folder} has {len(names)} frames but no {frame_name(t)}: the"
          f" folder is not in the prepared layout (frame_00001.jpg, ...);"
          f" re-run `{hint}`")
  return tuple(os.path.join(folder, frame_name(t)) for t in ts)


def list_samples(cfg) -> tuple[dict[str, list[clips.Clip]], list[str], str]:
  """Kept samples of train.csv ("train") and test.csv ("test").

  Returns:
    ({"train": [...], "test": [...]}, class names in id order, sha256 of
    every source used).

  Raises:
    DataError: a file or folder is missing, a class is unknown, or no row of
      a split is kept.
  """
  root = base.dataset_root(
      cfg, "Kinetics-Sounds",
      f"classes.txt, train.csv, test.csv, {cfg.audio_dir}/ and"
      f" {cfg.frames_dir}/ (`{PREPARE_HINT}` writes them)")
  classes_path = base.resolve_path(root, cfg.classes_file)
  classes = read_classes(classes_path, "Kinetics-Sounds", PREPARE_HINT)
  class_ids = {class_key(c): i for i, c in enumerate(classes)}
  audio_dir = base.media_folder(root, cfg, "audio_dir",
                                "Kinetics-Sounds audio")
  frames_dir = base.media_folder(root, cfg, "frames_dir",
                                 "Kinetics-Sounds frames")
  h = hashlib.sha256(base.file_identity(classes_path, root).encode())
  out = {}
  for part, csv_name in (("train", cfg.train_csv), ("test", cfg.test_csv)):
    path = base.resolve_path(root, csv_name)
    rows = read_split_csv(path, class_ids, classes_path)
    h.update(base.file_identity(path, root).encode())
    kept, missing, few = [], 0, 0
    for clip_id, label in rows:
      wav = os.path.join(audio_dir, clip_id + ".wav")
      folder = os.path.join(frames_dir, clip_id)
      if not (os.path.exists(wav) and os.path.isdir(folder)):
        missing += 1
        continue
      names = media.list_frames(folder)
      if len(names) < cfg.min_frames:
        few += 1
        continue
      ts = balancebenchmark_frames(len(names), cfg.num_frames)
      frames = chosen_frames(folder, names, ts, PREPARE_HINT)
      clip = clips.Clip(clip_id, label, wav, frames)
      clips.clip_identity(h, clip, names, root)
      kept.append(clip)
    logging.info("Kinetics-Sounds %s: kept %d of %d rows (%d without wav or"
                 " frame folder, %d with fewer than %d frames)", csv_name,
                 len(kept), len(rows), missing, few, cfg.min_frames)
    if not kept:
      raise errors.DataError(
          f"no row of {path} has both {audio_dir}/<id>.wav and"
          f" {frames_dir}/<id>/ with >= {cfg.min_frames} frames: check"
          " config.data.audio_dir and frames_dir")
    absent = sorted(set(range(len(classes))) - {c.label for c in kept})
    if absent:
      logging.warning("Kinetics-Sounds %s: no kept clip of %d classes: %s",
                      csv_name, len(absent), [classes[i] for i in absent][:5])
    out[part] = kept
  return out, classes, h.hexdigest()


def spectrogram(wav_path: str, cfg) -> np.ndarray:
  """The OGM-GE Kinetics-Sounds fbank of one clip: float32 [1024, 128, 1]."""
  x = media.load_audio(wav_path, cfg.sample_rate,
                       hint=f"re-run `{PREPARE_HINT}`")
  size, _, _ = fbank.window_sizes(cfg.sample_rate, cfg.frame_length_ms,
                                  cfg.frame_shift_ms)
  if len(x) < size:
    raise errors.DataError(
        f"{wav_path} has {len(x)} samples, fewer than one {size}-sample"
        f" fbank frame; re-extract its audio (`{PREPARE_HINT}`) or drop the"
        " clip from the split files")
  feats = fbank.kaldi_fbank(
      x - x.mean(), cfg.sample_rate, num_mel_bins=cfg.num_mel_bins,
      frame_length_ms=cfg.frame_length_ms, frame_shift_ms=cfg.frame_shift_ms,
      window=cfg.window)
  feats = fbank.fit_length(feats.astype(np.float64), cfg.target_length)
  feats = (feats - cfg.norm_mean) / (2.0 * cfg.norm_std)
  return feats.astype(np.float32)[..., None]


def audio_shape(cfg) -> tuple[int, int, int]:
  """[target_length, num_mel_bins, 1] ((1024, 128, 1))."""
  return (cfg.target_length, cfg.num_mel_bins, 1)


def build_settings(cfg) -> dict:
  """Every setting that changes the samples (JSON-able)."""
  return base.build_settings(cfg, NON_BUILD_FIELDS, RECIPE_VERSION)


def load(cfg) -> base.MultimodalDataset:
  """Loads Kinetics-Sounds (see the module docstring for layout and recipe).

  Inputs: audio float32 [N, 1024, 128, 1] (scale 1), visual float32
  [N, 3, 224, 224, 3] ImageNet-normalised on read (uint8 underneath).

  Raises:
    ConfigError: a bad setting.
    DataError: missing or malformed files, unknown classes.
  """
  validate_config(cfg)
  samples, classes, sources = list_samples(cfg)
  return clips.load_clips(
      NAME, cfg, samples, sources, lambda c: spectrogram(c.wav, cfg),
      audio_shape(cfg), len(classes), build_settings(cfg),
      {"classes_sha256": clips.names_sha256(classes)})
