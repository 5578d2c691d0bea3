"""Media primitives (WAV reading, resampling, STFTs) against SciPy and
NumPy transcriptions of the formulas."""

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal

from g2d_jax import errors
from g2d_jax.data import media


def test_stft_matches_scipy_spectrogram():
  rng = np.random.default_rng(0)
  x = rng.standard_normal(1000)
  n_fft, hop = 222, 70
  ours = media.stft(x, n_fft, hop)
  # scipy 'spectrum' scaling divides by sum(window); undo it.
  _, _, ref = scipy.signal.spectrogram(
      x, window="hann", nperseg=n_fft, noverlap=n_fft - hop, mode="complex",
      scaling="spectrum", detrend=False)
  ref = ref.T * scipy.signal.get_window("hann", n_fft).sum()
  assert ours.shape == ref.shape == (1 + (1000 - n_fft) // hop, 112)
  np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)


def test_stft_explicit_loop_and_num_frames():
  x = np.sin(np.arange(500) * 0.3)
  ours = media.stft(x, 64, 16, num_frames=5)
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(64) / 64)
  for j in range(5):
    np.testing.assert_allclose(ours[j], np.fft.rfft(x[16 * j:16 * j + 64] * w),
                               atol=1e-12)
  with pytest.raises(ValueError):
    media.stft(x, 64, 16, num_frames=100)


def test_resample_halves_rate_and_keeps_tone():
  t = np.arange(16000) / 16000
  y = media.resample(np.sin(2 * np.pi * 440 * t), 16000, 8000)
  assert len(y) == 8000
  ref = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)
  np.testing.assert_allclose(y[200:-200], ref[200:-200], atol=1e-3)


def test_read_wav_scales_int16(tmp_path):
  p = tmp_path / "a.wav"
  scipy.io.wavfile.write(p, 8000, np.array([0, 16384, -32768], np.int16))
  sr, x = media.read_wav(str(p))
  assert sr == 8000
  np.testing.assert_array_equal(x, [0.0, 0.5, -1.0])


def test_read_wav_bad_files(tmp_path):
  p = tmp_path / "bad.wav"
  p.write_bytes(b"RIFF\x00\x00")
  with pytest.raises(errors.DataError, match="not a readable WAV"):
    media.read_wav(str(p))
  with pytest.raises(errors.DataError, match="is missing"):
    media.read_wav(str(tmp_path / "none.wav"))


def test_read_wav_averages_channels_and_load_audio_resamples(tmp_path):
  p = tmp_path / "stereo.wav"
  scipy.io.wavfile.write(p, 16000, np.array([[16384, 0], [-32768, 16384]],
                                            np.int16))
  sr, x = media.read_wav(str(p))
  assert sr == 16000
  np.testing.assert_array_equal(x, [0.25, -0.25])
  t = np.arange(16000) / 16000
  tone = (np.sin(2 * np.pi * 440 * t) * 16384).astype(np.int16)
  scipy.io.wavfile.write(tmp_path / "tone.wav", 16000, tone)
  y = media.load_audio(str(tmp_path / "tone.wav"), 8000)
  np.testing.assert_allclose(y, media.resample(tone / 32768.0, 16000, 8000))


def test_log_stft_is_the_centred_librosa_stft():
  """Frame j is centred on sample j * hop: the window over the zero-padded
  signal's samples [j*hop, j*hop + n_fft), log(|rfft| + 1e-7)."""
  x = np.cos(np.arange(300) * 0.2)
  out = media.log_stft(x, 64, 16)
  assert out.shape == (33, 1 + 300 // 16) and out.dtype == np.float32
  padded = np.concatenate([np.zeros(32), x, np.zeros(32)])
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(64) / 64)
  for j in (0, 5, 18):
    want = np.log(np.abs(np.fft.rfft(padded[16 * j:16 * j + 64] * w)) + 1e-7)
    np.testing.assert_allclose(out[:, j], want, rtol=1e-6, atol=1e-6)
  reflect = media.log_stft(x, 64, 16, "reflect")
  np.testing.assert_allclose(reflect[:, 5], out[:, 5], rtol=1e-6)
  assert not np.allclose(reflect[:, 0], out[:, 0])
  with pytest.raises(errors.ConfigError, match="stft_pad_mode"):
    media.log_stft(x, 64, 16, "wrap")


def test_hann_window_is_periodic():
  np.testing.assert_allclose(media.hann_window(16),
                             scipy.signal.get_window("hann", 16))
