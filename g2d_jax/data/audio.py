"""Audio helpers: WAV reading, resampling, STFT, noise mixing, log spectrograms.

Everything except `read_wav` and the FSDD/noise loaders is a pure function of
arrays, so AV-MNIST's audio recipe can be tested piece by piece.

Conventions: waveforms are float64 in [-1, 1] (int16 / 32768). The STFT is
not centred (frame j covers samples [j*hop, j*hop + n_fft)) and uses a
periodic Hann window. Decibels are relative to a full-scale sinusoid: a
sine of amplitude 1 whose frequency sits on a bin centre reads 0 dB there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import warnings

import numpy as np
import scipy.io.wavfile
import scipy.signal

from g2d_jax import errors

FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FSDD_NAME_RE = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
NOISE_FILES = ("doing_the_dishes", "dude_miaowing", "exercise_bike",
               "pink_noise", "running_tap", "white_noise")


def read_wav(path: str) -> tuple[int, np.ndarray]:
  """Reads a mono PCM WAV file.

  Returns:
    (sample_rate, float64 waveform in [-1, 1]).

  Raises:
    DataError: the file is missing, unreadable, multi-channel or not PCM.
  """
  if not os.path.exists(path):
    raise errors.DataError(
        f"{path} is missing; fetch the data again (python -m"
        " g2d_jax.data.download --dest DATA_DIR)")
  try:
    with warnings.catch_warnings():
      # FSDD files carry a LIST chunk scipy does not parse; it is metadata.
      warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)
      sr, x = scipy.io.wavfile.read(path)
  except (ValueError, OSError, EOFError, struct.error) as e:
    raise errors.DataError(
        f"{path} is not a readable WAV file ({e}); it is truncated or"
        " corrupt: replace it with a fresh copy") from None
  if x.ndim != 1:
    raise errors.DataError(
        f"{path} has {x.shape[1]} channels; a mono recording is expected")
  if x.dtype == np.int16:
    x = x.astype(np.float64) / 32768.0
  elif x.dtype == np.int32:
    x = x.astype(np.float64) / 2147483648.0
  elif x.dtype == np.uint8:
    x = (x.astype(np.float64) - 128.0) / 128.0
  elif np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float64)
  else:
    raise errors.DataError(f"{path} has unsupported sample type {x.dtype}")
  return int(sr), x


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
  """Resamples by a rational factor with a polyphase anti-aliasing filter."""
  if sr_in == sr_out:
    return np.asarray(x, dtype=np.float64)
  g = math.gcd(sr_in, sr_out)
  return scipy.signal.resample_poly(
      np.asarray(x, dtype=np.float64), sr_out // g, sr_in // g)


def hann_window(n: int) -> np.ndarray:
  """Periodic Hann window of length n (as scipy.signal.get_window('hann'))."""
  k = np.arange(n)
  return 0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)


def num_window_samples(n_fft: int, hop: int, num_frames: int) -> int:
  """Samples covered by `num_frames` non-centred STFT frames."""
  return n_fft + (num_frames - 1) * hop


def stft(x: np.ndarray, n_fft: int, hop: int,
         num_frames: int | None = None) -> np.ndarray:
  """Non-centred STFT with a periodic Hann window.

  Args:
    x: [..., T] waveform(s).
    n_fft: frame length (= FFT size).
    hop: frame step.
    num_frames: frames to compute; default all full frames.

  Returns:
    complex128 [..., frames, n_fft // 2 + 1]; frame j is
    rfft(x[..., j*hop : j*hop + n_fft] * window).
  """
  x = np.asarray(x, dtype=np.float64)
  t = x.shape[-1]
  max_frames = 0 if t < n_fft else 1 + (t - n_fft) // hop
  if num_frames is None:
    num_frames = max_frames
  if num_frames > max_frames:
    raise ValueError(
        f"{num_frames} frames need {num_window_samples(n_fft, hop, num_frames)}"
        f" samples, got {t}")
  frames = np.lib.stride_tricks.sliding_window_view(x, n_fft, axis=-1)
  frames = frames[..., : (num_frames - 1) * hop + 1 : hop, :]
  return np.fft.rfft(frames * hann_window(n_fft), axis=-1)


def full_scale_reference(n_fft: int) -> float:
  """|STFT| of a unit-amplitude sine on a bin centre: sum(window) / 2."""
  return float(hann_window(n_fft).sum() / 2.0)


def rms(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """Root mean square along `axis`."""
  x = np.asarray(x, dtype=np.float64)
  return np.sqrt(np.mean(np.square(x), axis=axis))


def noise_gain(speech_rms: np.ndarray, noise_rms: np.ndarray,
               snr_db: float) -> np.ndarray:
  """Factor g so that speech_rms / (g * noise_rms) is `snr_db` decibels."""
  return (np.asarray(speech_rms) / np.maximum(noise_rms, 1e-12)
          * 10.0 ** (-snr_db / 20.0))


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float,
               speech_rms: float | None = None) -> np.ndarray:
  """Adds `noise` scaled so the speech-to-noise power ratio is `snr_db`.

  Args:
    speech: [T] clean waveform (zero-padded speech is fine).
    noise: [T] noise segment.
    snr_db: target SNR in decibels.
    speech_rms: RMS defining the speech power; default RMS of `speech`. Pass
      the RMS over the active (unpadded) samples to avoid padding lowering it.

  Returns:
    speech + g * noise, with g from `noise_gain`.
  """
  if speech_rms is None:
    speech_rms = float(rms(speech))
  return speech + noise_gain(speech_rms, rms(noise), snr_db) * noise


def power_db(spec: np.ndarray, ref: float, eps: float = 1e-10) -> np.ndarray:
  """10*log10(|spec|^2 / ref^2 + eps), computed in spec's real precision."""
  p = np.square(spec.real) + np.square(spec.imag)
  dtype = p.dtype
  return (10.0 * np.log10(p / dtype.type(ref * ref) + dtype.type(eps))
          ).astype(dtype)


def db_to_uint8(db: np.ndarray, db_min: float, db_max: float) -> np.ndarray:
  """Maps [db_min, db_max] linearly to [0, 255]; clips, rounds to nearest."""
  scaled = (db - db_min) * (255.0 / (db_max - db_min))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def place_in_window(x: np.ndarray, length: int,
                    placement: str = "center") -> np.ndarray:
  """Puts a recording in a zero window of `length` samples.

  Longer recordings are cropped (centre crop for "center", head for "start").
  """
  out = np.zeros(length, dtype=np.float64)
  n = len(x)
  if placement not in ("center", "start"):
    raise errors.ConfigError(
        f"clip_placement {placement!r} is not 'center' or 'start'")
  if n >= length:
    start = (n - length) // 2 if placement == "center" else 0
    out[:] = x[start:start + length]
  else:
    start = (length - n) // 2 if placement == "center" else 0
    out[start:start + n] = x
  return out


@dataclasses.dataclass(frozen=True)
class Recording:
  """One FSDD recording, identified by its file name."""
  name: str
  digit: int
  speaker: str
  take: int


def list_fsdd(recordings_dir: str) -> list[Recording]:
  """Lists FSDD recordings `{digit}_{speaker}_{take}.wav`, sorted by name.

  Raises:
    DataError: the folder is missing or holds no recordings.
  """
  if not os.path.isdir(recordings_dir):
    raise errors.DataError(
        f"FSDD folder {recordings_dir} is missing; fetch it with python -m"
        " g2d_jax.data.download --dest DATA_DIR")
  recs = []
  for name in sorted(os.listdir(recordings_dir)):
    m = FSDD_NAME_RE.match(name)
    if m:
      recs.append(Recording(name, int(m.group(1)), m.group(2),
                            int(m.group(3))))
  if not recs:
    raise errors.DataError(
        f"{recordings_dir} holds no FSDD recordings named"
        " {digit}_{speaker}_{take}.wav; fetch them with python -m"
        " g2d_jax.data.download --dest DATA_DIR")
  return recs
