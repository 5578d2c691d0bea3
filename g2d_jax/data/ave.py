"""AVE (Audio-Visual Event, Tian et al. ECCV 2018) in the layout written by
`python -m g2d_jax.data.prepare ave`.

Users bring the AVE release (AVE/<VideoID>.mp4, Annotations.txt,
trainSet.txt, valSet.txt, testSet.txt); `python -m g2d_jax.data.prepare ave
--raw DIR --out $G2D_DATA_DIR/ave` turns it into this layout under `root` =
`<data_dir>/<subdir>` (every name is a config field, relative to `root` or
absolute):

  classes.txt               the 28 categories in the block order of
                            Annotations.txt (Church bell first, Mandolin
                            last)
  train.csv, val.csv, test.csv
                            rows `<VideoID>,<Category>,<start s>,<end s>`,
                            no header, csv-quoted (categories contain
                            commas: "Male speech, man speaking"); the
                            official trainSet / valSet / testSet, a VideoID
                            repeated within a split kept at its first row
  audio/<VideoID>.wav       16 kHz mono 16-bit PCM of the whole 10 s clip
  frames/<VideoID>/frame_00001.jpg ... frame_00010.jpg
                            frame i taken at the middle of second i - 1
                            (OGM-GE's moviepy frame script)

Classes (`class_order`): "annotation" (default) numbers them in classes.txt
order, which is MLB's hard-coded class dict and PMR's / ReconBoost's order of
first appearance in testSet.txt; "alphabetical" numbers them in Python
`sorted` order, as OGM-GE's and MLA's loaders do (`sorted(classes)`). The
repositories disagree; pick the one whose numbers you compare with. A
category not in classes.txt is an error. A row is kept if its wav and its
frame folder exist (others are dropped and counted in the log); a VideoID
repeated within a split keeps its first row (MLB / PMR keep the first
occurrence; the prepare tool already removes repeats).

Splits: the official train / val / test files as they are (commonly cited
as 3339 / 402 / 402 rows; a little fewer once repeated VideoIDs are left
out). AVE has a real validation split, so nothing is carved out of train
and the config has no `val_fraction`.

Two published recipes (`segment`):

"clip" (default; OGM-GE pre-processing/obtain_audio_spectrogram.py and
dataset/dataset.py): the whole 10 s clip. Audio: the wav loaded at
`clip_sample_rate` = 22050 Hz (`librosa.load`'s default rate, which the
release uses on its 16 kHz wavs, so 160000 samples cover about 7.26 s),
`np.tile(x, 10)[:160000]`, clipped to [-1, 1], `scipy.signal.spectrogram(x,
22050, nperseg=512, noverlap=353)` with scipy's other defaults (Tukey(0.25)
window, constant detrend, density scaling), `log(S + 1e-7)` and a per-sample
z-score `(S - mean) / (std + 1e-9)` (`standardize`): float32 [257, 1004],
stored as [N, 257, 1004, 1]. Frames: 3 frames `seg * i + 1` (1-based) with
seg = n // 3 of the folder's n frames (ten frames: 1, 4, 7), as OGM-GE in
train and test. Zero-length events are kept (the clip is used whole).

"event" (PMR's / MLB's "-SE" recipe, `extractWav_SE`): the annotated event
[start, end) seconds only. Audio: loaded at `event_sample_rate` = 16000 Hz,
`x[16000 * start : 16000 * end]`, tiled 10 times, tiled 10 times more if
still shorter than 160000 samples, cut to 160000, clipped, the same
spectrogram, `log(|S| + 1e-7)`, z-scored if `standardize` (PMR: on; MLB has
those lines commented out: set `standardize=False`). Frames: the first
`num_frames` of the event's seconds, `frame_{s + 1:05d}.jpg` for s = start,
start + 1, ..., end - 1; an event shorter than `num_frames` seconds repeats
its last frame. MLB uses 4 frames (`num_frames=4`), ReconBoost 3. Rows of
zero-length events (end == start, e.g. `Church bell&VWi2ENBuTbw&good&0&0`)
are dropped and counted: they have no event audio (PMR's `extractWav_SE`
would slice an empty segment); MLB's frame extractor skips the rows ending
at 0 s, which are the zero-length ones starting at 0.

Every frame: RGB, PIL bilinear resize to 224 x 224 (torchvision
`Resize((224, 224))`), ImageNet mean/std on read: float32 [N, T, 224, 224, 3].

Storage: `storage="cache"` (default) builds every split once into a
memory-mapped cache under `<cache_dir>/ave/<key>/` (1 MB of spectrogram and
0.45 MB of frames per clip); `storage="on_demand"` computes each sample when
read. Both give identical values.

Deviations from the releases:
- Train-time augmentation is off by default (the releases train with
  RandomResizedCrop + RandomHorizontalFlip); every split uses the test
  transform, as teacher outputs are precomputed per sample index.
  `config.data.augment_views=K` (K > 1) gives each training
  sample K cached views with the official train transform per frame
  (`clips.augmented_frames`: RandomResizedCrop + RandomHorizontalFlip,
  view v of sample i drawn from (augment_seed, i, v)); the teacher outputs
  are cached per view and the student reads view hash(seed, epoch, i) mod
  K in each epoch. Validation and test keep the deterministic transform.
- Resampling to 22050 Hz ("clip") uses scipy's polyphase filter; librosa
  uses soxr (>= 0.10) or resampy, so the spectrograms differ slightly. The
  spectrogram is computed in float64 and rounded to float32 (the release:
  float32 from librosa's output).
- "event" frames: PMR / MLB extract the first frame of each second of the
  event with OpenCV (both ends inclusive) and top the folder up to 10 with
  unseeded random in-event frames, then take the first frames of the
  listing; here the frames are the prepared mid-second frames of the event's
  seconds, no random top-ups, the last one repeated for short events.
- A signal that tiling still leaves shorter than 160000 samples (a wav
  shorter than 0.73 s, an event cut short by the end of its wav) is tiled as
  often as needed; the releases would produce fewer spectrogram frames.
- Frames are counted among image files only (OGM-GE counts every entry).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os

from absl import logging
import ml_collections
import numpy as np
import scipy.signal

from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import clips
from g2d_jax.data import ks
from g2d_jax.data import media

NAME = "ave"
RECIPE_VERSION = 1
MODALITIES = clips.MODALITIES
CLASS_ORDERS = ("annotation", "alphabetical")
SEGMENTS = ("clip", "event")
LOG_EPS = 1e-7
STD_EPS = 1e-9
PREPARE_HINT = ("python -m g2d_jax.data.prepare ave --raw DIR --out"
                " $G2D_DATA_DIR/ave")
SPLIT_FIELDS = {"train": "train_csv", "val": "val_csv", "test": "test_csv"}

NON_BUILD_FIELDS = base.LOCATION_FIELDS + ("classes_file", "train_csv",
                                           "val_csv", "test_csv",
                                           "audio_dir", "frames_dir")


@dataclasses.dataclass(frozen=True)
class Event(clips.Clip):
  """A kept AVE row: a clip plus its annotated event [start, end) seconds."""
  start: int = 0
  end: int = 10


def default_config() -> ml_collections.ConfigDict:
  """Settings of the AVE loader (OGM-GE's whole-clip recipe by default)."""
  # No val_fraction: AVE's validation split is official.
  cfg = base.user_data_config(NAME)
  # Class list, split files and media folders, relative to
  # <data_dir>/<subdir> or absolute.
  cfg.classes_file = "classes.txt"
  cfg.train_csv = "train.csv"
  cfg.val_csv = "val.csv"
  cfg.test_csv = "test.csv"
  cfg.audio_dir = "audio"
  cfg.frames_dir = "frames"
  # Class ids: "annotation" (classes.txt order: MLB, PMR, ReconBoost) or
  # "alphabetical" (sorted: OGM-GE, MLA).
  cfg.class_order = "annotation"
  # "clip": the whole 10 s clip (OGM-GE); "event": the annotated segment
  # only (PMR / MLB "-SE").
  cfg.segment = "clip"

  # --- audio ---
  cfg.clip_sample_rate = 22050      # "clip": librosa.load's default rate
  cfg.event_sample_rate = 16000     # "event": PMR's `sr=16000`
  cfg.num_samples = 160000
  cfg.nperseg = 512
  cfg.noverlap = 353
  cfg.standardize = True            # per-sample z-score (MLB: off)

  # --- visual ---
  cfg.num_frames = 3                # OGM-GE, ReconBoost; MLB: 4
  cfg.image_size = 224
  # Training views (official train transform, cached): off by default.
  clips.augment_config(cfg)
  return cfg


def validate_config(cfg) -> None:
  """Raises ConfigError for a bad setting."""
  base.check_common_config(cfg)
  if cfg.class_order not in CLASS_ORDERS:
    raise errors.ConfigError(
        f"config.data.class_order={cfg.class_order!r} must be one of"
        f" {CLASS_ORDERS}")
  if cfg.segment not in SEGMENTS:
    raise errors.ConfigError(
        f"config.data.segment={cfg.segment!r} must be one of {SEGMENTS}")
  for field in ("clip_sample_rate", "event_sample_rate", "num_samples",
                "nperseg", "num_frames"):
    if cfg[field] < 1:
      raise errors.ConfigError(f"config.data.{field}={cfg[field]} must be >= 1")
  if not 0 <= cfg.noverlap < cfg.nperseg:
    raise errors.ConfigError(
        f"config.data.noverlap={cfg.noverlap} must be in [0, nperseg="
        f"{cfg.nperseg})")
  if cfg.num_samples < cfg.nperseg:
    raise errors.ConfigError(
        f"config.data.num_samples={cfg.num_samples} must be >= nperseg="
        f"{cfg.nperseg}")


def class_names(cfg, classes: list[str]) -> list[str]:
  """Class names in id order for `cfg.class_order`."""
  return sorted(classes) if cfg.class_order == "alphabetical" else list(
      classes)


def _seconds(value: str, path: str, line_no: int, what: str) -> int:
  try:
    f = float(value)
  except ValueError:
    f = math.nan
  if not (math.isfinite(f) and f == int(f) and f >= 0):
    raise errors.DataError(
        f"{path} line {line_no}: {what} time {value!r} is not a whole"
        f" number of seconds >= 0; re-run `{PREPARE_HINT}`")
  return int(f)


def read_split_csv(path: str, class_ids: dict[str, int], classes_path: str
                   ) -> tuple[list[tuple[str, int, int, int]], int]:
  """Reads a prepared split file: rows `<VideoID>,<Category>,<start>,<end>`.

  Returns:
    ([(VideoID, class id, start s, end s)] with each VideoID at its first
    row, number of repeated rows left out).

  Raises:
    DataError: the file is missing, a row is malformed, end < start, or a
      category is not in classes.txt.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: it is an AVE split file (rows `<VideoID>,"
        f"<Category>,<start>,<end>`) that `{PREPARE_HINT}` writes from the"
        " official trainSet/valSet/testSet.txt; run it, or set"
        " config.data.train_csv / val_csv / test_csv")
  rows, seen, repeated = [], set(), 0
  with open(path, encoding="utf-8-sig", newline="") as f:
    for line_no, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip():
        continue
      if len(row) != 4:
        raise errors.DataError(
            f"{path} line {line_no}: expected 4 fields `<VideoID>,<Category>,"
            f"<start>,<end>` (quote categories with commas), got {len(row)}:"
            f" {row!r}")
      vid, name = row[0].strip(), row[1].strip()
      if name not in class_ids:
        raise errors.DataError(
            f"{path} line {line_no}: category {name!r} of {vid!r} is not in"
            f" {classes_path}; the split files and the class list come from"
            f" different runs: re-run `{PREPARE_HINT}`")
      start = _seconds(row[2].strip(), path, line_no, "start")
      end = _seconds(row[3].strip(), path, line_no, "end")
      if end < start:
        raise errors.DataError(
            f"{path} line {line_no}: event of {vid!r} ends ({end} s) before"
            f" it starts ({start} s); fix the row")
      if vid in seen:
        repeated += 1
        continue
      seen.add(vid)
      rows.append((vid, class_ids[name], start, end))
  if not rows:
    raise errors.DataError(f"{path} has no rows; re-run `{PREPARE_HINT}`")
  return rows, repeated


def clip_frames(n: int, k: int = 3) -> list[int]:
  """OGM-GE's AVE frames (1-based) of a folder of n: seg * i + 1 with
  seg = n // k (all frame 1 when n < k)."""
  seg = n // k
  return [seg * i + 1 for i in range(k)]


def event_frames(names: list[str], start: int, end: int, k: int
                 ) -> list[int]:
  """The first k frames (1-based) of the event seconds [start, end) that
  the folder (image files `names`) has, the last repeated up to k; [] if
  it has none of them."""
  have = set(names)
  ts = [s + 1 for s in range(start, end) if ks.frame_name(s + 1) in have][:k]
  return ts + ts[-1:] * (k - len(ts)) if ts else []


def list_samples(cfg) -> tuple[dict[str, list[Event]], list[str], str]:
  """Kept samples of the train, val and test files.

  Returns:
    ({"train", "val", "test": [Event]}, class names in id order, sha256 of
    every source used).

  Raises:
    DataError: a file or folder is missing, a category is unknown, or no
      row of a split is kept.
  """
  root = base.dataset_root(
      cfg, "AVE",
      f"classes.txt, train.csv, val.csv, test.csv, {cfg.audio_dir}/ and"
      f" {cfg.frames_dir}/ (`{PREPARE_HINT}` writes them)")
  classes_path = base.resolve_path(root, cfg.classes_file)
  classes = class_names(cfg, ks.read_classes(classes_path, "AVE",
                                             PREPARE_HINT))
  class_ids = {c: i for i, c in enumerate(classes)}
  audio_dir = base.media_folder(root, cfg, "audio_dir", "AVE audio")
  frames_dir = base.media_folder(root, cfg, "frames_dir", "AVE frames")
  h = hashlib.sha256(base.file_identity(classes_path, root).encode())
  event = cfg.segment == "event"
  out = {}
  for part, field in SPLIT_FIELDS.items():
    path = base.resolve_path(root, cfg[field])
    rows, repeated = read_split_csv(path, class_ids, classes_path)
    h.update(base.file_identity(path, root).encode())
    kept, missing, zero, no_frame = [], 0, 0, 0
    for vid, label, start, end in rows:
      if event and end == start:
        zero += 1
        continue
      wav = os.path.join(audio_dir, vid + ".wav")
      folder = os.path.join(frames_dir, vid)
      if not (os.path.exists(wav) and os.path.isdir(folder)):
        missing += 1
        continue
      names = media.list_frames(folder)
      if event:
        ts = event_frames(names, start, end, cfg.num_frames)
      else:
        ts = clip_frames(len(names), cfg.num_frames) if names else []
      if not ts:
        no_frame += 1
        continue
      frames = ks.chosen_frames(folder, names, ts, PREPARE_HINT)
      clip = Event(vid, label, wav, frames, start, end)
      clips.clip_identity(h, clip, names, root)
      kept.append(clip)
    logging.info("AVE %s (%s): kept %d of %d rows (%d repeated VideoIDs left"
                 " out, %d zero-length events, %d without wav or frame"
                 " folder, %d without frames)", cfg[field], cfg.segment,
                 len(kept), len(rows) + repeated, repeated, zero, missing,
                 no_frame)
    if not kept:
      raise errors.DataError(
          f"no row of {path} has both {audio_dir}/<VideoID>.wav and frames in"
          f" {frames_dir}/<VideoID>/: check config.data.audio_dir and"
          " frames_dir")
    out[part] = kept
  return out, classes, h.hexdigest()


def waveform(clip: Event, cfg) -> np.ndarray:
  """The `num_samples` samples the spectrogram reads (module docstring)."""
  n = cfg.num_samples
  if cfg.segment == "clip":
    x = media.load_audio(clip.wav, cfg.clip_sample_rate,
                         hint=f"re-run `{PREPARE_HINT}`")
    y = np.tile(x, 10)
  else:
    sr = cfg.event_sample_rate
    x = media.load_audio(clip.wav, sr, hint=f"re-run `{PREPARE_HINT}`")
    x = x[sr * clip.start:sr * clip.end]
    if not len(x):
      raise errors.DataError(
          f"{clip.wav} ends before the event of {clip.clip_id!r} starts"
          f" ({clip.start} s): re-extract its audio (`{PREPARE_HINT}`)")
    y = np.tile(x, 10)
    if len(y) < n:
      y = np.tile(y, 10)
  if len(y) < n:
    y = np.tile(y, math.ceil(n / len(y)))
  return np.clip(y[:n], -1.0, 1.0)


def spectrogram(clip: Event, cfg) -> np.ndarray:
  """The log spectrogram of one AVE row: float32 [257, 1004, 1]."""
  sr = (cfg.clip_sample_rate if cfg.segment == "clip"
        else cfg.event_sample_rate)
  _, _, s = scipy.signal.spectrogram(waveform(clip, cfg), sr,
                                     nperseg=cfg.nperseg,
                                     noverlap=cfg.noverlap)
  s = np.log(np.abs(s) + LOG_EPS)
  if cfg.standardize:
    s = (s - s.mean()) / (s.std() + STD_EPS)
  return s.astype(np.float32)[..., None]


def audio_shape(cfg) -> tuple[int, int, int]:
  """[nperseg // 2 + 1, segments, 1] ((257, 1004, 1))."""
  step = cfg.nperseg - cfg.noverlap
  return (cfg.nperseg // 2 + 1, (cfg.num_samples - cfg.noverlap) // step, 1)


def build_settings(cfg) -> dict:
  """Every setting that changes the samples (JSON-able); the sample rate
  of the segment kind not in use is left out."""
  settings = base.build_settings(cfg, NON_BUILD_FIELDS, RECIPE_VERSION)
  unused = "event" if cfg.segment == "clip" else "clip"
  settings.pop(f"{unused}_sample_rate")
  return settings


def load(cfg) -> base.MultimodalDataset:
  """Loads AVE (see the module docstring for layout and recipes).

  Inputs: audio float32 [N, 257, 1004, 1] (scale 1), visual float32
  [N, num_frames, 224, 224, 3] ImageNet-normalised on read (uint8
  underneath).

  Raises:
    ConfigError: a bad setting.
    DataError: missing or malformed files, unknown categories.
  """
  validate_config(cfg)
  samples, classes, sources = list_samples(cfg)
  return clips.load_clips(
      NAME, cfg, samples, sources, lambda c: spectrogram(c, cfg),
      audio_shape(cfg), len(classes), build_settings(cfg),
      {"classes_sha256": clips.names_sha256(classes)})
