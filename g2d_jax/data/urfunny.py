"""UR-Funny from MultiBench's pre-extracted feature pickle (`humor.pkl`).

Users bring the file: MultiBench (github.com/pliang279/MultiBench, the
"affect" datasets) distributes UR-Funny as `humor.pkl`, read by its
`datasets/affect/get_data.py:get_dataloader(path, data_type='humor')`.
Layout (a pickled dict of NumPy arrays):

  {"train": split, "valid": split, "test": split}
  split = {"vision": [N, L, 371], "audio": [N, L, 81], "text": [N, L, 300],
           "labels": [N] or [N, 1] (0 = not humorous, 1 = humorous),
           "id": [N, ...] (optional, ignored)}

with L = 50 word-aligned steps, zero-padded at the front (MultiBench's
`glove_embeddings` pads "with zeros at the front"); text is GloVe (300-d),
audio COVAREP (81-d), vision OpenFace (371-d); split sizes of 8074 /
1034 / 1058 are reported for the distributed file. Feature sizes are read
from the file (other extractions work too) but must agree across splits.

The file is read with a restricted unpickler that only rebuilds NumPy arrays
and plain containers, so a tampered pickle cannot run code; a file that needs
anything else is refused with a DataError.

Processing (every step a config field; `data.sequences`), following
MultiBench's
`Affectdataset` with `max_pad=True`:
1. Non-finite values (MultiBench/MulT set the audio's -inf to 0) become 0;
   the count is logged.
2. `drop_empty_text` (default True): samples whose text features are all
   zero are dropped from every split (MultiBench `drop_entry`).
3. Leading padding is removed, `align="text"` (default): every modality
   starts at the first step where the text is non-zero (MultiBench's aligned
   mode). "per_modality": each modality starts at its own first non-zero
   step (MultiBench's unaligned mode); "none": nothing is removed (the
   stored arrays are used as they are, as MulT does).
4. The first `seq_len` remaining steps are kept (longer sequences are
   truncated at the end; with `align="none"` the *last* `seq_len` steps, the
   data end of a front-padded sequence) and the result is zero-padded to
   exactly `seq_len` steps, after the data (`pad_side="back"`, MultiBench
   `max_pad`) or before it (`pad_side="front"`, the storage layout of the
   pickle).
5. `standardize` (default False): each feature is standardised with the mean
   and standard deviation of the training split's valid (unpadded) steps;
   padded steps stay exactly zero.
Inputs: float32 [N, seq_len, D] per modality, scale 1.0. Padded steps are
all-zero rows; the pipeline passes no masks to the Transformer encoders
(`valid_mask` recovers them for users who do), so, as in MultiBench and
MulT, padded steps take part in attention.

Labels: binary humour, class 0 = not humorous, 1 = humorous (values other
than 0/1 raise DataError). Splits: the pickle's train / valid / test.
Modalities in this order: audio, visual (the pickle's "vision"), text.

The whole file is held in memory (about 1.5 GB as float32 for the full
UR-Funny); there is no cache.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import sequences

NAME = "urfunny"
MODALITIES = sequences.MODALITIES
NUM_CLASSES = 2


def default_config() -> ml_collections.ConfigDict:
  """Settings of the UR-Funny reader (MultiBench conventions by default)."""
  return sequences.sequence_config(
      NAME, os.path.join("urfunny", "humor.pkl"), seq_len=50, align="text",
      pad_side="back", drop_empty_text=True)


def binary_labels(labels: np.ndarray, path: str, split_key: str) -> np.ndarray:
  """0/1 humour labels as int32; DataError for any other value."""
  values = np.unique(labels)
  if not np.all(np.isin(values, (0, 1))):
    raise errors.DataError(
        f"{path}: {split_key}/labels has values {values[:6].tolist()};"
        " UR-Funny labels must be 0 (not humorous) or 1 (humorous)")
  return labels.astype(np.int32)


def load(cfg) -> base.MultimodalDataset:
  """Loads UR-Funny from MultiBench's humor.pkl (see the module docstring).

  Raises:
    ConfigError: a bad setting.
    DataError: a missing or malformed file (keys, shapes, labels).
  """
  sequences.check_sequence_config(cfg)
  data_dir = base.resolve_data_dir(cfg.data_dir)
  path = os.path.join(data_dir, os.path.expanduser(cfg.path))

  def labels_fn(labels, n, key):
    flat = sequences.flat_labels(labels, n, path, key)
    return binary_labels(flat, path, key), np.arange(n)

  return sequences.load_dataset(
      NAME, cfg, path, "MultiBench's UR-Funny features humor.pkl (github.com/"
      "pliang279/MultiBench, affect datasets)", labels_fn, NUM_CLASSES, {})
