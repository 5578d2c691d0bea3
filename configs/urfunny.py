r"""G2D on UR-Funny (audio, visual and text feature sequences; humour).

The data is not shipped: put MultiBench's UR-Funny pickle at
$G2D_DATA_DIR/urfunny/humor.pkl (see g2d_jax/data/urfunny.py), then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/urfunny.py --workdir=runs/urfunny

Presets `--config=configs/urfunny.py:<preset>[,<method>]`: `paper` (default;
Transformer encoders of width 768, the official protocol, taus (75, 76);
needs a GPU) and `small` (a 2-core CPU run). The protocol, shared with the
other sequence dataset, is `g2d_jax.pipeline.presets.sequences`.
"""

import ml_collections

from g2d_jax.pipeline import presets

PRESETS = presets.SEQUENCE_PRESETS


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The UR-Funny config for `<preset>[,<method>]` (module docstring)."""
  return presets.sequences("urfunny", preset)
