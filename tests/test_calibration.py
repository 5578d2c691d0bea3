"""Expected calibration error: the core function against a hand-computed
example (its batch-wise accumulation in evaluation is in
test_pipeline_scoring.py)."""

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

