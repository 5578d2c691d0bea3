"""Tests of the UCI Multiple Features loader on the real files."""

import os

import numpy as np
import pytest

from g2d_jax import errors
from g2d_jax.data import mfeat
from tests.conftest import DATA_DIR


def _cfg(**kw):
  cfg = mfeat.default_config()
  cfg.data_dir = DATA_DIR
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_default_split_and_standardisation():
  ds = mfeat.load(_cfg())
  assert ds.modalities == ("pix", "fou") and ds.num_classes == 10
  sizes = {s: len(ds.splits[s]) for s in ("train", "val", "test")}
  assert sizes == {"train": 1200, "val": 400, "test": 400}
  for s, per in (("train", 120), ("val", 40), ("test", 40)):
    np.testing.assert_array_equal(np.bincount(ds.splits[s].labels), [per] * 10)
  tr = ds.splits["train"].inputs["pix"]
  assert tr.shape == (1200, 240) and tr.dtype == np.float32
  # Standardised with train statistics: train is exactly centred/unit.
  np.testing.assert_allclose(tr.mean(0), 0, atol=1e-5)
  std = tr.std(0)
  np.testing.assert_allclose(std[std > 0], 1, atol=1e-4)
  assert ds.splits["val"].scales == {"pix": 1.0, "fou": 1.0}


def test_rows_match_the_csv():
  ds = mfeat.load(_cfg(views=("mor",)))
  raw = np.loadtxt(os.path.join(DATA_DIR, "mfeat", "mfeat-mor.csv"),
                   delimiter=",", skiprows=1)
  idx = mfeat.stratified_split(raw[:, -1].astype(int), 0.6, 0.2, 0)
  x = raw[idx["train"], :-1]
  expected = (raw[idx["test"], :-1] - x.mean(0)) / x.std(0)
  np.testing.assert_allclose(ds.splits["test"].inputs["mor"], expected,
                             rtol=1e-5, atol=1e-5)
  # Splits are disjoint and cover all 2000 samples.
  all_idx = np.concatenate(list(idx.values()))
  assert len(np.unique(all_idx)) == 2000


def test_three_views_and_seed():
  a = mfeat.load(_cfg(views=("fac", "kar", "zer")))
  b = mfeat.load(_cfg(views=("fac", "kar", "zer"), seed=1))
  assert a.modalities == ("fac", "kar", "zer")
  assert a.splits["train"].inputs["zer"].shape == (1200, 47)
  assert a.fingerprint["label_sha256"] != b.fingerprint["label_sha256"] or (
      not np.array_equal(a.splits["train"].inputs["fac"],
                         b.splits["train"].inputs["fac"]))


def test_bad_inputs(tmp_path):
  with pytest.raises(errors.ConfigError, match="give distinct views from"):
    mfeat.load(_cfg(views=("pix", "img")))
  (tmp_path / "mfeat").mkdir()
  with pytest.raises(errors.DataError, match="mfeat-pix.csv is missing"):
    mfeat.load(_cfg(data_dir=str(tmp_path)))
  src = os.path.join(DATA_DIR, "mfeat", "mfeat-pix.csv")
  lines = open(src).read().splitlines()
  (tmp_path / "mfeat" / "mfeat-pix.csv").write_text("\n".join(lines[:500]))
  with pytest.raises(errors.DataError,
                     match=r"shape \(499, 241\).*expected \(2000, 241\)"):
    mfeat.load(_cfg(data_dir=str(tmp_path), views=("pix",)))
  bad = lines[:1] + [l[: l.rfind(",")] + ",11" for l in lines[1:]]
  (tmp_path / "mfeat" / "mfeat-pix.csv").write_text("\n".join(bad))
  with pytest.raises(errors.DataError, match="labels out of range"):
    mfeat.load(_cfg(data_dir=str(tmp_path), views=("pix",)))
