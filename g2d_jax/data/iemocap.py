"""IEMOCAP from the MulT feature pickle (`iemocap_data.pkl`).

Users bring the file: the Multimodal Transformer (MulT) release
(github.com/yaohungt/Multimodal-Transformer, "processed MOSI, MOSEI and
IEMOCAP" data, read by its `src/dataset.py:Multimodal_Datasets`) distributes
IEMOCAP as `iemocap_data.pkl` (word-aligned) and `iemocap_data_noalign.pkl`.
Layout (a pickled dict of NumPy arrays):

  {"train": split, "valid": split, "test": split}
  split = {"text": [N, L_t, 300], "audio": [N, L_a, 74],
           "vision": [N, L_v, 35], "labels": [N, 4, 2],
           "id": [N, ...] (optional, ignored)}

Aligned: L_t = L_a = L_v = 20; unaligned (per the MulT paper): 20, 400 and
500 steps. Text is GloVe (300-d), audio COVAREP (74-d), vision Facet (35-d);
MulT sets the audio's -inf values to 0. `labels[i, k]` is a one-hot pair
(not present, present) for the emotions k = Neutral, Happy, Sad, Angry (MulT
`eval_iemocap`); MulT trains four binary tasks (`argmax` over the pair).

Labels here (`label_mode`):
- "emotion" (default): one 4-way label per utterance, class = the emotion
  whose pair says present: Neutral 0, Happy 1, Sad 2, Angry 3 (the order of
  the file). The four-emotion IEMOCAP subset has one emotion per utterance;
  an utterance with zero or several present emotions raises DataError, or is
  dropped with `drop_ambiguous=True`.
- "neutral", "happy", "sad" or "angry": MulT's binary task for that emotion
  (0 absent, 1 present).
Files that store integer class ids ([N] or [N, 1]) are also read: with
"emotion" the ids are used as they are (0..num_classes-1), with a binary
mode the label is `id == k`.

Sequences go through the same steps as UR-Funny (`data.sequences`):
non-finite values set to 0, optional `drop_empty_text`, leading padding
removal per `align`, truncation/zero-padding to `seq_len` steps, optional
training-set standardisation. The defaults keep MulT's arrays as stored
(`align="none"`, `seq_len=20`, `pad_side="front"`, nothing dropped); for
`iemocap_data_noalign.pkl` set `seq_len_audio` / `seq_len_visual` (e.g. 400
and 500) or a shorter common `seq_len`. Inputs: float32 [N, seq_len, D] per
modality (audio, visual = the file's "vision", text), scale 1.0. The
pipeline passes no masks to the encoders, so padded (all-zero) steps take
part in attention, as in MulT.

Splits: the file's train / valid / test. The whole file is held in memory.
"""

from __future__ import annotations

import os

from absl import logging
import ml_collections
import numpy as np

from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import sequences

NAME = "iemocap"
MODALITIES = sequences.MODALITIES
EMOTIONS = ("neutral", "happy", "sad", "angry")
LABEL_MODES = ("emotion",) + EMOTIONS


def default_config() -> ml_collections.ConfigDict:
  """Settings of the IEMOCAP reader (MulT conventions by default)."""
  cfg = sequences.sequence_config(
      NAME, os.path.join("iemocap", "iemocap_data.pkl"), seq_len=20,
      align="none", pad_side="front", drop_empty_text=False)
  # "emotion" (4-way) or one of neutral/happy/sad/angry (binary).
  cfg.label_mode = "emotion"
  # Drop utterances without exactly one present emotion ("emotion" mode).
  cfg.drop_ambiguous = False
  # Classes of files that store integer class ids ("emotion" mode).
  cfg.num_classes = 4
  return cfg


def convert_labels(labels: np.ndarray, n: int, cfg, path: str,
                   split_key: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Maps the file's labels to class ids.

  Returns:
    (int32 labels of the kept utterances, kept indices, number of classes).

  Raises:
    DataError: an unexpected label shape or value, or ambiguous emotions
      without `drop_ambiguous`.
  """
  labels = np.asarray(labels)
  where = f"{path}: {split_key}/labels"
  if labels.shape[0] != n:
    raise errors.DataError(f"{where} has {labels.shape[0]} rows for {n}"
                           " utterances; the file is truncated")
  if labels.ndim == 3 and labels.shape[1:] == (len(EMOTIONS), 2):
    present = np.argmax(labels, axis=-1) == 1            # MulT: argmax(Y, -1)
  elif labels.ndim == 2 and labels.shape[1] == len(EMOTIONS):
    if not np.all(np.isin(labels, (0, 1))):
      raise errors.DataError(
          f"{where} has shape {labels.shape} but values other than 0/1;"
          " expected one present/absent flag per emotion")
    present = labels == 1
  elif labels.size == n:
    ids = labels.reshape(n)
    if cfg.label_mode == "emotion":
      ids = base.check_labels(ids, cfg.num_classes, where)
      return ids, np.arange(n), cfg.num_classes
    ids = base.check_labels(ids, len(EMOTIONS), where)
    k = EMOTIONS.index(cfg.label_mode)
    return (ids == k).astype(np.int32), np.arange(n), 2
  else:
    raise errors.DataError(
        f"{where} has shape {labels.shape}; expected MulT's [N, 4, 2]"
        " (per emotion: absent, present), [N, 4] flags or [N] class ids")
  if cfg.label_mode != "emotion":
    k = EMOTIONS.index(cfg.label_mode)
    return present[:, k].astype(np.int32), np.arange(n), 2
  count = present.sum(axis=1)
  keep = np.flatnonzero(count == 1)
  if len(keep) < n:
    if not cfg.drop_ambiguous:
      raise errors.DataError(
          f"{where}: {int((count == 0).sum())} utterances have no present"
          f" emotion and {int((count > 1).sum())} several, so the 4-way"
          " label is undefined; set config.data.drop_ambiguous=True to drop"
          " them, or config.data.label_mode to one of"
          f" {list(EMOTIONS)} for MulT's binary task")
    logging.info("%s: dropped %d utterances without exactly one emotion",
                 where, n - len(keep))
  return (np.argmax(present[keep], axis=1).astype(np.int32), keep,
          len(EMOTIONS))


def load(cfg) -> base.MultimodalDataset:
  """Loads IEMOCAP from MulT's pickle (see the module docstring).

  Raises:
    ConfigError: a bad setting.
    DataError: a missing or malformed file (keys, shapes, labels).
  """
  sequences.check_sequence_config(cfg)
  if cfg.label_mode not in LABEL_MODES:
    raise errors.ConfigError(
        f"config.data.label_mode={cfg.label_mode!r} must be one of"
        f" {LABEL_MODES}")
  if cfg.num_classes < 2:
    raise errors.ConfigError(
        f"config.data.num_classes={cfg.num_classes} must be >= 2")
  data_dir = base.resolve_data_dir(cfg.data_dir)
  path = os.path.join(data_dir, os.path.expanduser(cfg.path))
  classes = set()

  def labels_fn(labels, n, key):
    ids, kept, c = convert_labels(labels, n, cfg, path, key)
    classes.add(c)
    return ids, kept

  def num_classes():
    if len(classes) != 1:
      raise errors.DataError(
          f"{path}: the splits store labels in different layouts; use the"
          " original file")
    return next(iter(classes))

  return sequences.load_dataset(
      NAME, cfg, path, "MulT's IEMOCAP features iemocap_data.pkl (github.com/"
      "yaohungt/Multimodal-Transformer, Datasets)", labels_fn, num_classes,
      {"label_mode": cfg.label_mode, "drop_ambiguous": cfg.drop_ambiguous})
