r"""G2D on CREMA-D (audio spectrogram + one video frame, 6 emotions).

The data is not shipped: put CREMA-D in the official G2D / OGM-GE layout
under $G2D_DATA_DIR/cremad (train.csv, test.csv, AudioWAV/, Image-01-FPS/;
see g2d_jax/data/cremad.py), then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/cremad.py --workdir=runs/cremad

Presets (`--config=configs/cremad.py:<preset>[,<method>]`):

  paper  (default) the paper's protocol: two ResNet-18s (1-channel audio,
         3-channel frames), late fusion, batch 16, SGD lr 1e-3 momentum 0.9
         wd 1e-4, 300 epochs, lr x0.1 at epoch 200, SMP for epochs 0..150
         (tau_1 = 151). Needs a GPU.
  small  a CPU check of the whole job: narrow ResNet-18s (width 8), frames
         resized to 112, 600 samples per split, a few epochs.
  smoke  tiny encoders, 32 samples per split, 2 epochs (tests).

The official code has no validation split: `config.data.val_fraction` (0.1)
of each class's training rows forms one. Every split uses the deterministic
test-time transform (no RandomResizedCrop/flip): teacher outputs are
precomputed per sample.
"""

import ml_collections

from g2d_jax import data
from g2d_jax import methods
from g2d_jax.pipeline.config import base_config
from g2d_jax.pipeline.config import optimizer_config
from g2d_jax.pipeline.config import train_config

PRESETS = ("paper", "small", "smoke")


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The CREMA-D config for one preset, optionally `<preset>,<method>`."""
  preset, _, method = (preset or "paper").partition(",")
  preset = preset or "paper"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}.")
  c = base_config()
  c.data = data.default_data_config("cremad")
  c.model.fusion = "late"

  if preset == "paper":
    resnet = dict(kind="resnet18", width=64)
    c.model.encoders = ml_collections.ConfigDict(
        dict(audio=dict(resnet), visual=dict(resnet)))
    c.teacher = train_config(300, 16, optimizer_config(1e-3))
    c.student = train_config(300, 16, optimizer_config(1e-3))
    c.gating.taus = (151,)

  elif preset == "small":
    c.data.image_size = 112
    c.data.max_examples_per_split = 600
    resnet = dict(kind="resnet18", width=8)
    c.model.encoders = ml_collections.ConfigDict(
        dict(audio=dict(resnet), visual=dict(resnet)))
    c.teacher = train_config(6, 32, optimizer_config(0.01, decay_epochs=(4,)))
    c.student = train_config(6, 32, optimizer_config(0.01, decay_epochs=(4,)))
    c.gating.taus = (3,)        # about half of training, as in the paper
    c.eval.batch_size = 64
    c.log_every_steps = 10

  else:  # smoke
    c.data.image_size = 32
    c.data.max_examples_per_split = 32
    resnet = dict(kind="resnet18", width=4)
    c.model.encoders = ml_collections.ConfigDict(
        dict(audio=dict(resnet), visual=dict(resnet)))
    c.teacher = train_config(2, 16, optimizer_config(0.05, decay_epochs=()))
    c.student = train_config(2, 16, optimizer_config(0.05, decay_epochs=()))
    c.gating.taus = (1,)
    c.eval.batch_size = 16
    c.log_every_steps = 2

  if method:
    methods.apply_preset(c, method)
  c.lock()
  return c
