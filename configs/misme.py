r"""G2D on MIS-ME (soil-patch image + meteorological table; soil moisture).

A regression task: the model's single output goes through a sigmoid and is
trained with MSE against volumetric water content scaled to [0, 1] (the
training split's min/max; see g2d_jax/data/misme.py, which also stores the
map and inverts it with `misme.unscale_targets`). Model selection uses the
validation MAE; report MAPE and R^2 on unscaled VWC with
g2d_jax/regression_metrics.py, as the paper's Table 3.

The data is not shipped: put the MIS-ME release under $G2D_DATA_DIR/misme
(images/ and combined_only_{train,val,test}_set.xlsx, or .csv tables with
the same columns; every path is a config field), then

  G2D_DATA_DIR=/path/to/data python -m g2d_jax.main \
      --config=configs/misme.py --workdir=runs/misme

Encoders (paper 4.1.1): MobileNetV2 for the image; for the 8 meteorological
features the fully connected network of MIS-ME (Linear-BN-ReLU layers of
256, 128, 64, 32 and 16 units). Deviations from MIS-ME: the MobileNetV2 is
trained from scratch (MIS-ME fine-tunes ImageNet weights; this library has
no pretrained weights), and the MLP uses no dropout (MIS-ME: 0.3, 0.2, 0.1
after the first three layers).

Presets (`--config=configs/misme.py:<preset>[,<method>]`):

  paper  (default) the paper's protocol: MobileNetV2 (width 1.0, 224 x 224),
         late fusion, batch 16, SGD lr 1e-3 momentum 0.9 wd 1e-4, 300 epochs,
         lr x0.1 at epoch 200, SMP for epochs 0..150 (tau_1 = 151).
  small  a CPU check: MobileNetV2 of width 0.35 on 96 x 96 images, a smaller
         MLP, a few epochs.
"""

import ml_collections

from g2d_jax import data
from g2d_jax import methods
from g2d_jax.pipeline.config import base_config
from g2d_jax.pipeline.config import optimizer_config
from g2d_jax.pipeline.config import train_config

PRESETS = ("paper", "small")


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """The MIS-ME config for one preset, optionally `<preset>,<method>`."""
  preset, _, method = (preset or "paper").partition(",")
  preset = preset or "paper"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}.")
  c = base_config()
  c.data = data.default_data_config("misme")
  c.model.fusion = "late"
  if preset == "paper":
    c.model.encoders = ml_collections.ConfigDict(dict(
        image=dict(kind="mobilenetv2", width_multiplier=1.0),
        tabular=dict(kind="mlp", hidden_dims=(256, 128, 64, 32, 16),
                     use_batchnorm=True, dropout_rate=0.0)))
    c.teacher = train_config(300, 16, optimizer_config(1e-3))
    c.student = train_config(300, 16, optimizer_config(1e-3))
  else:
    c.data.image_size = 96
    c.model.encoders = ml_collections.ConfigDict(dict(
        image=dict(kind="mobilenetv2", width_multiplier=0.35),
        tabular=dict(kind="mlp", hidden_dims=(64, 32, 16),
                     use_batchnorm=True, dropout_rate=0.0)))
    c.teacher = train_config(6, 32, optimizer_config(0.01))
    c.student = train_config(6, 32, optimizer_config(0.01))
    c.eval.batch_size = 64
    c.log_every_steps = 20
  if method:
    methods.apply_preset(c, method)
  c.lock()
  return c
