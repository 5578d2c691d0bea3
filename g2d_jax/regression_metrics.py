"""Regression metrics of the paper's MIS-ME table (G2D Table 3): MAPE and R^2.

Pure NumPy functions of (targets, predictions), computed in float64, with
the definitions of the official MIS-ME evaluation (`eval.py`):

  MAPE = 100 / N * sum_i |(y_i - p_i) / y_i|            (percent)
  R^2  = 1 - sum_i (y_i - p_i)^2 / sum_i (y_i - mean(y))^2
         (scikit-learn's `r2_score`: for constant targets 1.0 if the
         predictions are exact, else 0.0)

plus MAE, RMSE and MPE (signed mean percentage error), which the official
evaluation also logs. For MIS-ME, evaluate on volumetric water content, not
on the [0, 1]-scaled targets the model is trained on: map both back with
`g2d_jax.data.misme.unscale_targets` first (MAPE changes under a shift).
"""

from __future__ import annotations

import numpy as np


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
  y = np.asarray(y_true, dtype=np.float64).reshape(-1)
  p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
  if y.shape != p.shape:
    raise ValueError(f"targets ({y.size}) and predictions ({p.size}) differ"
                     " in length")
  if y.size == 0:
    raise ValueError("regression metrics need at least one sample")
  if not (np.all(np.isfinite(y)) and np.all(np.isfinite(p))):
    raise ValueError("targets and predictions must be finite")
  return y, p


def mae(y_true, y_pred) -> float:
  """Mean absolute error."""
  y, p = _pair(y_true, y_pred)
  return float(np.mean(np.abs(y - p)))


def rmse(y_true, y_pred) -> float:
  """Root mean squared error."""
  y, p = _pair(y_true, y_pred)
  return float(np.sqrt(np.mean((y - p) ** 2)))


def mape(y_true, y_pred) -> float:
  """Mean absolute percentage error in percent (official MIS-ME definition).

  Raises:
    ValueError: a target is zero (the error is undefined there).
  """
  y, p = _pair(y_true, y_pred)
  if np.any(y == 0):
    raise ValueError("MAPE is undefined for zero targets; evaluate on"
                     " unscaled values (misme.unscale_targets)")
  return float(100.0 * np.mean(np.abs((y - p) / y)))


def mpe(y_true, y_pred) -> float:
  """Mean signed percentage error, 100 * mean((y - p) / y), in percent."""
  y, p = _pair(y_true, y_pred)
  if np.any(y == 0):
    raise ValueError("MPE is undefined for zero targets")
  return float(100.0 * np.mean((y - p) / y))


def r2_score(y_true, y_pred) -> float:
  """Coefficient of determination, as scikit-learn's `r2_score`."""
  y, p = _pair(y_true, y_pred)
  ss_res = float(np.sum((y - p) ** 2))
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  if ss_tot == 0.0:
    return 1.0 if ss_res == 0.0 else 0.0
  return 1.0 - ss_res / ss_tot


def regression_report(y_true, y_pred) -> dict[str, float]:
  """{"mape", "r2", "mae", "rmse", "mpe"} of one evaluation."""
  return {"mape": mape(y_true, y_pred), "r2": r2_score(y_true, y_pred),
          "mae": mae(y_true, y_pred), "rmse": rmse(y_true, y_pred),
          "mpe": mpe(y_true, y_pred)}
