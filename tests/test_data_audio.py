"""Tests of the pure audio functions against independent NumPy/SciPy math."""

import os

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal

from g2d_jax import errors
from g2d_jax.data import audio
from tests.conftest import DATA_DIR


def test_stft_matches_scipy_spectrogram():
  rng = np.random.default_rng(0)
  x = rng.standard_normal(1000)
  n_fft, hop = 222, 70
  ours = audio.stft(x, n_fft, hop)
  # scipy 'spectrum' scaling divides by sum(window); undo it.
  _, _, ref = scipy.signal.spectrogram(
      x, window="hann", nperseg=n_fft, noverlap=n_fft - hop, mode="complex",
      scaling="spectrum", detrend=False)
  ref = ref.T * scipy.signal.get_window("hann", n_fft).sum()
  assert ours.shape == ref.shape == (1 + (1000 - n_fft) // hop, 112)
  np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)


def test_stft_explicit_loop_and_num_frames():
  x = np.sin(np.arange(500) * 0.3)
  ours = audio.stft(x, 64, 16, num_frames=5)
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(64) / 64)
  for j in range(5):
    np.testing.assert_allclose(ours[j], np.fft.rfft(x[16 * j:16 * j + 64] * w),
                               atol=1e-12)
  with pytest.raises(ValueError):
    audio.stft(x, 64, 16, num_frames=100)


def test_tone_on_bin_reads_its_amplitude_in_db():
  n_fft, hop, k, amp = 222, 70, 20, 0.25
  t = np.arange(audio.num_window_samples(n_fft, hop, 112))
  x = amp * np.cos(2 * np.pi * k * t / n_fft)
  db = audio.power_db(audio.stft(x, n_fft, hop, 112),
                      audio.full_scale_reference(n_fft))
  assert db.shape == (112, 112)
  assert np.all(np.argmax(db, axis=1) == k)
  np.testing.assert_allclose(db[:, k], 20 * np.log10(amp), atol=1e-6)
  # Hann leakage: neighbours at half amplitude (-6.02 dB), others ~silent.
  np.testing.assert_allclose(db[:, k + 1], 20 * np.log10(amp / 2), atol=1e-6)
  assert np.all(db[:, k + 3] < -90)


def test_full_scale_reference_is_half_window_sum():
  assert audio.full_scale_reference(222) == pytest.approx(55.5)
  np.testing.assert_allclose(audio.hann_window(16),
                             scipy.signal.get_window("hann", 16))


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


def test_resample_halves_rate_and_keeps_tone():
  t = np.arange(16000) / 16000
  y = audio.resample(np.sin(2 * np.pi * 440 * t), 16000, 8000)
  assert len(y) == 8000
  ref = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
  np.testing.assert_allclose(y[200:-200], ref[200:-200], atol=1e-3)


def test_read_wav_scales_int16(tmp_path):
  p = tmp_path / "a.wav"
  scipy.io.wavfile.write(p, 8000, np.array([0, 16384, -32768], np.int16))
  sr, x = audio.read_wav(str(p))
  assert sr == 8000
  np.testing.assert_array_equal(x, [0.0, 0.5, -1.0])


def test_read_wav_bad_files(tmp_path):
  p = tmp_path / "bad.wav"
  p.write_bytes(b"RIFF\x00\x00")
  with pytest.raises(errors.DataError, match="not a readable WAV"):
    audio.read_wav(str(p))
  with pytest.raises(errors.DataError, match="is missing"):
    audio.read_wav(str(tmp_path / "none.wav"))


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
