"""Feature-sequence helpers for the MultiBench / MulT pickles (UR-Funny,
IEMOCAP): a restricted unpickler, split and shape checks, and the sequence
processing both loaders share (non-finite values, leading-padding removal,
fixed lengths, training-set standardisation; see `prepare_sequences`).

The pickles hold `{"train", "valid", "test"}` dicts of NumPy arrays with the
modalities under MultiBench's keys ("audio", "vision", "text"); our modality
names are audio, visual, text.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Callable
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from g2d_jax import errors
from g2d_jax.data import base

MODALITIES = ("audio", "visual", "text")
# Our modality name -> key in the MultiBench / MulT pickles.
PICKLE_KEYS = {"audio": "audio", "visual": "vision", "text": "text"}
# Our split name -> key in the pickles.
SPLIT_KEYS = {"train": "train", "val": "valid", "test": "test"}
ALIGNS = ("text", "per_modality", "none")
PAD_SIDES = ("back", "front")

def sequence_config(name: str, path: str, *, seq_len: int, align: str,
                    pad_side: str, drop_empty_text: bool
                    ) -> ml_collections.ConfigDict:
  """The data config fields of a sequence dataset (`prepare_sequences`)."""
  cfg = ml_collections.ConfigDict()
  cfg.name = name
  # Folder holding `path`; empty means the G2D_DATA_DIR variable.
  cfg.data_dir = ""
  # The feature pickle, relative to data_dir or absolute.
  cfg.path = path
  # Steps per sequence after removing the leading padding (all modalities);
  # seq_len_<modality> > 0 overrides it for one modality.
  cfg.seq_len = seq_len
  cfg.seq_len_audio = 0
  cfg.seq_len_visual = 0
  cfg.seq_len_text = 0
  # Where the leading zero padding ends: "text", "per_modality" or "none".
  cfg.align = align
  # Zero padding after ("back", MultiBench max_pad) or before ("front").
  cfg.pad_side = pad_side
  # Drop samples without text features (MultiBench drop_entry).
  cfg.drop_empty_text = drop_empty_text
  # Standardise each feature with training statistics of the valid steps.
  cfg.standardize = False
  return cfg


# Globals a feature pickle may reference: NumPy array reconstruction and
# plain containers (protocol 2 pickles of Python 2 use _codecs.encode for
# bytes). Anything else is refused.
_SAFE_GLOBALS = {
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "range"),
    ("collections", "OrderedDict"), ("_codecs", "encode"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
}
_SAFE_NUMPY_NAMES = {"_reconstruct", "scalar", "ndarray", "dtype",
                     "_frombuffer", "frombuffer"}


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds NumPy arrays and containers only (no code execution)."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _SAFE_GLOBALS or (
        module.split(".")[0] == "numpy" and name in _SAFE_NUMPY_NAMES):
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_feature_pickle(path: str, what: str) -> tuple[Any, str]:
  """Reads a feature pickle with the restricted unpickler.

  Args:
    path: the pickle file.
    what: how to name the file in messages (e.g. "MultiBench humor.pkl").

  Returns:
    (the unpickled object, sha256 of the file).

  Raises:
    DataError: missing, unreadable or referencing non-array objects.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing: download {what} and put it there, or set"
        " config.data.path (relative to config.data.data_dir or absolute)")
  with open(path, "rb") as f:
    blob = f.read()
  last = None
  for encoding in ("ASCII", "latin1"):   # latin1: pickles from Python 2
    try:
      obj = _RestrictedUnpickler(io.BytesIO(blob), encoding=encoding).load()
      return obj, hashlib.sha256(blob).hexdigest()
    except UnicodeDecodeError as e:
      last = e
    except pickle.UnpicklingError as e:
      if "is not allowed" in str(e):
        raise errors.DataError(
            f"{path} is not a plain feature pickle ({e}); only NumPy arrays"
            " in dicts/lists are read. Re-save the arrays with NumPy and"
            " pickle, or use the original file") from None
      last = e
    except (EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError) as e:
      last = e
  raise errors.DataError(
      f"{path} is not a readable pickle ({last}); it is truncated or not"
      f" {what}: replace it with an intact copy")


def get_split_arrays(obj: Any, path: str, split_key: str,
                     keys: dict[str, str]) -> dict[str, np.ndarray]:
  """The arrays of one split of a MultiBench/MulT pickle.

  Args:
    obj: the unpickled object (a dict of splits).
    path: file name for messages.
    split_key: "train", "valid" or "test".
    keys: our name -> key in the split dict ("labels" included).

  Raises:
    DataError: a split or key is missing, or an entry is not an array.
  """
  if not isinstance(obj, dict):
    raise errors.DataError(
        f"{path} holds a {type(obj).__name__}, expected a dict with 'train',"
        " 'valid' and 'test' entries (MultiBench / MulT layout)")
  if split_key not in obj or not isinstance(obj[split_key], dict):
    raise errors.DataError(
        f"{path} has no {split_key!r} split (found {sorted(map(str, obj))});"
        " expected the MultiBench / MulT layout {'train', 'valid', 'test'}")
  split = obj[split_key]
  out = {}
  for name, key in keys.items():
    if key not in split:
      raise errors.DataError(
          f"{path}: split {split_key!r} has no {key!r} array (found"
          f" {sorted(map(str, split))})")
    arr = split[key]
    if not isinstance(arr, np.ndarray) or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
      raise errors.DataError(
          f"{path}: {split_key}/{key} is a {type(arr).__name__}"
          f" {getattr(arr, 'dtype', '')}, expected a numeric NumPy array")
    out[name] = arr
  return out


def check_sequences(arrays: dict[str, np.ndarray], modalities: tuple[str, ...],
                    path: str, split_key: str) -> int:
  """Checks [N, L, D] shapes with one N; returns N."""
  n = None
  for m in modalities:
    x = arrays[m]
    if x.ndim != 3:
      raise errors.DataError(
          f"{path}: {split_key}/{PICKLE_KEYS[m]} has shape {x.shape},"
          " expected [samples, steps, features]")
    if n is None:
      n = x.shape[0]
    elif x.shape[0] != n:
      raise errors.DataError(
          f"{path}: {split_key} has {x.shape[0]} {PICKLE_KEYS[m]} sequences"
          f" but {n} {PICKLE_KEYS[modalities[0]]} sequences; the file is"
          " truncated or mixes versions")
  return int(n)


def finite_float32(x: np.ndarray, what: str) -> np.ndarray:
  """float32 copy with non-finite values (e.g. the audio's -inf) set to 0."""
  x = np.asarray(x, dtype=np.float32).copy()
  bad = ~np.isfinite(x)
  if bad.any():
    logging.info("%s: %d non-finite values set to 0", what, int(bad.sum()))
    x[bad] = 0.0
  return x


def first_nonzero_step(x: np.ndarray) -> np.ndarray:
  """[N] index of the first step with a non-zero feature (L if none)."""
  nz = np.any(x != 0, axis=2)
  return np.where(nz.any(axis=1), np.argmax(nz, axis=1), x.shape[1])


def fix_length(x: np.ndarray, start: np.ndarray, seq_len: int,
               pad_side: str) -> tuple[np.ndarray, np.ndarray]:
  """Keeps steps start..start+seq_len-1 and zero-pads to seq_len.

  Args:
    x: [N, L, D] sequences.
    start: [N] first step to keep.
    seq_len: output length.
    pad_side: "back" (data first, zeros after) or "front".

  Returns:
    (float32 [N, seq_len, D], bool [N, seq_len] valid-step mask).
  """
  n, length, _ = x.shape
  valid_count = np.clip(length - start, 0, seq_len)        # [N]
  pos = np.arange(seq_len)[None, :]                        # [1, S]
  if pad_side == "back":
    src = start[:, None] + pos
    valid = pos < valid_count[:, None]
  else:
    offset = seq_len - valid_count
    src = start[:, None] + pos - offset[:, None]
    valid = pos >= offset[:, None]
  src = np.clip(src, 0, max(length - 1, 0))
  out = x[np.arange(n)[:, None], src] if length else np.zeros(
      (n, seq_len, x.shape[2]), x.dtype)
  out = np.where(valid[..., None], out, 0.0).astype(np.float32)
  return out, valid


def valid_mask(x: np.ndarray) -> np.ndarray:
  """[N, L] True where a step has a non-zero feature (not padding).

  A real step whose features are all exactly zero is indistinguishable from
  padding; for word-aligned features this does not occur in practice.
  """
  return np.any(np.asarray(x) != 0, axis=-1)


def standardize_splits(seqs: dict[str, np.ndarray],
                       masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Standardises features with the train split's valid-step statistics."""
  flat = seqs["train"][masks["train"]]
  mean = flat.mean(axis=0) if flat.size else 0.0
  std = flat.std(axis=0) if flat.size else 1.0
  std = np.where(std > 0, std, 1.0)
  return {s: np.where(masks[s][..., None], (x - mean) / std, 0.0).astype(
      np.float32) for s, x in seqs.items()}


def check_sequence_config(cfg) -> None:
  """Raises ConfigError for a bad align, pad_side or sequence length."""
  if cfg.align not in ALIGNS:
    raise errors.ConfigError(
        f"config.data.align={cfg.align!r} must be one of {ALIGNS}")
  if cfg.pad_side not in PAD_SIDES:
    raise errors.ConfigError(
        f"config.data.pad_side={cfg.pad_side!r} must be one of {PAD_SIDES}")
  if cfg.seq_len < 1:
    raise errors.ConfigError(f"config.data.seq_len={cfg.seq_len} must be >= 1")
  for m in MODALITIES:
    if cfg[f"seq_len_{m}"] < 0:
      raise errors.ConfigError(
          f"config.data.seq_len_{m}={cfg[f'seq_len_{m}']} must be >= 0 (0:"
          " use seq_len)")


def seq_lens(cfg) -> dict[str, int]:
  """Output length per modality."""
  return {m: cfg[f"seq_len_{m}"] or cfg.seq_len for m in MODALITIES}


def prepare_sequences(raw: dict[str, dict[str, np.ndarray]], cfg,
                      path: str) -> tuple[dict[str, dict[str, np.ndarray]],
                                          dict[str, np.ndarray]]:
  """Steps 1-5 of the module docstring for every split.

  Args:
    raw: split -> {modality: [N, L, D] array}.
    cfg: the data config (align, pad_side, seq_len*, drop_empty_text,
      standardize).
    path: file name for messages.

  Returns:
    (split -> {modality: float32 [N', S_m, D_m]}, split -> kept indices).
  """
  dims = None
  keep, seqs, masks = {}, {}, {}
  lens = seq_lens(cfg)
  for s, arrays in raw.items():
    d = {m: arrays[m].shape[2] for m in MODALITIES}
    if dims is None:
      dims = d
    elif d != dims:
      raise errors.DataError(
          f"{path}: the {SPLIT_KEYS[s]} split has feature sizes {d} but"
          f" {SPLIT_KEYS['train']} has {dims}; the splits come from"
          " different extractions")
    if cfg.align == "text":
      lengths = {arrays[m].shape[1] for m in MODALITIES}
      if len(lengths) != 1:
        raise errors.DataError(
            f"{path}: align='text' needs equal sequence lengths, got"
            f" { {m: arrays[m].shape[1] for m in MODALITIES} } in"
            f" {SPLIT_KEYS[s]}; set config.data.align='per_modality' for"
            " unaligned features")
    x = {m: finite_float32(arrays[m], f"{path} {SPLIT_KEYS[s]}/"
                           f"{PICKLE_KEYS[m]}") for m in MODALITIES}
    idx = np.arange(len(x["text"]))
    if cfg.drop_empty_text:
      idx = np.flatnonzero(np.any(x["text"] != 0, axis=(1, 2)))
      if len(idx) < len(x["text"]):
        logging.info("%s %s: dropped %d samples without text features", path,
                     SPLIT_KEYS[s], len(x["text"]) - len(idx))
      x = {m: v[idx] for m, v in x.items()}
    keep[s] = idx
    seqs[s], masks[s] = {}, {}
    text_start = first_nonzero_step(x["text"])
    for m in MODALITIES:
      if cfg.align == "text":
        start = text_start
      elif cfg.align == "per_modality":
        start = first_nonzero_step(x[m])
      else:
        start = np.full(len(x[m]), max(x[m].shape[1] - lens[m], 0))
      seqs[s][m], masks[s][m] = fix_length(x[m], start, lens[m],
                                           cfg.pad_side)
  if cfg.standardize:
    for m in MODALITIES:
      out = standardize_splits({s: seqs[s][m] for s in seqs},
                               {s: masks[s][m] for s in seqs})
      for s in seqs:
        seqs[s][m] = out[s]
  return seqs, keep


def flat_labels(labels: np.ndarray, n: int, path: str,
                split_key: str) -> np.ndarray:
  """Squeezes labels [N], [N, 1] or [N, 1, 1] to [N]."""
  labels = np.asarray(labels)
  if labels.shape[0] != n or labels.size != n:
    raise errors.DataError(
        f"{path}: {split_key}/labels has shape {labels.shape}, expected one"
        f" label per sample ([{n}] or [{n}, 1])")
  return labels.reshape(n)


def sequence_settings(cfg) -> dict:
  """The sequence settings that change the inputs (for the fingerprint)."""
  return {"seq_lens": seq_lens(cfg), "align": cfg.align,
          "pad_side": cfg.pad_side, "drop_empty_text": cfg.drop_empty_text,
          "standardize": cfg.standardize}


# labels_fn(labels array, n, split key) -> (int32 labels, kept indices)
LabelsFn = Callable[[np.ndarray, int, str], tuple[np.ndarray, np.ndarray]]


def read_splits(path: str, what: str, labels_fn: LabelsFn
                ) -> tuple[dict, dict, str]:
  """The three splits of a MultiBench / MulT pickle, checked.

  Args:
    path: the pickle.
    what: how to name the file in messages.
    labels_fn: turns a split's label array into class ids and the indices of
      the samples to keep.

  Returns:
    ({split: {modality: [N, L, D]}}, {split: int32 [N]}, sha256 of the file).
  """
  obj, digest = load_feature_pickle(path, what)
  keys = {m: PICKLE_KEYS[m] for m in MODALITIES}
  keys["labels"] = "labels"
  raw, labels = {}, {}
  for s, key in SPLIT_KEYS.items():
    arrays = get_split_arrays(obj, path, key, keys)
    n = check_sequences(arrays, MODALITIES, path, key)
    labels[s], kept = labels_fn(arrays["labels"], n, key)
    raw[s] = {m: arrays[m][kept] if len(kept) < n else arrays[m]
              for m in MODALITIES}
  return raw, labels, digest


def load_dataset(name: str, cfg, path: str, what: str, labels_fn: LabelsFn,
                 num_classes: int | Callable[[], int],
                 settings: dict[str, Any]) -> base.MultimodalDataset:
  """A sequence dataset from its pickle: `read_splits`, `prepare_sequences`,
  the splits and their fingerprint (`settings` plus the sequence settings,
  the feature sizes and the file's sha256). `num_classes` may be a function
  called after the labels were read."""
  raw, labels, digest = read_splits(path, what, labels_fn)
  seqs, keep = prepare_sequences(raw, cfg, path)
  splits = {s: base.Split(inputs=seqs[s], labels=labels[s][keep[s]],
                          scales=dict.fromkeys(MODALITIES, 1.0))
            for s in base.SPLIT_NAMES}
  fingerprint = base.make_fingerprint(
      name, {**sequence_settings(cfg), **settings}, splits, "classification")
  fingerprint["feature_dims"] = {m: int(seqs["train"][m].shape[2])
                                 for m in MODALITIES}
  fingerprint["source_sha256"] = digest
  return base.MultimodalDataset(
      name=name, modalities=MODALITIES, splits=splits,
      num_classes=num_classes() if callable(num_classes) else num_classes,
      task="classification", fingerprint=fingerprint)
