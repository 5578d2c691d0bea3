r"""G2D on SYNTHETIC imbalanced multimodal data (not a real dataset).

Gaussian class prototypes per modality: modality 0 is strong (learns fast),
modality 1 weak but complementary, so a jointly trained model tends to
under-use it. For tests, demos and the regression path (`regression`
preset: targets in [0, 1], MSE on sigmoid outputs, the regression analogues
of the logit term and of teacher confidence).

  python -m g2d_jax.main --config=configs/synthetic.py --workdir=runs/synth
  python -m g2d_jax.main --config=configs/synthetic.py:regression \
      --workdir=runs/synth_reg

Presets: `classification` (default), `regression`, `three` (3 modalities).
"""

import ml_collections

from g2d_jax import data
from g2d_jax.pipeline import presets
from g2d_jax.pipeline.config import base_config
from g2d_jax.pipeline.config import optimizer_config
from g2d_jax.pipeline.config import train_config

PRESETS = ("classification", "regression", "three")


def get_config(preset: str = "classification") -> ml_collections.ConfigDict:
  """The synthetic-data config for `<preset>[,<method>]`."""
  preset, method = presets.split_preset(preset, PRESETS)
  c = base_config()
  c.data = data.default_data_config("synthetic")
  if preset == "regression":
    c.data.task = "regression"
  if preset == "three":
    c.data.num_modalities = 3
    c.data.dims = (32, 32, 32)
    c.data.signal = (2.5, 1.2, 1.0)
    c.data.groups = (0, 0, 0)
  names = tuple(f"m{i}" for i in range(c.data.num_modalities))
  mlp = dict(kind="mlp", hidden_dims=(64, 32))
  c.model.encoders = ml_collections.ConfigDict({m: dict(mlp) for m in names})
  c.teacher = train_config(20, 50, optimizer_config(0.02, decay_fractions=()))
  c.student = train_config(20, 50, optimizer_config(0.02, decay_fractions=()))
  # Half of training prioritises weak modalities (the default 151/300 for
  # two; a quarter per stage for three).
  if preset == "three":
    c.gating.tau_fractions = (0.25, 0.25)
  c.eval.batch_size = 100
  c.log_every_steps = 40
  return presets.finish(c, method)
