r"""G2D on IEMOCAP (audio, visual and text feature sequences; 4 emotions).

The data is not shipped: put MulT's IEMOCAP pickle at
$G2D_DATA_DIR/iemocap/iemocap_data.pkl (see g2d_jax/data/iemocap.py; labels
are the 4-way emotion Neutral/Happy/Sad/Angry by default,
`--config.data.label_mode=happy` etc. gives MulT's binary tasks), then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/iemocap.py --workdir=runs/iemocap

Encoders (paper A.4.1, after AGM): one Transformer per modality, the input
features projected to the model width by a 1-D convolution (kernel 1, no
bias), 4 layers, 8 heads, hidden 768, sinusoidal positions, mean pool over
the steps (the pipeline passes no padding masks, so zero-padded steps take
part, as in MultiBench and MulT). Three modalities: SMP trains the least
confident modality for tau_1 epochs, then the next for tau_2, then all; the
taus (75, 76) split the official 151-epoch window in two (the paper gives no
per-stage values).

Presets (`--config=configs/iemocap.py:<preset>[,<method>]`):

  paper  (default) the paper's protocol: Transformer encoders of width 768,
         late fusion, batch 16, SGD lr 1e-3 momentum 0.9 wd 1e-4, 300 epochs,
         lr x0.1 at epoch 200, taus (75, 76). Needs a GPU.
  small  a CPU run: width-32 two-layer Transformers, a few epochs; sized for a
         2-core CPU.
"""

import ml_collections

from g2d_jax.pipeline import presets

PRESETS = presets.SEQUENCE_PRESETS


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The IEMOCAP config for `<preset>[,<method>]` (see the module docstring)."""
  return presets.sequences("iemocap", preset)
