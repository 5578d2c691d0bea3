"""PCA fit and reconstruction, as used for AV-MNIST's degraded image view."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PCA:
  """A fitted PCA.

  Attributes:
    mean: [D] feature means of the fitting data.
    components: [D, D] eigenvectors as columns, by decreasing variance.
    explained_variance_ratio: [D] variance share of each component.
  """
  mean: np.ndarray
  components: np.ndarray
  explained_variance_ratio: np.ndarray


def fit_pca(x: np.ndarray, chunk: int = 8192) -> PCA:
  """Fits PCA on rows of `x` ([N, D], any numeric dtype) in float64.

  The covariance is accumulated in row chunks so a uint8 input is never
  materialised whole in float64.
  """
  n, d = x.shape
  mean = np.zeros(d)
  for s in range(0, n, chunk):
    mean += np.asarray(x[s:s + chunk], dtype=np.float64).sum(axis=0)
  mean /= n
  cov = np.zeros((d, d))
  for s in range(0, n, chunk):
    c = np.asarray(x[s:s + chunk], dtype=np.float64) - mean
    cov += c.T @ c
  cov /= max(n - 1, 1)
  evals, evecs = np.linalg.eigh(cov)
  order = np.argsort(evals)[::-1]
  evals = np.maximum(evals[order], 0.0)
  total = evals.sum()
  ratio = evals / total if total > 0 else np.zeros_like(evals)
  return PCA(mean, evecs[:, order], ratio)


def num_components_for_energy(explained_variance_ratio: np.ndarray,
                              energy: float) -> int:
  """Number of leading components whose cumulative variance stays < energy.

  This is the MFAS AV-MNIST rule ("components under 25% cumulative energy"),
  which keeps 3 components on MNIST train. At least one component is kept.
  """
  cum = np.cumsum(explained_variance_ratio)
  return max(1, int(np.sum(cum < energy)))


def reconstruct(x: np.ndarray, pca: PCA, k: int) -> np.ndarray:
  """Projects rows of `x` on the first k components and maps them back.

  Returns:
    float64 [N, D]: mean + (x - mean) V_k V_k^T.
  """
  v = pca.components[:, :k]
  c = np.asarray(x, dtype=np.float64) - pca.mean
  return pca.mean + (c @ v) @ v.T


def reconstruct_uint8(x: np.ndarray, pca: PCA, k: int) -> np.ndarray:
  """`reconstruct`, rounded to nearest and clipped to [0, 255] as uint8.

  Low-rank reconstructions overshoot the pixel range slightly (ringing below
  0 and above 255 around strokes); clipping to the valid range keeps the
  stored images in the same units as MNIST, so loaders divide by 255.
  """
  return np.clip(np.rint(reconstruct(x, pca, k)), 0, 255).astype(np.uint8)
