"""Protocols shared by several dataset config files in `configs/`.

A config file names its dataset and documents its data; the training
protocols below are the same for datasets of one kind, so they live here
once: `audio_visual` (two ResNet-18s: CREMA-D, VGGSound) and `sequences`
(three Transformer encoders over feature sequences: UR-Funny, IEMOCAP).
Each returns a locked config; preset strings are `<preset>[,<method>]`.
"""

from __future__ import annotations

import ml_collections

from g2d_jax import data
from g2d_jax import methods
from g2d_jax.pipeline.config import base_config
from g2d_jax.pipeline.config import optimizer_config
from g2d_jax.pipeline.config import train_config

AUDIO_VISUAL_PRESETS = ("paper", "small", "smoke")
SEQUENCE_PRESETS = ("paper", "small")


def split_preset(preset: str | None, presets: tuple[str, ...]
                 ) -> tuple[str, str | None]:
  """`"<preset>[,<method>]"` -> (preset, method or None); ValueError if bad."""
  name, _, method = (preset or presets[0]).partition(",")
  name = name or presets[0]
  if name not in presets:
    raise ValueError(f"unknown preset {name!r}; choose one of {presets}.")
  if method and method not in methods.available():
    raise ValueError(f"unknown method {method!r}; choose one of "
                     f"{methods.available()}.")
  return name, method or None


def _paper_protocol(c: ml_collections.ConfigDict) -> None:
  """The official G2D protocol: batch 16, SGD 1e-3 (momentum 0.9, wd 1e-4),
  300 epochs, lr x0.1 at epoch 200."""
  c.teacher = train_config(300, 16, optimizer_config(1e-3))
  c.student = train_config(300, 16, optimizer_config(1e-3))


def finish(c: ml_collections.ConfigDict, method: str | None
           ) -> ml_collections.ConfigDict:
  """Selects `method` (if given) and locks the config."""
  if method:
    methods.apply_preset(c, method)
  c.lock()
  return c


def audio_visual(dataset: str, preset: str | None) -> ml_collections.ConfigDict:
  """Audio spectrogram + video frames, two ResNet-18s, late fusion.

  paper: the official protocol, SMP for epochs 0..150 (tau_1 = 151/300), the
  official ResNet-18 computed with CPU-friendly kernels; small: width-8
  ResNets, frames resized to 112, 600 samples per split, 6 epochs (a CPU
  check of the whole job); smoke: width 4, 32 samples, 2 epochs (tests).
  """
  name, method = split_preset(preset, AUDIO_VISUAL_PRESETS)
  c = base_config()
  c.data = data.default_data_config(dataset)
  c.model.fusion = "late"
  width = {"paper": 64, "small": 8, "smoke": 4}[name]
  resnet = dict(kind="resnet18", width=width, conv_impl="auto",
                pool_impl="fast")
  c.model.encoders = ml_collections.ConfigDict(
      dict(audio=dict(resnet), visual=dict(resnet)))
  if name == "paper":
    _paper_protocol(c)
  elif name == "small":
    c.data.image_size = 112
    c.data.max_examples_per_split = 600
    c.teacher = train_config(6, 32, optimizer_config(0.01))
    c.student = train_config(6, 32, optimizer_config(0.01))
    c.eval.batch_size = 64
    c.log_every_steps = 10
  else:
    c.data.image_size = 32
    c.data.max_examples_per_split = 32
    c.teacher = train_config(2, 16, optimizer_config(0.05, decay_fractions=()))
    c.student = train_config(2, 16, optimizer_config(0.05, decay_fractions=()))
    c.eval.batch_size = 16
    c.log_every_steps = 2
  return finish(c, method)


def sequences(dataset: str, preset: str | None) -> ml_collections.ConfigDict:
  """Audio, visual and text feature sequences, one Transformer each (paper
  A.4.1, after AGM: input projected by a kernel-1 conv without bias, 4
  layers, 8 heads, width 768, sinusoidal positions, mean pool over the
  steps; no padding masks, so zero-padded steps take part, as in MultiBench
  and MulT), late fusion. Three modalities: SMP trains the least confident
  for tau_1 epochs, then the next for tau_2, then all.

  paper: the official protocol with taus (75, 76) of 300 epochs, which split
  the official 151-epoch window in two (the paper gives no per-stage
  values); small: width-32 two-layer Transformers, 6 epochs (the same
  fractions give taus (2, 1)), for a CPU.
  """
  name, method = split_preset(preset, SEQUENCE_PRESETS)
  c = base_config()
  c.data = data.default_data_config(dataset)
  c.model.fusion = "late"
  if name == "paper":
    enc = dict(kind="transformer", hidden_dim=768, num_layers=4, num_heads=8,
               conv_kernel_size=1, positional="sinusoidal", norm_first=True)
  else:
    enc = dict(kind="transformer", hidden_dim=32, num_layers=2, num_heads=4,
               mlp_dim=64, conv_kernel_size=1, positional="sinusoidal",
               norm_first=True)
  c.model.encoders = ml_collections.ConfigDict(
      {m: dict(enc) for m in ("audio", "visual", "text")})
  if name == "paper":
    _paper_protocol(c)
  else:
    c.teacher = train_config(6, 32, optimizer_config(0.01))
    c.student = train_config(6, 32, optimizer_config(0.01))
    c.eval.batch_size = 128
    c.log_every_steps = 50
  # The official 151-epoch window of 300 split in two stages.
  c.gating.tau_fractions = (75 / 300, 76 / 300)
  return finish(c, method)
