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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from g2d_jax.data import base
from g2d_jax.data import materialize
from g2d_jax.data import media

MODALITIES = ("audio", "visual")


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
  shape_v = (cfg.num_frames, cfg.image_size, cfg.image_size, 3)
  plans = {}
  for s in base.SPLIT_NAMES:
    items = chosen[s]
    plans[s] = materialize.SplitPlan(
        readers={
            "audio": materialize.Reader(
                lambda i, items=items: spectrogram(items[i]),
                tuple(audio_shape), "float32"),
            "visual": materialize.Reader(
                lambda i, items=items: media.frames_array(
                    items[i].frames, cfg.image_size), shape_v, "uint8"),
        },
        labels=np.array([x.label for x in items], np.int32),
        ids=[x.clip_id for x in items])
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
          labels=plans[s].labels, scales={"audio": 1.0, "visual": 1.0})
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
