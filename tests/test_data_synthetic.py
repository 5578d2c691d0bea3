"""Tests of the synthetic imbalanced generator."""

import numpy as np
import pytest

from g2d_jax import errors
from g2d_jax.data import synthetic


def _centroid_scores(ds, m):
  tr, te = ds.splits["train"], ds.splits["test"]
  mu = np.stack([tr.inputs[m][tr.labels == c].mean(0)
                 for c in range(ds.num_classes)])
  return -0.5 * ((te.inputs[m][:, None] - mu[None]) ** 2).sum(-1)


def test_imbalance_and_complementarity():
  cfg = synthetic.default_config()
  cfg.num_train, cfg.num_test = 4000, 4000
  ds = synthetic.load(cfg)
  assert ds.name == "synthetic" and ds.modalities == ("m0", "m1")
  y = ds.splits["test"].labels
  s0, s1 = _centroid_scores(ds, "m0"), _centroid_scores(ds, "m1")
  acc0 = np.mean(s0.argmax(1) == y)
  acc1 = np.mean(s1.argmax(1) == y)
  fused = np.mean((s0 + s1).argmax(1) == y)
  assert 0.75 < acc0 < 0.87      # strong, easy modality
  assert 0.33 < acc1 < 0.47      # weak modality, well above chance (0.1)
  assert fused > acc0 + 0.03     # the weak one is complementary


def test_shapes_dtypes_and_determinism():
  cfg = synthetic.default_config()
  cfg.num_modalities, cfg.dims, cfg.signal, cfg.groups = 3, (4, 12, 10), (
      3.0, 1.0, 0.5), (2, 0, 0)
  cfg.num_classes = 4
  a, b = synthetic.load(cfg), synthetic.load(cfg)
  assert a.modalities == ("m0", "m1", "m2")
  for s, n in (("train", 2000), ("val", 500), ("test", 1000)):
    assert len(a.splits[s]) == n
    assert a.splits[s].labels.dtype == np.int32
    assert a.splits[s].inputs["m1"].shape == (n, 12)
    assert a.splits[s].inputs["m1"].dtype == np.float32
    for m in a.modalities:
      np.testing.assert_array_equal(a.splits[s].inputs[m],
                                    b.splits[s].inputs[m])
  assert a.fingerprint == b.fingerprint
  # groups=2: m0's class means for classes 0 and 2 coincide (blind to it).
  tr = a.splits["train"]
  mu = [tr.inputs["m0"][tr.labels == c].mean(0) for c in range(4)]
  assert np.linalg.norm(mu[0] - mu[2]) < 0.3 < np.linalg.norm(mu[0] - mu[1])


def test_test_split_independent_of_train_size():
  cfg = synthetic.default_config()
  a = synthetic.load(cfg)
  cfg.num_train = 50
  b = synthetic.load(cfg)
  np.testing.assert_array_equal(a.splits["test"].inputs["m0"],
                                b.splits["test"].inputs["m0"])
  assert a.fingerprint != b.fingerprint


def test_regression():
  cfg = synthetic.default_config()
  cfg.task = "regression"
  ds = synthetic.load(cfg)
  assert ds.task == "regression" and ds.num_classes == 1
  y = ds.splits["train"].labels
  assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1
  # The signal is linear in the target: least squares recovers it.
  x = ds.splits["train"].inputs["m0"]
  coef, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)
  xt = ds.splits["test"].inputs["m0"]
  pred = np.c_[xt, np.ones(len(xt))] @ coef
  # Along w the signal 2.5 * (2z - 1) has variance 2.5^2 / 3 against unit
  # noise, so the best linear correlation is sqrt(v / (v + 1)) ~ 0.822.
  v = 2.5**2 / 3
  corr = np.corrcoef(pred, ds.splits["test"].labels)[0, 1]
  assert corr == pytest.approx(np.sqrt(v / (v + 1)), abs=0.03)


def test_bad_config():
  cfg = synthetic.default_config()
  cfg.signal = (1.0,)
  with pytest.raises(errors.ConfigError, match="signal has 1 entries but"
                     " num_modalities=2"):
    synthetic.load(cfg)


def test_random_dataset_has_the_shapes_and_a_random_name():
  ds = synthetic.random_dataset(5, {"a": (3, 2), "b": (4,)}, 7, "random_x")
  assert ds.name == "random_x" and ds.modalities == ("a", "b")
  for s in ("train", "val", "test"):
    split = ds.splits[s]
    assert split.inputs["a"].shape == (5, 3, 2)
    assert split.inputs["b"].dtype == np.uint8
    assert split.labels.min() >= 0 and split.labels.max() < 7
  b = ds.splits["train"].batch(np.arange(2))
  np.testing.assert_allclose(b["a"], ds.splits["train"].inputs["a"][:2] / 255,
                             rtol=1e-6)
