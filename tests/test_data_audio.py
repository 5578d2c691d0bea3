"""AV-MNIST's audio recipe (noise mixing, dB mapping, placement, FSDD
listing) against independent NumPy math."""

import os

import numpy as np
import pytest

from g2d_jax import errors
from g2d_jax.data import audio
from g2d_jax.data import media
from tests.conftest import DATA_DIR


def test_tone_on_bin_reads_its_amplitude_in_db():
  n_fft, hop, k, amp = 222, 70, 20, 0.25
  t = np.arange(media.num_window_samples(n_fft, hop, 112))
  x = amp * np.cos(2 * np.pi * k * t / n_fft)
  db = audio.power_db(media.stft(x, n_fft, hop, 112),
                      audio.full_scale_reference(n_fft))
  assert db.shape == (112, 112)
  assert np.all(np.argmax(db, axis=1) == k)
  np.testing.assert_allclose(db[:, k], 20 * np.log10(amp), atol=1e-6)
  # Hann leakage: neighbours at half amplitude (-6.02 dB), others ~silent.
  np.testing.assert_allclose(db[:, k + 1], 20 * np.log10(amp / 2), atol=1e-6)
  assert np.all(db[:, k + 3] < -90)


def test_full_scale_reference_is_half_window_sum():
  assert audio.full_scale_reference(222) == pytest.approx(55.5)


def test_mix_at_snr_hits_target():
  rng = np.random.default_rng(1)
  s, n = rng.standard_normal(4000), rng.standard_normal(4000) * 7
  for snr in (-5.0, 0.0, 12.5):
    mixed = audio.mix_at_snr(s, n, snr)
    got = 10 * np.log10(np.sum(s ** 2) / np.sum((mixed - s) ** 2))
    assert got == pytest.approx(snr, abs=1e-9)


def test_mix_uses_given_speech_rms():
  s, n = np.ones(100), np.ones(100) * 3
  mixed = audio.mix_at_snr(s, n, 20.0, speech_rms=2.0)
  np.testing.assert_allclose(mixed - s, 0.2)


def test_db_to_uint8_mapping():
  db = np.array([-150.0, -100.0, -49.0, -0.1, 0.0, 10.0])
  np.testing.assert_array_equal(audio.db_to_uint8(db, -100.0, 0.0),
                                [0, 0, 130, 255, 255, 255])
  assert audio.db_to_uint8(db, -100.0, 0.0).dtype == np.uint8


def test_place_in_window():
  x = np.arange(1, 5, dtype=float)
  np.testing.assert_array_equal(audio.place_in_window(x, 8),
                                [0, 0, 1, 2, 3, 4, 0, 0])
  np.testing.assert_array_equal(audio.place_in_window(x, 6, "start"),
                                [1, 2, 3, 4, 0, 0])
  np.testing.assert_array_equal(audio.place_in_window(x, 2), [2, 3])
  with pytest.raises(errors.ConfigError):
    audio.place_in_window(x, 2, "end")


def test_list_fsdd_real():
  recs = audio.list_fsdd(os.path.join(DATA_DIR, "fsdd", "recordings"))
  assert len(recs) == 3000
  assert {r.speaker for r in recs} == set(audio.FSDD_SPEAKERS)
  assert recs[0] == audio.Recording("0_george_0.wav", 0, "george", 0)


def test_list_fsdd_missing(tmp_path):
  with pytest.raises(errors.DataError, match="FSDD folder .* is missing"):
    audio.list_fsdd(str(tmp_path / "x"))
  with pytest.raises(errors.DataError, match="holds no FSDD recordings"):
    audio.list_fsdd(str(tmp_path))
