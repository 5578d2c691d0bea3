"""Tests for g2d_jax.smp: the SMP schedule (Eq. 6-7) and partial suppression."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import g2d_jax
from g2d_jax import smp


def kappas(confidence, epoch, taus, **kw):
  out = g2d_jax.smp_kappa(confidence, epoch, taus, **kw)
  return {m: float(v) for m, v in out.items()}


def test_three_modality_schedule_table():
  # Ranking by confidence: a (0.2) < c (0.5) < b (0.9).
  conf = {"a": 0.2, "b": 0.9, "c": 0.5}
  # taus = (2, 3): epochs 0-1 a alone, 2-4 c alone, then all three.
  table = {
      0: (1, 0, 0), 1: (1, 0, 0),
      2: (0, 0, 1), 3: (0, 0, 1), 4: (0, 0, 1),
      5: (1, 1, 1), 6: (1, 1, 1), 7: (1, 1, 1),
  }
  for epoch, (ka, kb, kc) in table.items():
    assert kappas(conf, epoch, (2, 3)) == {"a": ka, "b": kb, "c": kc}, epoch
  stages = [int(g2d_jax.smp_stage(e, (2, 3))) for e in range(8)]
  assert stages == [0, 0, 1, 1, 1, 2, 2, 2]


def test_schedule_jitted_with_traced_epoch_and_confidence_compiles_once():
  traces = []

  @jax.jit
  def f(conf, epoch):
    traces.append(1)
    return g2d_jax.smp_kappa(conf, epoch, (2, 3))

  conf = {"a": jnp.float32(0.2), "b": jnp.float32(0.9), "c": jnp.float32(0.5)}
  for epoch in range(8):
    got = {m: float(v) for m, v in f(conf, jnp.int32(epoch)).items()}
    assert got == kappas({m: float(v) for m, v in conf.items()}, epoch, (2, 3))
  # A different ranking in the same compiled function.
  conf2 = {"a": jnp.float32(0.9), "b": jnp.float32(0.1), "c": jnp.float32(0.5)}
  got = {m: float(v) for m, v in f(conf2, jnp.int32(0)).items()}
  assert got == {"a": 0.0, "b": 1.0, "c": 0.0}
  assert len(traces) == 1


def test_two_modalities_official_window():
  conf = {"audio": 0.4, "image": 0.7}
  for epoch in (0, 75, 150):
    assert kappas(conf, epoch, (151,)) == {"audio": 1.0, "image": 0.0}
  for epoch in (151, 299):
    assert kappas(conf, epoch, (151,)) == {"audio": 1.0, "image": 1.0}
  # The ranking is re-decided per batch: a batch where audio is stronger.
  assert kappas({"audio": 0.8, "image": 0.7}, 3, (151,)) == {
      "audio": 0.0, "image": 1.0}


def test_ties_break_by_modality_order_and_never_raise():
  tie = {"image": 0.5, "audio": 0.5}
  # Default order is sorted names: audio first, so audio is "weakest".
  assert kappas(tie, 0, (1,)) == {"audio": 1.0, "image": 0.0}
  assert kappas(tie, 0, (1,), modalities=("image", "audio")) == {
      "audio": 0.0, "image": 1.0}
  # Three-way tie, second stage: the second modality in order.
  tie3 = {"x": 0.3, "y": 0.3, "z": 0.3}
  assert kappas(tie3, 1, (1, 1)) == {"x": 0.0, "y": 1.0, "z": 0.0}
  assert kappas(tie3, 1, (1, 1), modalities=("z", "y", "x")) == {
      "x": 0.0, "y": 1.0, "z": 0.0}
  assert kappas(tie3, 0, (1, 1), modalities=("z", "y", "x")) == {
      "x": 0.0, "y": 0.0, "z": 1.0}
  # Partial tie: the two lowest tie; the lower in order goes first.
  assert kappas({"x": 0.9, "y": 0.3, "z": 0.3}, 0, (1, 1)) == {
      "x": 0.0, "y": 1.0, "z": 0.0}
  assert kappas({"x": 0.9, "y": 0.3, "z": 0.3}, 1, (1, 1)) == {
      "x": 0.0, "y": 0.0, "z": 1.0}


def test_zero_length_stages():
  conf = {"a": 0.2, "b": 0.9, "c": 0.5}
  # tau_1 = 0: skip straight to the second weakest alone.
  assert kappas(conf, 0, (0, 2)) == {"a": 0.0, "b": 0.0, "c": 1.0}
  assert kappas(conf, 2, (0, 2)) == {"a": 1.0, "b": 1.0, "c": 1.0}
  # No SMP at all.
  assert kappas({"a": 0.1, "b": 0.2}, 0, (0,)) == {"a": 1.0, "b": 1.0}
  assert not bool(g2d_jax.smp_active(0, (0,)))
  assert bool(g2d_jax.smp_active(150, (151,)))
  assert not bool(g2d_jax.smp_active(151, (151,)))


def test_schedule_argument_errors():
  with pytest.raises(ValueError, match="k - 1 = 2"):
    g2d_jax.smp_kappa({"a": 0.1, "b": 0.2, "c": 0.3}, 0, (5,))
  with pytest.raises(ValueError, match="at least two"):
    g2d_jax.smp_kappa({"a": 0.1}, 0, ())
  with pytest.raises(ValueError, match="non-negative"):
    g2d_jax.smp_kappa({"a": 0.1, "b": 0.2}, 0, (-1,))
  with pytest.raises(ValueError, match="do not match"):
    g2d_jax.smp_kappa({"a": 0.1, "b": 0.2}, 0, (1,), modalities=("a", "c"))


def ogm_ge_coefficients(score_a, score_v, alpha):
  """OGM-GE's released two-modality rule, transcribed branch by branch."""
  ratio_v = score_v / score_a
  ratio_a = 1 / ratio_v
  if ratio_v > 1:
    return 1.0, 1 - math.tanh(alpha * ratio_v)
  return 1 - math.tanh(alpha * ratio_a), 1.0


@pytest.mark.parametrize("sa,sv", [(0.3, 0.6), (0.6, 0.3), (0.5, 0.5),
                                   (0.9, 0.1)])
@pytest.mark.parametrize("alpha", [0.1, 0.8, 1.0])
def test_partial_kappa_matches_ogm_ge_for_two_modalities(sa, sv, alpha):
  got = g2d_jax.partial_kappa({"audio": sa, "visual": sv}, alpha)
  ka, kv = ogm_ge_coefficients(sa, sv, alpha)
  assert float(got["audio"]) == pytest.approx(ka, rel=1e-6)
  assert float(got["visual"]) == pytest.approx(kv, rel=1e-6)


def test_partial_kappa_hand_value_and_three_modalities():
  got = g2d_jax.partial_kappa({"audio": 0.3, "image": 0.6}, 0.8)
  assert float(got["image"]) == pytest.approx(1 - math.tanh(1.6), rel=1e-6)
  assert float(got["image"]) == pytest.approx(0.0783314, rel=1e-5)
  # Three modalities: dominant c, r = 0.8 / mean(0.2, 0.6) = 2.
  got3 = jax.jit(lambda c: g2d_jax.partial_kappa(c, 0.5))(
      {"a": 0.2, "b": 0.6, "c": 0.8})
  assert float(got3["c"]) == pytest.approx(1 - math.tanh(1.0), rel=1e-6)
  assert float(got3["a"]) == 1.0 and float(got3["b"]) == 1.0
  # All-zero confidences do not produce NaN.
  got0 = g2d_jax.partial_kappa({"a": 0.0, "b": 0.0}, 1.0)
  assert np.isfinite(float(got0["a"])) and float(got0["a"]) == 1.0


def test_modality_order_default_is_sorted():
  assert smp.modality_order({"video": 1, "audio": 2}) == ("audio", "video")
