"""VGGSound in the layout read by the official G2D code.

Users bring the data. Layout under `root` = `<data_dir>/<subdir>` (every name
is a config field, relative to `root` or absolute):

  vggsound.csv              rows `youtube_id,time,label,split` (the VGGSound
                            list; a first row `youtube_id,time,label,split`
                            is skipped as a header, as the official code
                            skips its first line); split is train or test
  frames/<split>/Image-01-FPS/<youtube_id>_<time:06d>/
                            1-fps JPEG frames `{frame index:05d}.jpg` written
                            by the official data/VGGSound/
                            video_preprocessing.py (or by
                            `python -m g2d_jax.data.prepare vggsound`,
                            which writes audio/ and the CSV too)
  audio/<split>/<youtube_id>_<time:06d>.wav
                            16 kHz PCM written by the official
                            data/VGGSound/mp4_to_wav.py (ffmpeg -ar 16000)

As in the official `VGGSound.__init__`, a row is kept only if its wav file and
its frame folder exist and the folder holds more than 3 frames
(`min_frames = 4`); rows of other splits are ignored. Class ids follow the
first appearance of each label among the kept train rows; test labels use the
same ids. The official code asserts that train and test have the same number
of classes; here a test label unseen in training, or a training label absent
from test, raises DataError. `num_classes` is the number of training labels
(309 in the paper's copy of VGGSound, 310 in the full list).

Audio (official `__getitem__`): 16 kHz mono (channels averaged, resampled if
the file has another rate), tiled by doubling (`np.tile(x, 2)`) until at
least 10 s long, a 5 s crop `x[start:start + 80000]`, clipped to [-1, 1], a
centred STFT with n_fft 256, hop 128 and a periodic Hann window, then
`log(|S| + 1e-7)`: float32 [129, 626], stored as [N, 129, 626, 1].

Visual: the folder's image files in sorted name order (the official code
sorts the listing too), 3 frames `files[i]` for i in
`np.random.RandomState(999).choice(n, size=3, replace=False)` in the order
the choice returns them (the official `np.random.seed(999)` trick; it depends
only on the frame count). Sorting by name makes the choice independent of the
filesystem's listing order. Each frame: RGB, PIL bilinear resize to 224 x 224
(torchvision `Resize((224, 224))`), ImageNet mean/std normalisation on read:
float32 [N, 3, 224, 224, 3].

Splits: test = the kept test rows. There is no official validation set;
`val` is carved out of the kept train rows per class (`val_fraction`, default
0.05, seeded by `val_seed`), train and val keep CSV order.

Storage: `storage="cache"` (default) builds every split once into a
memory-mapped cache under `<cache_dir>/vggsound/<key>/` (about 0.3 MB of
spectrogram and 0.45 MB of frames per clip: plan for ~150 GB for the full
dataset); `storage="on_demand"` reads and computes each sample when it is
used (no disk, slower steps). Both give identical values.

Deviations from the official code:
- The 5 s audio crop starts at a random offset in [0, 5 s] in the official
  code, at test time too (so its evaluation is not deterministic). Teacher
  outputs are precomputed per index here, so the crop is fixed per clip:
  `crop="center"` (default: offset 2.5 s, the middle of the official range),
  `"start"` (offset 0) or `"seeded"` (an offset in [0, 5 s] from a hash of
  `crop_seed` and the clip id, i.e. the official distribution, fixed per
  clip).
- Train-time augmentation is off by default (official train transform:
  RandomResizedCrop + RandomHorizontalFlip, redrawn at every read); every
  split uses the test transform, as teacher outputs are cached per sample.
  `config.data.augment_views=K` (K > 1) gives each training
  sample K cached views with the official train transform per frame
  (`clips.augmented_frames`: RandomResizedCrop + RandomHorizontalFlip,
  view v of sample i drawn from (augment_seed, i, v)); the teacher outputs
  are cached per view and the student reads view hash(seed, epoch, i) mod
  K in each epoch. Validation and test keep the deterministic transform.
  The 5 s audio crop is the same in every view (`crop`).
- Resampling (only for files not at 16 kHz) uses scipy's polyphase filter,
  not soxr; the STFT is computed in float64 and rounded to float32; the STFT
  centre padding is `stft_pad_mode` ("constant" = librosa >= 0.10 default,
  or "reflect" = librosa < 0.10).
- Frames are counted and chosen among image files only (.jpg/.jpeg/.png).
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
from g2d_jax.data import media

NAME = "vggsound"
RECIPE_VERSION = 1
MODALITIES = clips.MODALITIES
SPLITS_IN_CSV = ("train", "test")
CROPS = ("center", "start", "seeded")
HEADER = ("youtube_id", "time", "label", "split")

NON_BUILD_FIELDS = base.LOCATION_FIELDS + ("csv", "frames_dir", "audio_dir")


def default_config() -> ml_collections.ConfigDict:
  """Settings of the VGGSound loader (official G2D recipe by default)."""
  cfg = base.user_data_config(NAME, val_fraction=0.05)
  # The clip list and media folders, relative to <data_dir>/<subdir> or
  # absolute.
  cfg.csv = "vggsound.csv"
  cfg.frames_dir = "frames"
  cfg.audio_dir = "audio"

  # --- audio (official values) ---
  cfg.sample_rate = 16000
  cfg.min_seconds = 10              # tile by doubling until this long
  cfg.crop_seconds = 5
  cfg.n_fft = 256
  cfg.hop_length = 128
  cfg.stft_pad_mode = "constant"
  # Where the 5 s crop starts: "center" (2.5 s), "start" (0) or "seeded"
  # (fixed per clip, uniform in [0, 5 s] like the official random crop).
  cfg.crop = "center"
  cfg.crop_seed = 0

  # --- visual (official values) ---
  cfg.fps = 1                       # frame folder Image-{fps:02d}-FPS
  cfg.num_frames = 3
  cfg.min_frames = 4                # official: more than 3 frames
  cfg.frame_seed = 999
  cfg.image_size = 224
  # Training views (official train transform, cached): off by default.
  clips.augment_config(cfg)
  return cfg


def validate_config(cfg) -> None:
  """Raises ConfigError for a bad setting."""
  base.check_common_config(cfg)
  if cfg.crop not in CROPS:
    raise errors.ConfigError(
        f"config.data.crop={cfg.crop!r} must be one of {CROPS}")
  for field in ("sample_rate", "crop_seconds", "n_fft", "hop_length",
                "num_frames", "fps"):
    if cfg[field] < 1:
      raise errors.ConfigError(f"config.data.{field}={cfg[field]} must be >= 1")
  if cfg.min_seconds < cfg.crop_seconds:
    raise errors.ConfigError(
        f"config.data.min_seconds={cfg.min_seconds} must be >= crop_seconds="
        f"{cfg.crop_seconds}")
  if cfg.min_frames < cfg.num_frames:
    raise errors.ConfigError(
        f"config.data.min_frames={cfg.min_frames} must be >= num_frames="
        f"{cfg.num_frames}")


def read_clip_list(path: str) -> list[tuple[str, int, str, str]]:
  """Reads vggsound.csv: [(youtube_id, time, label, split)].

  Raises:
    DataError: the file is missing or a row is malformed.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: it is the VGGSound clip list (rows youtube_id,"
        "time,label,split, from the VGGSound release); put it there or set"
        " config.data.csv")
  rows = []
  with open(path, encoding="utf-8-sig", newline="") as f:
    for line_no, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip():
        continue
      if line_no == 1 and tuple(c.strip() for c in row) == HEADER:
        continue
      if len(row) != 4:
        raise errors.DataError(
            f"{path} line {line_no}: expected 4 fields youtube_id,time,label,"
            f"split, got {len(row)}: {row!r}")
      yid, t, label, split = (c.strip() for c in row)
      try:
        seconds = int(t)
      except ValueError:
        raise errors.DataError(
            f"{path} line {line_no}: time {t!r} is not an integer number of"
            " seconds") from None
      rows.append((yid, seconds, label, split))
  if not rows:
    raise errors.DataError(f"{path} lists no clips")
  return rows


def list_samples(cfg) -> tuple[dict[str, list[clips.Clip]], list[str], str]:
  """Kept samples per CSV split, the class names and the sources' identity.

  Returns:
    ({"train": [...], "test": [...]}, class names in id order, sha256).

  Raises:
    DataError: missing files, no kept sample, or train/test class mismatch.
  """
  root = base.dataset_root(cfg, "VGGSound", "vggsound.csv, frames/ and audio/")
  csv_path = base.resolve_path(root, cfg.csv)
  rows = read_clip_list(csv_path)
  frames_root = base.media_folder(root, cfg, "frames_dir", "VGGSound frames")
  audio_root = base.media_folder(root, cfg, "audio_dir", "VGGSound audio")
  fps_dir = f"Image-{cfg.fps:02d}-FPS"
  h = hashlib.sha256(base.file_identity(csv_path, root).encode())
  kept = {s: [] for s in SPLITS_IN_CSV}
  dropped = {s: 0 for s in SPLITS_IN_CSV}
  other = 0
  for yid, t, label, split in rows:
    if split not in SPLITS_IN_CSV:
      other += 1
      continue
    clip_id = f"{yid}_{t:06d}"
    folder = os.path.join(frames_root, split, fps_dir, clip_id)
    wav = os.path.join(audio_root, split, clip_id + ".wav")
    if not (os.path.isdir(folder) and os.path.exists(wav)):
      dropped[split] += 1
      continue
    names = media.list_frames(folder)
    if len(names) < cfg.min_frames:
      dropped[split] += 1
      continue
    chosen = media.official_frame_choice(len(names), cfg.num_frames,
                                          cfg.frame_seed)
    clip = clips.Clip(clip_id, -1, wav, tuple(
        os.path.join(folder, names[i]) for i in chosen))
    clips.clip_identity(h, clip, names, root)
    kept[split].append((clip_id, label, wav, clip.frames))
  logging.info("VGGSound %s: kept %s, dropped %s (missing files or <= %d"
               " frames), %d rows of other splits", csv_path,
               {s: len(v) for s, v in kept.items()}, dropped,
               cfg.min_frames - 1, other)
  for s in SPLITS_IN_CSV:
    if not kept[s]:
      raise errors.DataError(
          f"no {s} row of {csv_path} has both {audio_root}/{s}/<id>.wav and"
          f" {frames_root}/{s}/{fps_dir}/<id>/ with >= {cfg.min_frames}"
          " frames: check config.data.frames_dir, audio_dir and fps")
  classes = list(dict.fromkeys(label for _, label, _, _ in kept["train"]))
  ids = {c: i for i, c in enumerate(classes)}
  test_classes = set(label for _, label, _, _ in kept["test"])
  unseen = sorted(test_classes - set(classes))
  absent = sorted(set(classes) - test_classes)
  if unseen or absent:
    more = lambda x: "..." if len(x) > 5 else ""
    raise errors.DataError(
        f"VGGSound train and test classes differ (the official loader asserts"
        f" equal counts): test-only {unseen[:5]}{more(unseen)}, train-only"
        f" {absent[:5]}{more(absent)}; add the missing clips or remove those"
        " labels' rows from the CSV")
  out = {s: [clips.Clip(c, ids[label], wav, frames)
             for c, label, wav, frames in kept[s]] for s in SPLITS_IN_CSV}
  return out, classes, h.hexdigest()


def crop_start(clip_id: str, cfg) -> int:
  """First sample of the 5 s crop in the tiled (>= 10 s) signal."""
  span = cfg.sample_rate * (cfg.min_seconds - cfg.crop_seconds)
  if cfg.crop == "start":
    return 0
  if cfg.crop == "center":
    return span // 2
  digest = hashlib.sha256(f"{cfg.crop_seed}:{clip_id}".encode()).digest()
  return int.from_bytes(digest[:8], "little") % (span + 1)


def spectrogram(wav_path: str, clip_id: str, cfg) -> np.ndarray:
  """The official VGGSound log spectrogram (fixed crop): float32 [F, T, 1]."""
  x = media.load_audio(wav_path, cfg.sample_rate)
  while len(x) < cfg.sample_rate * cfg.min_seconds:
    x = np.tile(x, 2)
  start = crop_start(clip_id, cfg)
  x = np.clip(x[start:start + cfg.sample_rate * cfg.crop_seconds], -1.0, 1.0)
  return media.log_stft(x, cfg.n_fft, cfg.hop_length,
                         cfg.stft_pad_mode)[..., None]


def audio_shape(cfg) -> tuple[int, int, int]:
  """[129, 626, 1] for the official settings."""
  n = cfg.sample_rate * cfg.crop_seconds
  return (cfg.n_fft // 2 + 1, 1 + n // cfg.hop_length, 1)


def build_settings(cfg) -> dict:
  """Every setting that changes the samples (JSON-able)."""
  return base.build_settings(cfg, NON_BUILD_FIELDS, RECIPE_VERSION)


def load(cfg) -> base.MultimodalDataset:
  """Loads VGGSound (see the module docstring for layout and recipe).

  Raises:
    ConfigError: a bad setting.
    DataError: missing or malformed files, class mismatch.
  """
  validate_config(cfg)
  samples, classes, sources = list_samples(cfg)
  return clips.load_clips(
      NAME, cfg, samples, sources,
      lambda c: spectrogram(c.wav, c.clip_id, cfg), audio_shape(cfg),
      len(classes), build_settings(cfg),
      {"classes_sha256": clips.names_sha256(classes)})
