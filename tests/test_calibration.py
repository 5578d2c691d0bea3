"""Expected calibration error: the core function against a hand-computed
example (its batch-wise accumulation in evaluation is in
test_pipeline_scoring.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import calibration

# Five predictions over 3 classes, 5 equal-width bins (0.2 wide):
#   sample  max prob  predicted  label  correct  bin
#     0       0.9        0         0       1      (0.8, 1.0] -> 4
#     1       0.7        1         0       0      (0.6, 0.8] -> 3
#     2       0.6        2         2       1      (0.4, 0.6] -> 2 (0.6 is the
#                                                   bin's closed upper edge)
#     3       0.8        0         0       1      (0.6, 0.8] -> 3
#     4       0.5        1         2       0      (0.4, 0.6] -> 2
# bin 2: 2 samples, acc 1/2, conf (0.6 + 0.5)/2 = 0.55 -> 2/5 * 0.05 = 0.02
# bin 3: 2 samples, acc 1/2, conf 0.75              -> 2/5 * 0.25 = 0.10
# bin 4: 1 sample,  acc 1,   conf 0.9               -> 1/5 * 0.10 = 0.02
# ECE = 0.14
PROBS = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.2, 0.2, 0.6],
                  [0.8, 0.1, 0.1], [0.25, 0.5, 0.25]], np.float32)
LABELS = np.array([0, 0, 2, 0, 2], np.int32)


def test_ece_of_a_hand_computed_example():
  ece = calibration.expected_calibration_error(PROBS, LABELS, num_bins=5,
                                               from_logits=False)
  assert float(ece) == pytest.approx(0.14, abs=1e-6)
  count, correct, conf = map(np.asarray, calibration.calibration_bins(
      PROBS, LABELS, 5, from_logits=False))
  np.testing.assert_allclose(count, [0, 0, 2, 2, 1])
  np.testing.assert_allclose(correct, [0, 0, 1, 1, 1])
  np.testing.assert_allclose(conf, [0, 0, 1.1, 1.5, 0.9], rtol=1e-6)
  # Logits whose softmax is PROBS give the same value.
  from_logits = calibration.expected_calibration_error(np.log(PROBS), LABELS,
                                                       num_bins=5)
  assert float(from_logits) == pytest.approx(0.14, abs=1e-6)


def test_perfectly_calibrated_and_masked_predictions():
  # Confidence 1 and always right: ECE 0; masking out the wrong sample of a
  # two-sample batch leaves a perfect one.
  probs = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
  labels = np.array([0, 1], np.int32)
  assert float(calibration.expected_calibration_error(
      probs, labels, from_logits=False)) == pytest.approx(0.5)
  bins = calibration.calibration_bins(probs, labels, 15, from_logits=False,
                                      mask_B=np.array([1.0, 0.0]))
  assert float(calibration.ece_from_bins(*bins)) == 0.0
  assert float(calibration.ece_from_bins(*calibration.calibration_bins(
      probs, labels, 15, from_logits=False, mask_B=np.zeros(2)))) == 0.0



def _tempered_sample(temperature, n=20000, c=5, seed=0):
  """Labels drawn from softmax(z); the model reports z * temperature, so
  the calibrating temperature is `temperature`."""
  rng = np.random.default_rng(seed)
  z = rng.normal(scale=2.0, size=(n, c))
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  labels = np.array([rng.choice(c, p=row) for row in p])
  return z * temperature, labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_fit_temperature_recovers_the_tempering(temperature):
  logits, labels = _tempered_sample(temperature)
  t = calibration.fit_temperature(logits, labels)
  assert t == pytest.approx(temperature, rel=0.04)
  # The search's answer is the minimiser on a fine grid (a second path).
  grid = np.exp(np.linspace(np.log(t) - 0.05, np.log(t) + 0.05, 201))
  nll = [calibration.nll_at_temperature(logits, labels, g) for g in grid]
  assert t == pytest.approx(grid[int(np.argmin(nll))], rel=1e-3)
  # Accuracy is unchanged and the calibrated ECE is small.
  before = np.argmax(logits, 1)
  np.testing.assert_array_equal(before, np.argmax(logits / t, 1))
  ece = float(calibration.expected_calibration_error(
      jnp.asarray(logits / t, jnp.float32), jnp.asarray(labels)))
  assert ece < 0.02


def test_nll_at_temperature_matches_the_formula():
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
  labels = np.array([0, 1])
  t = 2.0
  z = logits / t
  want = np.mean([np.log(np.exp(z[i]).sum()) - z[i, labels[i]]
                  for i in range(2)])
  assert calibration.nll_at_temperature(logits, labels, t) == pytest.approx(
      want, rel=1e-12)


def test_fit_temperature_edge_cases():
  assert calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0
  # All correct with a margin: sharper is always better, down to T_MIN.
  logits = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
  labels = np.array([0, 1] * 10)
  assert calibration.fit_temperature(logits, labels) == pytest.approx(
      calibration.T_MIN, rel=1e-6)
  # Uninformative logits (all equal): any T gives log C; stays in range.
  t = calibration.fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 0]))
  assert calibration.T_MIN <= t <= calibration.T_MAX
