"""Datasets: AV-MNIST (built or MultiBench), UCI mfeat, synthetic, and
loaders for user-provided CREMA-D, VGGSound, Kinetics-Sounds, AVE, UR-Funny,
IEMOCAP and MIS-ME copies.

  cfg = default_data_config("avmnist")   # every build setting, documented
  ds = load_dataset(cfg)                 # -> MultimodalDataset
  batch = ds.splits["train"].batch(np.arange(16))
"""

from __future__ import annotations

import ml_collections

from g2d_jax import errors
from g2d_jax.data import avmnist
from g2d_jax.data import ave
from g2d_jax.data import cremad
from g2d_jax.data import iemocap
from g2d_jax.data import ks
from g2d_jax.data import mfeat
from g2d_jax.data import misme
from g2d_jax.data import multibench
from g2d_jax.data import synthetic
from g2d_jax.data import urfunny
from g2d_jax.data import vggsound
from g2d_jax.data.base import MultimodalDataset
from g2d_jax.data.base import Split

_MODULES = {
    avmnist.NAME: avmnist,
    multibench.NAME: multibench,
    mfeat.NAME: mfeat,
    synthetic.NAME: synthetic,
    cremad.NAME: cremad,
    vggsound.NAME: vggsound,
    ks.NAME: ks,
    ave.NAME: ave,
    urfunny.NAME: urfunny,
    iemocap.NAME: iemocap,
    misme.NAME: misme,
}
DATASET_NAMES = tuple(_MODULES)

__all__ = ["DATASET_NAMES", "MultimodalDataset", "Split",
           "default_data_config", "load_dataset"]


def _module(name: str):
  if name not in _MODULES:
    raise errors.ConfigError(
        f"unknown dataset {name!r}: config.data.name must be one of"
        f" {list(DATASET_NAMES)}")
  return _MODULES[name]


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """Default settings of dataset `name` (its `name` field is set)."""
  return _module(name).default_config()


def load_dataset(cfg) -> MultimodalDataset:
  """Loads the dataset named by `cfg.name` with the settings in `cfg`.

  Raises:
    ConfigError: unknown name or bad setting.
    DataError: missing or malformed data, with the fix in the message.
  """
  name = cfg.get("name", "") if hasattr(cfg, "get") else getattr(
      cfg, "name", "")
  return _module(name).load(cfg)
