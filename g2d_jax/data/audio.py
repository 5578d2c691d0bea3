"""AV-MNIST's audio recipe: FSDD recordings, noise mixing at an SNR, and
decibel spectrograms mapped to uint8.

Everything except the FSDD listing is a pure function of arrays, so the
recipe can be tested piece by piece; WAV reading, resampling and the STFT
are in `data.media`. Decibels are relative to a full-scale sinusoid: a sine
of amplitude 1 whose frequency sits on a bin centre reads 0 dB there.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from g2d_jax import errors
from g2d_jax.data import media

FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FSDD_NAME_RE = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
NOISE_FILES = ("doing_the_dishes", "dude_miaowing", "exercise_bike",
               "pink_noise", "running_tap", "white_noise")


def full_scale_reference(n_fft: int) -> float:
  """|STFT| of a unit-amplitude sine on a bin centre: sum(window) / 2."""
  return float(media.hann_window(n_fft).sum() / 2.0)


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
