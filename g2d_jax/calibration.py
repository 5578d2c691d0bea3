"""Expected calibration error (ECE), the calibration metric MLB reports.

Standard equal-width-bin definition (Guo et al., ICML 2017, "On Calibration
of Modern Neural Networks", Eq. 3; the MLB paper cites it as [10]): with
confidence c_i = max_k p_ik, prediction argmax_k p_ik and M bins
B_b = (b/M, (b+1)/M] over [0, 1],

    ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|
        = (1 / n) * sum_b |sum_{i in B_b} (correct_i - c_i)|.

The second form shows that ECE needs only two additive per-bin sums (of
correctness and of confidence) and the sample count, so it can be
accumulated batch by batch (`calibration_bins`) and finished at the end
(`ece_from_bins`). A confidence of exactly 0 (impossible for a softmax) would
fall in the first bin.

Post-hoc temperature scaling (Guo et al., Sec. 4.2): one scalar T > 0 per
head, fitted on the validation split by minimising the negative
log-likelihood of softmax(logits / T); accuracy is unchanged (argmax is
invariant), only the confidence moves. `fit_temperature` minimises over
beta = 1 / T, where the NLL is convex (a log-sum-exp of linear functions
minus a linear term), by golden-section search, in float64 on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def calibration_bins(scores_BxC: Array, labels_B: Array, num_bins: int = 15,
                     *, from_logits: bool = True,
                     mask_B: Array | None = None) -> tuple[Array, Array, Array]:
  """Per-bin sums (count, correct, confidence) of one batch; additive.

  Args:
    scores_BxC: logits (`from_logits=True`) or probabilities.
    labels_B: integer labels.
    num_bins: number M of equal-width confidence bins.
    from_logits: whether `scores_BxC` are logits (softmax is applied).
    mask_B: optional 0/1 weights (padded evaluation batches).

  Returns:
    (count_M, correct_M, confidence_M): float32 sums over the batch.
  """
  scores = scores_BxC.astype(jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1) if from_logits else scores
  conf_B = jnp.max(probs, axis=-1)
  correct_B = (jnp.argmax(probs, axis=-1) == labels_B).astype(jnp.float32)
  w_B = (jnp.ones_like(conf_B) if mask_B is None
         else mask_B.astype(jnp.float32))
  # Bin b holds (b/M, (b+1)/M]: ceil(c * M) - 1, with c = 0 in bin 0.
  bin_B = jnp.clip(jnp.ceil(conf_B * num_bins).astype(jnp.int32) - 1, 0,
                   num_bins - 1)
  onehot_BxM = jax.nn.one_hot(bin_B, num_bins, dtype=jnp.float32) * w_B[:, None]
  return (jnp.sum(onehot_BxM, axis=0), correct_B @ onehot_BxM,
          conf_B @ onehot_BxM)


def ece_from_bins(count_M: Array, correct_M: Array,
                  confidence_M: Array) -> Array:
  """ECE from accumulated per-bin sums (0 when there are no samples)."""
  n = jnp.sum(count_M)
  gap = jnp.sum(jnp.abs(correct_M - confidence_M))
  return jnp.where(n > 0, gap / jnp.maximum(n, 1.0), 0.0)


def expected_calibration_error(scores_BxC: Array, labels_B: Array,
                               num_bins: int = 15, *,
                               from_logits: bool = True) -> Array:
  """ECE of one set of predictions (see the module docstring).

  Args:
    scores_BxC: logits (`from_logits=True`, the default) or probabilities.
    labels_B: integer labels.
    num_bins: number of equal-width confidence bins (15, as in Guo et al.).
    from_logits: whether `scores_BxC` are logits.

  Returns:
    A float32 scalar in [0, 1].
  """
  return ece_from_bins(*calibration_bins(scores_BxC, labels_B, num_bins,
                                         from_logits=from_logits))


# The temperatures `fit_temperature` searches: 1/20 .. 20.
T_MIN, T_MAX = 0.05, 20.0


def nll_at_temperature(logits_NxC: np.ndarray, labels_N: np.ndarray,
                       temperature: float) -> float:
  """Mean negative log-likelihood of softmax(logits / T), float64."""
  z = np.asarray(logits_NxC, np.float64) / float(temperature)
  z = z - z.max(axis=1, keepdims=True)
  log_norm = np.log(np.exp(z).sum(axis=1))
  labels = np.asarray(labels_N, np.int64)
  return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits_NxC: np.ndarray, labels_N: np.ndarray,
                    iterations: int = 80) -> float:
  """The T in [T_MIN, T_MAX] minimising the validation NLL of logits / T.

  Golden-section search over beta = 1 / T (convex there): after 80
  iterations the bracket is 1e-16 of its start, below float64 noise.
  Returns 1.0 for an empty split.
  """
  if len(labels_N) == 0:
    return 1.0
  nll = lambda beta: nll_at_temperature(logits_NxC, labels_N, 1.0 / beta)
  lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
  ratio = (np.sqrt(5.0) - 1.0) / 2.0
  a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
  fa, fb = nll(a), nll(b)
  for _ in range(iterations):
    if fa < fb:
      hi, b, fb = b, a, fa
      a = hi - ratio * (hi - lo)
      fa = nll(a)
    else:
      lo, a, fa = a, b, fb
      b = lo + ratio * (hi - lo)
      fb = nll(b)
  return float(1.0 / ((lo + hi) / 2.0))
