r"""G2D on IEMOCAP (audio, visual and text feature sequences; 4 emotions).

The data is not shipped: put MulT's IEMOCAP pickle at
$G2D_DATA_DIR/iemocap/iemocap_data.pkl (see g2d_jax/data/iemocap.py; labels
are the 4-way emotion Neutral/Happy/Sad/Angry by default,
`--config.data.label_mode=happy` etc. gives MulT's binary tasks), then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/iemocap.py --workdir=runs/iemocap

Presets `--config=configs/iemocap.py:<preset>[,<method>]`: `paper` (default;
Transformer encoders of width 768, the official protocol, taus (75, 76);
needs a GPU) and `small` (a 2-core CPU run). The protocol, shared with the
other sequence dataset, is `g2d_jax.pipeline.presets.sequences`.
"""

import ml_collections

from g2d_jax.pipeline import presets

PRESETS = presets.SEQUENCE_PRESETS


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The IEMOCAP config for `<preset>[,<method>]` (module docstring)."""
  return presets.sequences("iemocap", preset)
