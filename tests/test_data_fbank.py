"""Tests of the NumPy Kaldi fbank (torchaudio.compliance.kaldi.fbank).

torch is not installed here, so the golden values come from `_reference`,
a plain per-frame, per-bin loop written from Kaldi's description (explicit
DFT sums, NumPy's own symmetric `np.hanning`, triangles built with ifs), and
from hand-checkable properties.
"""

import math

import numpy as np
import pytest

from g2d_jax.data import fbank

SR = 16000
EPS32 = float(np.finfo(np.float32).eps)


def _mel(f):
  return 1127.0 * math.log(1.0 + f / 700.0)


def _reference(x, sr=SR, bins=128, low=20.0, high=0.0, povey=False):
  """Kaldi fbank, one frame and one filter at a time (25 ms / 10 ms)."""
  size, shift = int(sr * 0.025), int(sr * 0.010)
  n_fft = 1
  while n_fft < size:
    n_fft *= 2
  high = high if high > 0 else sr / 2 + high
  m_lo, m_hi = _mel(low), _mel(high)
  step = (m_hi - m_lo) / (bins + 1)
  filt = np.zeros((bins, n_fft // 2 + 1))
  for b in range(bins):
    left, centre, right = (m_lo + b * step, m_lo + (b + 1) * step,
                           m_lo + (b + 2) * step)
    for k in range(n_fft // 2):          # the Nyquist bin keeps weight 0
      m = _mel(k * sr / n_fft)
      if left < m <= centre:
        filt[b, k] = (m - left) / (centre - left)
      elif centre < m < right:
        filt[b, k] = (right - m) / (right - centre)
  win = np.hanning(size) ** (0.85 if povey else 1.0)
  k = np.arange(n_fft // 2 + 1)[:, None]
  dft = np.exp(-2j * np.pi * k * np.arange(size)[None, :] / n_fft)
  out = []
  for j in range((len(x) - size) // shift + 1):
    fr = np.array(x[j * shift:j * shift + size], np.float64)
    fr = fr - fr.mean()
    emph = np.empty_like(fr)
    for i in range(size):
      emph[i] = fr[i] - 0.97 * fr[max(i - 1, 0)]
    power = np.abs(dft @ (emph * win)) ** 2   # zero-padded tail adds 0
    out.append([math.log(max(float(filt[b] @ power), EPS32))
                for b in range(bins)])
  return np.array(out)


def _signal(n, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(n) / SR
  return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(
      2 * np.pi * 2750 * t) + 0.05 * rng.normal(size=n) + 0.1)


def test_matches_the_loop_reference():
  x = _signal(4000)
  got = fbank.kaldi_fbank(x, SR)
  want = _reference(x)
  assert got.shape == (1 + (4000 - 400) // 160, 128) == (23, 128)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_other_sizes_and_window():
  x = _signal(3000, seed=1)
  got = fbank.kaldi_fbank(x, 8000, num_mel_bins=23, window="povey",
                          low_freq=60.0, high_freq=-400.0)
  want = _reference(x, sr=8000, bins=23, low=60.0, high=-400.0, povey=True)
  # 8 kHz: 200-sample window every 80, FFT 256.
  assert got.shape == (1 + (3000 - 200) // 80, 23)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
  np.testing.assert_allclose(fbank.feature_window("povey", 200),
                             np.hanning(200) ** 0.85, atol=1e-15)
  np.testing.assert_allclose(fbank.feature_window("hamming", 200),
                             np.hamming(200), atol=1e-15)
  np.testing.assert_allclose(fbank.feature_window("blackman", 200),
                             np.blackman(200), atol=1e-12)


@pytest.mark.parametrize("n", [400, 401, 559, 560, 16000, 160000])
def test_frame_count(n):
  assert fbank.num_frames(n, SR) == 1 + (n - 400) // 160
  if n <= 16000:
    assert fbank.kaldi_fbank(np.ones(n), SR).shape == (
        1 + (n - 400) // 160, 128)
  assert fbank.num_frames(399, SR) == 0
  with pytest.raises(ValueError, match="shorter than one 400-sample"):
    fbank.kaldi_fbank(np.ones(399), SR)


def test_window_sizes_and_mel_scale():
  assert fbank.window_sizes(16000, 25, 10) == (400, 160, 512)
  assert fbank.window_sizes(22050, 25, 10) == (551, 220, 1024)
  assert fbank.window_sizes(16000, 25, 10, False) == (400, 160, 400)
  assert fbank.mel_scale(700.0) == pytest.approx(1127.0 * math.log(2.0))
  np.testing.assert_allclose(fbank.inverse_mel_scale(fbank.mel_scale(
      [20.0, 1000.0, 8000.0])), [20.0, 1000.0, 8000.0])


def test_mel_banks_shape_and_edges():
  w, centres = fbank.mel_banks(128, 512, SR)
  assert w.shape == (128, 257) and centres.shape == (128,)
  assert np.all(w[:, 256] == 0)         # the zero Nyquist column
  assert np.all(w >= 0) and w.max() <= 1
  step = (_mel(8000) - _mel(20)) / 129
  assert fbank.mel_scale(centres[0]) == pytest.approx(_mel(20) + step)
  assert fbank.mel_scale(centres[-1]) == pytest.approx(_mel(8000) - step)
  with pytest.raises(ValueError, match="at least 4"):
    fbank.mel_banks(3, 512, SR)


def test_silence_is_log_epsilon_and_dc_is_removed():
  out = fbank.kaldi_fbank(np.zeros(1000), SR)
  assert out.shape == (4, 128)
  np.testing.assert_array_equal(out, np.float32(math.log(EPS32)))
  assert float(out[0, 0]) == pytest.approx(-15.942385, abs=1e-6)
  # Per-frame DC removal: a constant offset changes nothing.
  x = _signal(2000, seed=2)
  np.testing.assert_allclose(fbank.kaldi_fbank(x + 0.25, SR),
                             fbank.kaldi_fbank(x, SR), atol=1e-5)


@pytest.mark.parametrize("freq", [1000.0, 3000.0, 6000.0])
def test_a_tone_peaks_in_the_nearest_mel_bin(freq):
  t = np.arange(SR) / SR
  out = fbank.kaldi_fbank(0.5 * np.sin(2 * np.pi * freq * t), SR)
  _, centres = fbank.mel_banks(128, 512, SR)
  nearest = int(np.argmin(np.abs(centres - freq)))
  assert np.all(np.argmax(out, axis=1) == nearest)
  assert {1000.0: 43, 3000.0: 84, 6000.0: 114}[freq] == nearest


def test_fit_length():
  x = np.arange(12, dtype=np.float32).reshape(6, 2)
  np.testing.assert_array_equal(fbank.fit_length(x, 3), x[:3])
  padded = fbank.fit_length(x, 8)
  np.testing.assert_array_equal(padded[:6], x)
  np.testing.assert_array_equal(padded[6:], 0)
  assert padded.shape == (8, 2)
