"""Golden-number tests of g2d_jax.regression_metrics (MAPE, R^2, ...).

The expected values are worked out by hand in the comments.
"""

import numpy as np
import pytest

from g2d_jax import regression_metrics as rm

# y - p = [-0.02, 0.05, 0, -0.1]
Y = [0.2, 0.25, 0.1, 0.4]
P = [0.22, 0.2, 0.1, 0.5]


def test_golden_numbers():
  # |y - p| / y = [0.1, 0.2, 0, 0.25] -> mean 0.1375.
  assert rm.mape(Y, P) == pytest.approx(13.75, abs=1e-12)
  # (y - p) / y = [-0.1, 0.2, 0, -0.25] -> mean -0.0375.
  assert rm.mpe(Y, P) == pytest.approx(-3.75, abs=1e-12)
  # (0.02 + 0.05 + 0 + 0.1) / 4.
  assert rm.mae(Y, P) == pytest.approx(0.0425, abs=1e-15)
  # mean squared error (0.0004 + 0.0025 + 0 + 0.01) / 4 = 0.003225.
  assert rm.rmse(Y, P) == pytest.approx(0.003225 ** 0.5, abs=1e-15)
  # mean(y) = 0.2375, SS_tot = 0.046875, SS_res = 0.0129 -> 1 - 0.2752.
  assert rm.r2_score(Y, P) == pytest.approx(0.7248, abs=1e-12)
  report = rm.regression_report(np.array(Y)[:, None], np.array(P))
  assert report == pytest.approx({"mape": 13.75, "r2": 0.7248,
                                  "mae": 0.0425, "rmse": 0.003225 ** 0.5,
                                  "mpe": -3.75})


def test_r2_edge_cases():
  # Reversed predictions: SS_res = 8, SS_tot = 2 -> 1 - 4 = -3.
  assert rm.r2_score([1, 2, 3], [3, 2, 1]) == pytest.approx(-3.0)
  assert rm.r2_score([1, 2, 3], [1, 2, 3]) == 1.0
  # Predicting the mean scores exactly 0.
  assert rm.r2_score([1, 2, 3], [2, 2, 2]) == 0.0
  # Constant targets (scikit-learn's convention).
  assert rm.r2_score([0.3, 0.3], [0.3, 0.3]) == 1.0
  assert rm.r2_score([0.3, 0.3], [0.3, 0.4]) == 0.0


def test_mape_is_not_shift_invariant_and_rejects_zero_targets():
  # Same absolute errors, targets shifted by +1: |e| / (y + 1).
  shifted = rm.mape(np.add(Y, 1.0), np.add(P, 1.0))
  want = 100 * np.mean(np.abs(np.subtract(Y, P)) / np.add(Y, 1.0))
  assert shifted == pytest.approx(want) and shifted < rm.mape(Y, P)
  with pytest.raises(ValueError, match="zero targets"):
    rm.mape([0.0, 0.5], [0.1, 0.5])
  with pytest.raises(ValueError, match="differ in length"):
    rm.r2_score([1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="finite"):
    rm.mae([1.0, np.nan], [1.0, 1.0])
  with pytest.raises(ValueError, match="at least one"):
    rm.rmse([], [])
