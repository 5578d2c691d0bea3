"""Tests of PCA fit/reconstruction against an SVD reference and real MNIST."""

import os

import numpy as np

from g2d_jax.data import mnist
from g2d_jax.data import pca
from tests.conftest import DATA_DIR


def test_fit_matches_svd_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 3.0
  fit = pca.fit_pca(x, chunk=64)
  c = x - x.mean(0)
  _, s, vt = np.linalg.svd(c, full_matrices=False)
  np.testing.assert_allclose(fit.mean, x.mean(0))
  np.testing.assert_allclose(fit.explained_variance_ratio, s**2 / np.sum(s**2),
                             rtol=1e-10)
  for k in (1, 3):
    ref = x.mean(0) + c @ vt[:k].T @ vt[:k]
    np.testing.assert_allclose(pca.reconstruct(x, fit, k), ref, atol=1e-9)
  np.testing.assert_allclose(pca.reconstruct(x, fit, 6), x, atol=1e-9)


def test_energy_rule():
  ratio = np.array([0.1, 0.07, 0.06, 0.05, 0.72])
  assert pca.num_components_for_energy(ratio, 0.25) == 3   # 0.23 < 0.25
  assert pca.num_components_for_energy(ratio, 0.23) == 2   # 0.23 is not < 0.23
  assert pca.num_components_for_energy(ratio, 0.05) == 1   # at least one


def test_reconstruct_uint8_clips_and_rounds():
  fit = pca.PCA(np.zeros(2), np.eye(2), np.array([0.5, 0.5]))
  x = np.array([[-3.0, 254.6], [300.0, 10.4]])
  np.testing.assert_array_equal(pca.reconstruct_uint8(x, fit, 2),
                                [[0, 255], [255, 10]])


def test_mnist_train_keeps_3_components_at_25_percent():
  images = mnist.load_mnist(os.path.join(DATA_DIR, "mnist"))["train"][0]
  fit = pca.fit_pca(images[:55000].reshape(55000, -1))
  assert pca.num_components_for_energy(fit.explained_variance_ratio, 0.25) == 3
  cum = np.cumsum(fit.explained_variance_ratio)
  np.testing.assert_allclose(cum[:4], [0.0971, 0.1678, 0.2296, 0.2835],
                             atol=5e-4)
