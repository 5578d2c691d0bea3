"""Tests of the dataset registry in g2d_jax.data."""

import pytest

from g2d_jax import data
from g2d_jax import errors
from tests.conftest import DATA_DIR


def test_names_and_default_configs():
  assert set(data.DATASET_NAMES) == {
      "avmnist", "avmnist_multibench", "mfeat", "synthetic", "cremad",
      "vggsound", "urfunny", "iemocap", "misme", "kinetics_sounds", "ave"}
  for name in data.DATASET_NAMES:
    cfg = data.default_data_config(name)
    assert cfg.name == name


def test_unknown_name_lists_valid_ones():
  with pytest.raises(errors.ConfigError) as e:
    data.default_data_config("ucf101")
  msg = str(e.value)
  assert "unknown dataset 'ucf101'" in msg
  for name in data.DATASET_NAMES:
    assert repr(name) in msg
  cfg = data.default_data_config("synthetic")
  cfg.name = "mnist"
  with pytest.raises(errors.ConfigError, match="unknown dataset 'mnist'"):
    data.load_dataset(cfg)


def test_dispatch():
  ds = data.load_dataset(data.default_data_config("synthetic"))
  assert isinstance(ds, data.MultimodalDataset) and ds.name == "synthetic"
  cfg = data.default_data_config("mfeat")
  cfg.data_dir = DATA_DIR
  assert data.load_dataset(cfg).name == "mfeat"
