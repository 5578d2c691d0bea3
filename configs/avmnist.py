r"""G2D on AV-MNIST (audio spectrogram + PCA-degraded digit image).

Presets (`--config=configs/avmnist.py:<preset>`):

  paper  (default) the paper's protocol: two ResNet-18s, batch 16, SGD lr 1e-3
         momentum 0.9 wd 1e-4, 300 epochs, lr x0.1 at epoch 200 (2/3 of
         the run), SMP for epochs 0..150 (tau_1 = 151/300 of the run).
         Needs a GPU: about 44 min per epoch on a 2-core CPU.
  quick  full data, small stride-2 CNN encoders, 4 teacher and 8 student
         epochs: the whole job fits a 2-core CPU (the measured times are in
         experiments/README.md, "Quick job").
  smoke  256 examples per split and tiny encoders: seconds, for tests.

Run the whole job (teachers, teacher cache, student, evaluation); its
outputs go to runs/avmnist_quick (`--workdir=DIR` for another):

  G2D_DATA_DIR=../shared/data python -m g2d_jax.main \
      --config=configs/avmnist.py:quick

Override any field, e.g. `--config.student.epochs=3 --config.method=joint`.

MultiBench's AV-MNIST files instead of the built data:
`--config=configs/avmnist.py:paper,multibench --config.data.data_dir=DIR`.

Comparators: `--config.method=NAME` (joint, umt, ume, ogm, ogm_ge, mlb,
mmpareto, mla, pmr, g2d) or the preset form `configs/avmnist.py:quick,NAME`;
each method's hyperparameters live in `config.NAME` with its released code's
defaults (g2d_jax/methods/). SMP is on for g2d only unless
`--config.smp=True|False` says otherwise.
"""

import ml_collections

from g2d_jax import data
from g2d_jax import methods
from g2d_jax.pipeline.config import base_config
from g2d_jax.pipeline.config import optimizer_config
from g2d_jax.pipeline.config import train_config

PRESETS = ("paper", "quick", "smoke")


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The AV-MNIST config for `<preset>[,multibench][,<method>]`.

  `multibench` reads MultiBench's AV-MNIST `.npy` files (the data the paper
  used; `config.data.data_dir` or $G2D_DATA_DIR points at them) instead of
  building AV-MNIST from MNIST and FSDD.
  """
  preset, *mods = (preset or "paper").split(",")
  preset = preset or "paper"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}.")
  method = None
  multibench = False
  for tok in mods:
    if tok == "multibench":
      multibench = True
    elif tok in methods.available():
      method = tok
    else:
      raise ValueError(f"unknown preset modifier {tok!r}; use 'multibench' "
                       f"or a method, one of {methods.available()}.")
  c = base_config()
  c.data = data.default_data_config("avmnist")
  c.model.fusion = "late"

  if preset == "paper":
    # The same network as the official ResNet-18; "auto"/"fast" only choose
    # CPU-friendlier kernels for it (g2d_jax/models/conv.py).
    resnet = dict(kind="resnet18", width=64, conv_impl="auto",
                  pool_impl="fast")
    c.model.encoders = ml_collections.ConfigDict(
        dict(audio=dict(resnet), image=dict(resnet)))
    c.teacher = train_config(300, 16, optimizer_config(1e-3))
    c.student = train_config(300, 16, optimizer_config(1e-3))

  elif preset == "quick":
    # Small CNNs that a 2-core CPU trains in minutes. XLA's max-pool backward
    # is slow on CPU, so they downsample with stride-2 convolutions; the
    # audio branch starts with a 4x4 patchify layer (112 -> 28), several
    # times cheaper than a 5x5 conv over the full spectrogram. Both end in
    # 128-d features, so their modality gap can be measured in one space.
    # The teachers' budget is the one the AV-MNIST defaults were calibrated
    # with (experiments/README.md).
    c.model.encoders = ml_collections.ConfigDict(dict(
        audio=dict(kind="cnn", channels=(16, 32, 64, 128), downsample="stride",
                   use_batchnorm=True, patchify=4),
        image=dict(kind="cnn", channels=(32, 64, 128), downsample="stride",
                   use_batchnorm=True)))
    c.teacher = train_config(4, 64, optimizer_config(
        0.01, decay_fractions=(0.75,)))
    # Every window is a fraction of the run (g2d_jax.schedule), so the
    # paper's schedule scales to 8 epochs as it does to any other length:
    # SMP for the first 151/300 (epochs 0-3), the learning rate x0.1 for
    # the last quarter (epochs 6-7), OGM-GE's window 51% (0-3) as in its
    # 100-epoch release. `--config.student.epochs=24` scales them all.
    c.student = train_config(8, 64, optimizer_config(
        0.01, decay_fractions=(0.75,)))
    c.log_every_steps = 100

  else:  # smoke
    c.data.max_examples_per_split = 256
    c.model.encoders = ml_collections.ConfigDict(dict(
        audio=dict(kind="cnn", channels=(4, 8), downsample="stride",
                   use_batchnorm=True),
        image=dict(kind="cnn", channels=(4, 8), downsample="stride",
                   use_batchnorm=True)))
    c.teacher = train_config(2, 32, optimizer_config(0.05, decay_fractions=()))
    c.student = train_config(2, 32, optimizer_config(0.05, decay_fractions=()))
    c.eval.batch_size = 64
    c.log_every_steps = 4

  if multibench:
    c.data = data.default_data_config("avmnist_multibench")
  if method:
    methods.apply_preset(c, method)
  c.lock()
  return c
