"""Audio-visual clips (CREMA-D, VGGSound): one WAV and a folder of frames
per clip, turned into a log spectrogram and a few RGB frames per sample.

A loader lists its kept `Clip`s for its train and test lists and says how a
clip's audio becomes a spectrogram; `load_clips` does the rest the same way
for every such dataset: validation carved out of the training clips per
class, the per-split cap, the build-once cache (or samples on demand), and
frames normalised with the ImageNet statistics on read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import materialize
from g2d_jax.data import media

MODALITIES = ("audio", "visual")
# Fields of `augment_config`; left out of the build settings when
# augment_views == 1, so caches and fingerprints are today's.
AUGMENT_FIELDS = ("augment_views", "augment_seed", "crop_scale", "crop_ratio",
                  "flip_probability")


def augment_config(cfg) -> None:
  """Adds the training-view fields to a clip dataset's config.

  `augment_views` K > 1 gives each training sample K views, view v of
  sample i drawn from `augment_seed`, i and v alone: each frame gets the
  official training transform, torchvision's `RandomResizedCrop(size,
  scale=crop_scale, ratio=crop_ratio)` then `RandomHorizontalFlip(
  flip_probability)`, on the stored frame. Validation and test keep the
  deterministic transform. K = 1 (default) is the deterministic transform
  for every split.
  """
  cfg.augment_views = 1
  cfg.augment_seed = 0
  cfg.crop_scale = (0.08, 1.0)
  cfg.crop_ratio = (3 / 4, 4 / 3)
  cfg.flip_probability = 0.5


def validate_augment(cfg) -> None:
  """Raises ConfigError for a bad training-view setting."""
  if cfg.augment_views < 1:
    raise errors.ConfigError(
        f"config.data.augment_views={cfg.augment_views} must be >= 1 (1: no"
        " augmentation)")
  lo, hi = cfg.crop_scale
  if not 0.0 < lo <= hi <= 1.0:
    raise errors.ConfigError(
        f"config.data.crop_scale={tuple(cfg.crop_scale)} must satisfy 0 < lo"
        " <= hi <= 1")
  lo, hi = cfg.crop_ratio
  if not 0.0 < lo <= hi:
    raise errors.ConfigError(
        f"config.data.crop_ratio={tuple(cfg.crop_ratio)} must satisfy 0 < lo"
        " <= hi")
  if not 0.0 <= cfg.flip_probability <= 1.0:
    raise errors.ConfigError(
        f"config.data.flip_probability={cfg.flip_probability} must be in"
        " [0, 1]")


def resized_crop_box(rng: np.random.Generator, height: int, width: int,
                     scale: tuple[float, float], ratio: tuple[float, float]
                     ) -> tuple[int, int, int, int]:
  """(top, left, h, w) of torchvision's `RandomResizedCrop.get_params`:
  ten tries at an area fraction uniform in `scale` and a log-uniform
  aspect ratio, else the centre crop clamped to `ratio`."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
  """The random stream of view `view` of training sample `index`."""
  return np.random.default_rng(np.random.SeedSequence([seed, index, view]))


def augmented_frames(paths: tuple[str, ...], cfg, index: int, view: int
                     ) -> np.ndarray:
  """uint8 [T, size, size, 3]: view `view` of sample `index`, each frame
  cropped, resized (PIL bilinear) and flipped with its own draws."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = view_rng(cfg.augment_seed, index, view)
  out = []
  for p in paths:
    img = media.open_rgb(p)
    top, left, h, w = resized_crop_box(rng, img.height, img.width,
                                       tuple(cfg.crop_scale),
                                       tuple(cfg.crop_ratio))
    img = img.resize((cfg.image_size, cfg.image_size), Image.BILINEAR,
                     box=(left, top, left + w, top + h))
    if rng.random() < cfg.flip_probability:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out.append(np.asarray(img, np.uint8))
  return np.stack(out)


@dataclasses.dataclass(frozen=True)
class Clip:
  """One kept clip: id, class id, WAV path and chosen frame paths."""
  clip_id: str
  label: int
  wav: str
  frames: tuple[str, ...]


def clip_identity(h: Any, clip: Clip, frame_names: list[str],
                  root: str) -> None:
  """Adds what identifies a clip's sources (its WAV, its folder listing and
  its chosen frames: path, size, mtime) to the hash `h`."""
  h.update(base.file_identity(clip.wav, root).encode())
  h.update("|".join(frame_names).encode())
  for p in clip.frames:
    h.update(base.file_identity(p, root).encode())


def load_clips(name: str, cfg, clips: Mapping[str, list[Any]], sources: str,
               spectrogram: Callable[[Any], np.ndarray],
               audio_shape: tuple[int, ...], num_classes: int,
               settings: dict[str, Any],
               fingerprint_extra: Mapping[str, Any] | None = None
               ) -> base.MultimodalDataset:
  """The dataset of kept `clips` ({"train", "test"}, and "val" where the
  release has one; otherwise val is carved out of train per class).

  Items need `clip_id`, `label` and `frames` (a `Clip`, or a loader's own
  record that `spectrogram` reads).

  Inputs: audio float32 [N, *audio_shape] (scale 1), visual float32
  [N, num_frames, size, size, 3] ImageNet-normalised on read (uint8 in the
  cache).
  """
  if "val" in clips:
    chosen = {s: list(clips[s]) for s in base.SPLIT_NAMES}
  else:
    labels_train = np.array([x.label for x in clips["train"]], np.int32)
    tr, va = base.carve_validation(labels_train, cfg.val_fraction,
                                   cfg.val_seed)
    chosen = {"train": [clips["train"][i] for i in tr],
              "val": [clips["train"][i] for i in va], "test": clips["test"]}
  chosen = {s: base.cap(v, cfg.max_examples_per_split)
            for s, v in chosen.items()}
  views = {s: 1 for s in base.SPLIT_NAMES}
  if "augment_views" in cfg:
    validate_augment(cfg)
    views["train"] = int(cfg.augment_views)
    if views["train"] == 1:
      settings = {k: v for k, v in settings.items()
                  if k not in AUGMENT_FIELDS}
  shape_v = (cfg.num_frames, cfg.image_size, cfg.image_size, 3)
  plans = {}
  for s in base.SPLIT_NAMES:
    items, k = chosen[s], views[s]
    if k == 1:
      visual = lambda r, items=items: media.frames_array(
          items[r].frames, cfg.image_size)
    else:
      # Row r is view r % k of sample r // k. The audio has no augmentation
      # here, so its rows repeat (the cache is k times larger).
      visual = lambda r, items=items, k=k: augmented_frames(
          items[r // k].frames, cfg, r // k, r % k)
    plans[s] = materialize.SplitPlan(
        readers={
            "audio": materialize.Reader(
                lambda r, items=items, k=k: spectrogram(items[r // k]),
                tuple(audio_shape), "float32"),
            "visual": materialize.Reader(visual, shape_v, "uint8"),
        },
        labels=np.repeat(np.array([x.label for x in items], np.int32), k),
        ids=[x.clip_id if k == 1 else f"{x.clip_id}#view{v}"
             for x in items for v in range(k)])
  arrays, key = materialize.materialize(
      name, plans, storage=cfg.storage, cache_dir=cfg.cache_dir,
      settings=settings, sources=sources, task="classification",
      build_threads=cfg.build_threads)
  splits = {
      s: base.Split(
          inputs={"audio": arrays[s]["audio"],
                  "visual": media.NormalizedImages(
                      arrays[s]["visual"], media.IMAGENET_MEAN,
                      media.IMAGENET_STD)},
          labels=plans[s].labels, scales={"audio": 1.0, "visual": 1.0},
          views=views[s])
      for s in base.SPLIT_NAMES}
  fingerprint = base.make_fingerprint(name, settings, splits,
                                      "classification")
  fingerprint["sources"] = sources
  fingerprint["build_key"] = key
  fingerprint.update(fingerprint_extra or {})
  return base.MultimodalDataset(
      name=name, modalities=MODALITIES, splits=splits,
      num_classes=num_classes, task="classification", fingerprint=fingerprint)


def names_sha256(names: list[str]) -> str:
  """sha256 of class names in id order (a fingerprint entry)."""
  return hashlib.sha256("\n".join(names).encode()).hexdigest()
