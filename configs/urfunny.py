r"""G2D on UR-Funny (audio, visual and text feature sequences; humour).

The data is not shipped: put MultiBench's UR-Funny pickle at
$G2D_DATA_DIR/urfunny/humor.pkl (see g2d_jax/data/urfunny.py), then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/urfunny.py --workdir=runs/urfunny

Encoders (paper A.4.1, after AGM): one Transformer per modality, the input
features projected to the model width by a 1-D convolution (kernel 1, no
bias), 4 layers, 8 heads, hidden 768, sinusoidal positions, mean pool over
the steps (the pipeline passes no padding masks, so zero-padded steps take
part, as in MultiBench and MulT). Three modalities: SMP trains the least
confident modality for tau_1 epochs, then the next for tau_2, then all; the
taus (75, 76) split the official 151-epoch window in two (the paper gives no
per-stage values).

Presets (`--config=configs/urfunny.py:<preset>[,<method>]`):

  paper  (default) the paper's protocol: Transformer encoders of width 768,
         late fusion, batch 16, SGD lr 1e-3 momentum 0.9 wd 1e-4, 300 epochs,
         lr x0.1 at epoch 200, taus (75, 76). Needs a GPU.
  small  a CPU run: width-32 two-layer Transformers, a few epochs; sized for a
         2-core CPU.
"""

import ml_collections

from g2d_jax import data
from g2d_jax import methods
from g2d_jax.pipeline.config import base_config
from g2d_jax.pipeline.config import optimizer_config
from g2d_jax.pipeline.config import train_config

DATASET = "urfunny"
PRESETS = ("paper", "small")


def transformer_encoders(preset: str) -> ml_collections.ConfigDict:
  """One Transformer per modality (audio, visual, text)."""
  if preset == "paper":
    enc = dict(kind="transformer", hidden_dim=768, num_layers=4, num_heads=8,
               conv_kernel_size=1, positional="sinusoidal", norm_first=True)
  else:
    enc = dict(kind="transformer", hidden_dim=32, num_layers=2, num_heads=4,
               mlp_dim=64, conv_kernel_size=1, positional="sinusoidal",
               norm_first=True)
  return ml_collections.ConfigDict(
      {m: dict(enc) for m in ("audio", "visual", "text")})


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The UR-Funny config for one preset, optionally `<preset>,<method>`."""
  preset, _, method = (preset or "paper").partition(",")
  preset = preset or "paper"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}.")
  c = base_config()
  c.data = data.default_data_config(DATASET)
  c.model.fusion = "late"
  c.model.encoders = transformer_encoders(preset)
  if preset == "paper":
    c.teacher = train_config(300, 16, optimizer_config(1e-3))
    c.student = train_config(300, 16, optimizer_config(1e-3))
    c.gating.taus = (75, 76)
  else:
    c.teacher = train_config(6, 32, optimizer_config(0.01, decay_epochs=(4,)))
    c.student = train_config(6, 32, optimizer_config(0.01, decay_epochs=(4,)))
    c.gating.taus = (2, 1)
    c.eval.batch_size = 128
    c.log_every_steps = 50
  if method:
    methods.apply_preset(c, method)
  c.lock()
  return c
