"""Tests for g2d_jax.confidence (paper Eq. 5)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import g2d_jax


def test_teacher_confidence_hand_value():
  # softmax([0, ln 3]) = [.25, .75]; labels 1 and 0 -> mean(.75, .25) = .5;
  # the second teacher is sure of the truth on sample 0 only.
  logits = {"audio": jnp.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]]),
            "image": jnp.array([[0.0, 100.0], [0.0, 100.0]])}
  rho = g2d_jax.teacher_confidence(logits, jnp.array([1, 0]))
  assert float(rho["audio"]) == pytest.approx(0.5, rel=1e-6)
  assert float(rho["image"]) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("modalities", [("audio", "video"),
                                        ("audio", "text", "visual")])
def test_teacher_confidence_matches_numpy(modalities):
  rng = np.random.default_rng(0)
  logits = {m: rng.normal(size=(9, 6)).astype(np.float32) * 2
            for m in modalities}
  labels = rng.integers(0, 6, size=9)
  got = jax.jit(g2d_jax.teacher_confidence)(logits, labels)
  for m in modalities:
    x = logits[m].astype(np.float64)
    p = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    assert float(got[m]) == pytest.approx(
        np.mean([p[i, y] for i, y in enumerate(labels)]), rel=1e-5)


def test_teacher_confidence_regression():
  out = {"image": jnp.array([0.0, 2.0, -1.0]),
         "tabular": jnp.array([[0.0], [0.0], [0.0]])}
  y = jnp.array([0.5, 1.0, 0.0])
  rho = g2d_jax.teacher_confidence(out, y, task="regression")
  sig = lambda v: 1 / (1 + math.exp(-v))
  want_image = 1 - (0.0 + (1 - sig(2.0)) + sig(-1.0)) / 3
  assert float(rho["image"]) == pytest.approx(want_image, rel=1e-6)
  assert float(rho["tabular"]) == pytest.approx(1 - (0 + .5 + .5) / 3,
                                                rel=1e-6)


def test_teacher_confidence_bad_task():
  with pytest.raises(ValueError, match="task"):
    g2d_jax.teacher_confidence({"a": jnp.zeros((1, 2))}, jnp.zeros(1, int),
                               task="ranking")
