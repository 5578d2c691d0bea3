r"""Calibrates AV-MNIST's difficulty knobs against the paper's unimodal numbers.

Trains a small unimodal CNN per modality on the built AV-MNIST and reports
val and test accuracy, sweeping audio settings (SNR, speaker split, ...).
The G2D paper reports ResNet-18 unimodal accuracies of image 65.6% and audio
42.7% on MultiBench's AV-MNIST; the defaults of `g2d_jax.data.avmnist` were
chosen with this script (see experiments/README.md, "AV-MNIST calibration").

The CNN is defined here rather than taken from `g2d_jax.models` on purpose:
the calibration must not depend on models written in parallel. `SmallCNN`
(a 4x4 patchify conv, two stride-2 3x3 convs with GroupNorm, global average
pool, linear head; Adam with cosine decay) trains in a few minutes on two
CPU cores. Results repeat on one machine given --seed and the data settings.

Example (experiments/README.md lists every run and its wall time):

  export G2D_DATA_DIR=../shared/data
  # audio SNR sweep, first 20k training samples, 8 epochs
  python experiments/calibrate_avmnist.py --train_examples=20000 --epochs=8 \
      --modalities=audio --sweep=snr_db=0,2.5,5,10
  # both modalities at the defaults, all 55k training samples, 4 epochs
  python experiments/calibrate_avmnist.py --train_examples=0 --epochs=4

Each distinct data setting gets its own cached build (`cache_dir`), so the
first run of a setting includes its build time (15-40 s).
"""

import ast
import itertools
import json
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from g2d_jax.data import avmnist

_DATA_DIR = flags.DEFINE_string("data_dir", "",
                                "Data dir (default $G2D_DATA_DIR).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Build cache root.")
_MODALITIES = flags.DEFINE_list(
    "modalities", ["image", "audio"],
    "Modalities to train, each over the whole --sweep grid (sweep audio"
    " settings with --modalities=audio, image settings with image).")
_TRAIN_EXAMPLES = flags.DEFINE_integer(
    "train_examples", 20000,
    "Train on the first N training samples (0 = all 55000).")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Training epochs.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_WIDTH = flags.DEFINE_integer("width", 16, "Channels of the first conv.")
_SEED = flags.DEFINE_integer("seed", 0, "Init and shuffling seed.")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "Fixed data setting, key=python_literal (repeatable).")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "Swept data setting, key=v1,v2,... (repeatable; the grid is"
    " the product). Use ';' to separate tuple values, e.g."
    " test_speakers=('theo',);('yweweler',).")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Write results as JSON here.")


class SmallCNN(nn.Module):
  """Patchify conv, two stride-2 3x3 convs with GroupNorm, pool, linear head.

  The first layer is a non-overlapping `patch` x `patch` conv (stride =
  patch): on a CPU it is several times faster than a 3x3 conv over the full
  112x112 spectrogram, at the same depth of the rest of the network.
  """
  width: int = 16
  patch: int = 4
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                padding="VALID")(x)
    x = nn.relu(x)
    for mult in (2, 2):
      x = nn.Conv(self.width * mult, (3, 3), strides=2)(x)
      x = nn.relu(nn.GroupNorm(num_groups=8)(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def _to_float(x_u8):
  return x_u8.astype(jnp.float32) / 255.0 - 0.5


def train_and_eval(train_x: np.ndarray, train_y: np.ndarray,
                   evals: dict[str, tuple[np.ndarray, np.ndarray]],
                   seed: int) -> dict[str, float]:
  """Trains SmallCNN on uint8 inputs; returns accuracy per eval set."""
  # 4x4 patches for 112x112 spectrograms, 2x2 for 28x28 images.
  model = SmallCNN(width=_WIDTH.value, patch=4 if train_x.shape[1] > 64 else 2)
  rng = jax.random.PRNGKey(seed)
  params = model.init(rng, _to_float(jnp.asarray(train_x[:2])))
  steps_per_epoch = len(train_x) // _BATCH.value
  tx = optax.adam(optax.cosine_decay_schedule(
      _LR.value, steps_per_epoch * _EPOCHS.value))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply(p, _to_float(x))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, x):
    return jnp.argmax(model.apply(params, _to_float(x)), -1)

  order_rng = np.random.default_rng(seed)
  for epoch in range(_EPOCHS.value):
    perm = order_rng.permutation(len(train_x))
    losses = []
    for s in range(steps_per_epoch):
      idx = np.sort(perm[s * _BATCH.value:(s + 1) * _BATCH.value])
      params, opt_state, loss = step(params, opt_state, train_x[idx],
                                     train_y[idx])
      losses.append(loss)
    logging.info("epoch %d loss %.4f", epoch, float(np.mean(losses)))
  out = {}
  for name, (x, y) in evals.items():
    preds = np.concatenate([
        np.asarray(predict(params, x[a:a + 1000]))
        for a in range(0, len(x), 1000)])
    out[name] = float(np.mean(preds == y))
  return out


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _grid() -> list[dict[str, Any]]:
  keys, values = [], []
  for item in _SWEEP.value:
    key, _, vals = item.partition("=")
    sep = ";" if ";" in vals else ","
    keys.append(key)
    values.append([_parse_value(v) for v in vals.split(sep)])
  return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def run_one(modality: str, settings: dict[str, Any]) -> dict[str, Any]:
  """Builds the data for `settings` and trains/evaluates one modality."""
  cfg = avmnist.default_config()
  cfg.data_dir = _DATA_DIR.value
  cfg.cache_dir = _CACHE_DIR.value
  for item in _OVERRIDE.value:
    key, _, val = item.partition("=")
    settings = {key: _parse_value(val), **settings}
  for key, val in settings.items():
    cfg[key] = type(cfg[key])(val) if isinstance(cfg[key], tuple) else val
  n_train = _TRAIN_EXAMPLES.value
  # The first rows of a capped build equal the full build's, so capping the
  # build at the training subset size (val and test stay whole) is exact.
  if n_train and n_train >= 10000:
    cfg.max_examples_per_split = n_train
  t0 = time.time()
  ds = avmnist.load(cfg)
  build_s = time.time() - t0
  train = ds.splits["train"]
  n = n_train or len(train)
  train_x = np.asarray(train.inputs[modality][:n])
  train_y = np.asarray(train.labels[:n])
  evals = {s: (ds.splits[s].inputs[modality], np.asarray(ds.splits[s].labels))
           for s in ("val", "test")}
  t1 = time.time()
  acc = train_and_eval(train_x, train_y, evals, _SEED.value)
  result = {
      "modality": modality, "settings": settings, "train_examples": n,
      "val_acc": acc["val"], "test_acc": acc["test"],
      "val_size": len(evals["val"][1]), "test_size": len(evals["test"][1]),
      "build_or_load_s": round(build_s, 1),
      "train_eval_s": round(time.time() - t1, 1)}
  logging.info("RESULT %s", json.dumps(result))
  print(json.dumps(result), flush=True)
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  t0 = time.time()
  results = []
  for modality in _MODALITIES.value:
    for settings in _grid():
      results.append(run_one(modality, settings))
  wall = time.time() - t0
  print(f"total wall time {wall:.0f} s", flush=True)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"results": results, "wall_s": round(wall, 1),
                 "flags": {f.name: f.value for f in (
                     _MODALITIES, _TRAIN_EXAMPLES, _EPOCHS, _BATCH, _LR,
                     _WIDTH, _SEED, _OVERRIDE, _SWEEP)}},
                f, indent=2)

if __name__ == "__main__":
  app.run(main)
