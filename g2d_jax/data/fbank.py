"""Kaldi log mel filterbanks in NumPy, as `torchaudio.compliance.kaldi.fbank`.

OGM-GE's Kinetics-Sounds audio (data/KineticSound/process_audio.py, also
used by BalanceBenchmark and the GeWu-Lab follow-ups) is torchaudio's Kaldi
`fbank`. `kaldi_fbank` computes the same features without torch, step by
step as torchaudio's `compliance/kaldi.py` does (with its defaults unless an
argument says otherwise):

1. Frames of `frame_length_ms` every `frame_shift_ms` (window and shift in
   samples are `int(sample_rate * ms * 0.001)`: 400 and 160 at 16 kHz), only
   frames that fit entirely (`snip_edges=True`): 1 + (N - 400) // 160 frames.
2. No dither (the recipe passes `dither=0.0`).
3. Each frame minus its own mean (`remove_dc_offset`).
4. Pre-emphasis within the frame, `y[j] = x[j] - 0.97 * x[max(j - 1, 0)]`
   (the first sample becomes 0.03 * x[0]).
5. The window: "hanning" is `torch.hann_window(N, periodic=False)`, the
   symmetric Hann `0.5 - 0.5 cos(2 pi n / (N - 1))`; "povey" is that to the
   power 0.85 (torchaudio's default, not the recipe's); "hamming" (0.54 /
   0.46, symmetric), "rectangular" and "blackman" (coefficient 0.42) are
   there too.
6. Zero-padding of each frame to the next power of two (400 -> 512:
   `round_to_power_of_two`), real FFT, power spectrum |X|^2 (257 bins).
7. Triangular mel filters on the mel scale `1127 ln(1 + f / 700)`:
   `num_mel_bins` triangles with edges equally spaced in mel between
   `low_freq` (20 Hz) and `high_freq` (0 or less means Nyquist plus it, so
   8 kHz at 16 kHz), `(mel_high - mel_low) / (num_mel_bins + 1)` apart; each
   filter weighs FFT bin k (frequency k * sample_rate / n_fft, k < n_fft / 2)
   by `max(0, min(up, down))` of its two slopes, and the Nyquist bin by 0
   (torchaudio pads the filter matrix with a zero column).
8. `log(max(energy, eps))` with eps the float32 machine epsilon
   (1.1920928955078125e-07, torchaudio's `EPSILON`): an all-zero frame gives
   log(eps) = -15.9424 in every bin.

Energy is not appended (`use_energy=False`, so `htk_compat`, which only moves
the energy column, changes nothing). No VTLN (warp factor 1).

Deviation: torchaudio computes in float32; here every step is float64 and the
result is rounded to float32 once (differences are at float32 rounding
level, largest in near-silent bins).
"""

from __future__ import annotations

import numpy as np

# numeric_limits<float>::epsilon(): torchaudio's floor before the log.
EPSILON = float(np.finfo(np.float32).eps)
WINDOWS = ("hanning", "povey", "hamming", "rectangular", "blackman")


def mel_scale(freq):
  """Kaldi's mel scale: 1127 ln(1 + f / 700) (f in Hz)."""
  return 1127.0 * np.log1p(np.asarray(freq, np.float64) / 700.0)


def inverse_mel_scale(mel):
  """Hz of a mel value: 700 (exp(m / 1127) - 1)."""
  return 700.0 * np.expm1(np.asarray(mel, np.float64) / 1127.0)


def window_sizes(sample_rate: float, frame_length_ms: float,
                 frame_shift_ms: float,
                 round_to_power_of_two: bool = True) -> tuple[int, int, int]:
  """(window, shift, FFT size) in samples, computed as torchaudio does."""
  size = int(sample_rate * frame_length_ms * 0.001)
  shift = int(sample_rate * frame_shift_ms * 0.001)
  n_fft = size
  if round_to_power_of_two:
    n_fft = 1 if size == 0 else 1 << (size - 1).bit_length()
  return size, shift, n_fft


def num_frames(num_samples: int, sample_rate: float,
               frame_length_ms: float = 25.0,
               frame_shift_ms: float = 10.0) -> int:
  """Frames of a signal (`snip_edges`): 1 + (N - window) // shift, or 0."""
  size, shift, _ = window_sizes(sample_rate, frame_length_ms, frame_shift_ms)
  return 0 if num_samples < size else 1 + (num_samples - size) // shift


def feature_window(window: str, size: int,
                   blackman_coeff: float = 0.42) -> np.ndarray:
  """torchaudio's `_feature_window_function` (float64 [size])."""
  n = np.arange(size, dtype=np.float64)
  if window in ("hanning", "povey"):
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (size - 1))
    return w ** 0.85 if window == "povey" else w
  if window == "hamming":
    return 0.54 - 0.46 * np.cos(2.0 * np.pi * n / (size - 1))
  if window == "rectangular":
    return np.ones(size)
  if window == "blackman":
    a = 2.0 * np.pi / (size - 1)
    return (blackman_coeff - 0.5 * np.cos(a * n)
            + (0.5 - blackman_coeff) * np.cos(2.0 * a * n))
  raise ValueError(f"window {window!r} must be one of {WINDOWS}")


def mel_banks(num_mel_bins: int, n_fft: int, sample_rate: float,
              low_freq: float = 20.0, high_freq: float = 0.0
              ) -> tuple[np.ndarray, np.ndarray]:
  """Kaldi's triangular mel filters (torchaudio `get_mel_banks`, no VTLN).

  Returns:
    (weights float64 [num_mel_bins, n_fft // 2 + 1] with a zero last
    (Nyquist) column, centre frequencies in Hz [num_mel_bins]).

  Raises:
    ValueError: fewer than 4 bins, an odd n_fft or bad cut-offs.
  """
  if num_mel_bins <= 3:
    raise ValueError(f"num_mel_bins={num_mel_bins}: Kaldi needs at least 4")
  if n_fft % 2:
    raise ValueError(f"the FFT size {n_fft} must be even")
  nyquist = 0.5 * sample_rate
  if high_freq <= 0.0:
    high_freq += nyquist
  if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist
          and low_freq < high_freq):
    raise ValueError(f"bad mel cut-offs: low_freq {low_freq}, high_freq"
                     f" {high_freq}, Nyquist {nyquist}")
  mel_low, mel_high = mel_scale(low_freq), mel_scale(high_freq)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  b = np.arange(num_mel_bins, dtype=np.float64)[:, None]
  left = mel_low + b * delta
  center = mel_low + (b + 1.0) * delta
  right = mel_low + (b + 2.0) * delta
  mel = mel_scale(sample_rate / n_fft * np.arange(n_fft // 2))[None, :]
  up = (mel - left) / (center - left)
  down = (right - mel) / (right - center)
  weights = np.maximum(0.0, np.minimum(up, down))
  weights = np.pad(weights, ((0, 0), (0, 1)))
  return weights, inverse_mel_scale(center[:, 0])


def kaldi_fbank(waveform, sample_rate: float, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                preemphasis: float = 0.97, low_freq: float = 20.0,
                high_freq: float = 0.0, window: str = "hanning",
                remove_dc_offset: bool = True,
                round_to_power_of_two: bool = True,
                use_power: bool = True, use_log: bool = True,
                blackman_coeff: float = 0.42) -> np.ndarray:
  """Log mel filterbank energies of a mono waveform (module docstring).

  Args:
    waveform: [N] samples (any scale; torchaudio.load's [-1, 1] in the
      recipe). No dither is added.
    sample_rate: Hz.
    num_mel_bins .. blackman_coeff: torchaudio's `fbank` options of the same
      meaning (`frame_length`, `frame_shift`, `preemphasis_coefficient`,
      `window_type`, `use_log_fbank`); `window` defaults to the recipe's
      "hanning" (torchaudio's default is "povey").

  Returns:
    float32 [frames, num_mel_bins] (time, mel).

  Raises:
    ValueError: the waveform is not 1-D or shorter than one window, or an
      option is out of range.
  """
  x = np.asarray(waveform, np.float64)
  if x.ndim != 1:
    raise ValueError(f"kaldi_fbank expects a 1-D waveform, got {x.shape}")
  if not 0.0 <= preemphasis <= 1.0:
    raise ValueError(f"preemphasis={preemphasis} must be in [0, 1]")
  size, shift, n_fft = window_sizes(sample_rate, frame_length_ms,
                                    frame_shift_ms, round_to_power_of_two)
  if shift < 1 or size < 2 or n_fft % 2:
    raise ValueError(
        f"window {size} / shift {shift} samples (padded {n_fft}): choose a"
        " window of >= 2 samples, a shift >= 1 and an even padded size")
  if len(x) < size:
    raise ValueError(f"{len(x)} samples is shorter than one {size}-sample"
                     " window")
  frames = np.lib.stride_tricks.sliding_window_view(x, size)[::shift]
  if remove_dc_offset:
    frames = frames - frames.mean(axis=1, keepdims=True)
  if preemphasis != 0.0:
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - preemphasis * previous
  frames = frames * feature_window(window, size, blackman_coeff)
  spectrum = np.abs(np.fft.rfft(frames, n=n_fft, axis=1))
  if use_power:
    spectrum = spectrum ** 2
  weights, _ = mel_banks(num_mel_bins, n_fft, sample_rate, low_freq,
                         high_freq)
  energies = spectrum @ weights.T
  if use_log:
    energies = np.log(np.maximum(energies, EPSILON))
  return energies.astype(np.float32)


def fit_length(features: np.ndarray, target_length: int) -> np.ndarray:
  """Zero-pads (at the end) or cuts the time axis 0 to `target_length`, as
  the recipe's `ZeroPad2d((0, 0, 0, p))` / `fbank[0:target_length]`."""
  p = target_length - features.shape[0]
  if p > 0:
    pad = [(0, p)] + [(0, 0)] * (features.ndim - 1)
    return np.pad(features, pad)
  return features[:target_length]

