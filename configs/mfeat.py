r"""G2D on UCI Multiple Features (real multi-view handwritten digits).

2,000 digits described by six feature views; each view is a "modality" with
an MLP encoder. Two views by default (pix: strong, fou: weak); three with the
`three_views` preset (pix, fou, kar) and SMP taus of two entries. Small
enough for fast end-to-end runs on a CPU (a minute or two).

  G2D_DATA_DIR=../shared/data python -m g2d_jax.main \
      --config=configs/mfeat.py --workdir=runs/mfeat
  G2D_DATA_DIR=../shared/data python -m g2d_jax.main \
      --config=configs/mfeat.py:three_views --workdir=runs/mfeat3

Presets: `two_views` (default), `three_views`, `smoke` (tests).
"""

import ml_collections

from g2d_jax import data
from g2d_jax.pipeline import presets
from g2d_jax.pipeline.config import base_config
from g2d_jax.pipeline.config import optimizer_config
from g2d_jax.pipeline.config import train_config

PRESETS = ("two_views", "three_views", "smoke")


def get_config(preset: str = "two_views") -> ml_collections.ConfigDict:
  """The mfeat config for `<preset>[,<method>]`."""
  preset, method = presets.split_preset(preset, PRESETS)
  c = base_config()
  c.data = data.default_data_config("mfeat")
  views = ("pix", "fou", "kar") if preset == "three_views" else ("pix", "fou")
  c.data.views = views
  mlp = dict(kind="mlp", hidden_dims=(128, 64), dropout_rate=0.0)
  c.model.encoders = ml_collections.ConfigDict({v: dict(mlp) for v in views})
  c.model.fusion = "late"
  epochs = 4 if preset == "smoke" else 60
  # The paper's proportions: lr x0.1 after 2/3 of training; SMP for about
  # half of it (151/300; a quarter per stage with three views).
  c.teacher = train_config(epochs, 32, optimizer_config(0.01))
  c.student = train_config(epochs, 32, optimizer_config(0.01))
  if len(views) == 3:
    c.gating.tau_fractions = (0.25, 0.25)
  # MLP encoders have no conv kernels for OGM's released rule: modulate every
  # encoder parameter (the MLB repository's OGM variant).
  c.ogm.scope = c.ogm_ge.scope = "encoder"
  c.eval.batch_size = 200
  c.log_every_steps = 50
  return presets.finish(c, method)
