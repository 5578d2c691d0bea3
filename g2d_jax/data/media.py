"""Reading and transforming media: WAV audio, resampling, STFTs, frames.

Conventions: waveforms are float64 in [-1, 1] (int16 / 32768, channels
averaged as `librosa.load(mono=True)` does). `stft` is not centred (frame j
covers samples [j*hop, j*hop + n_fft)); `log_stft` is librosa's centred
`stft` followed by `log(|S| + 1e-7)`. Both use a periodic Hann window. Frames
are RGB uint8, resized with PIL's bilinear filter (torchvision's
`Resize((size, size))` on a PIL image).
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.io.wavfile
import scipy.signal

from g2d_jax import errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOG_EPS = 1e-7
PAD_MODES = ("constant", "reflect")


# ----------------------------------------------------------------------------
# Audio.


def read_wav(path: str, hint: str = "replace it with an intact copy"
             ) -> tuple[int, np.ndarray]:
  """Reads a PCM or float WAV file.

  Args:
    path: the file.
    hint: how to fix a missing or unreadable file, for the message.

  Returns:
    (sample rate, float64 waveform in [-1, 1], channels averaged).

  Raises:
    DataError: the file is missing, unreadable, empty or of an unsupported
      sample type.
  """
  if not os.path.exists(path):
    raise errors.DataError(f"{path} is missing; {hint}")
  try:
    with warnings.catch_warnings():
      # FSDD files carry a LIST chunk scipy does not parse; it is metadata.
      warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)
      sr, x = scipy.io.wavfile.read(path)
  except (ValueError, OSError, EOFError, struct.error) as e:
    raise errors.DataError(
        f"{path} is not a readable WAV file ({e}); it is truncated or not PCM"
        f" audio: {hint}") from None
  if x.dtype == np.int16:
    x = x.astype(np.float64) / 32768.0
  elif x.dtype == np.int32:
    x = x.astype(np.float64) / 2147483648.0
  elif x.dtype == np.uint8:
    x = (x.astype(np.float64) - 128.0) / 128.0
  elif np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float64)
  else:
    raise errors.DataError(f"{path} has unsupported sample type {x.dtype};"
                           " convert it to 16-bit PCM")
  if x.ndim == 2:
    x = x.mean(axis=1)
  if x.size == 0:
    raise errors.DataError(f"{path} holds no samples; {hint}")
  return int(sr), x


def load_audio(path: str, sample_rate: int,
               hint: str = "replace it (e.g. ffmpeg -i VIDEO -acodec "
               "pcm_s16le OUT.wav)") -> np.ndarray:
  """`librosa.load(path, sr=sample_rate)`: mono float64, resampled with a
  polyphase filter if the file has another rate."""
  sr, x = read_wav(path, hint)
  return resample(x, sr, int(sample_rate))


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


def log_stft(x: np.ndarray, n_fft: int, hop_length: int,
             pad_mode: str = "constant") -> np.ndarray:
  """`log(|STFT| + 1e-7)` of a centred STFT, as `librosa.stft` defaults.

  Args:
    x: [T] waveform.
    n_fft: frame and FFT length (window length too).
    hop_length: frame step.
    pad_mode: "constant" (zeros) or "reflect": how the signal is padded by
      n_fft // 2 on both sides (librosa's `center=True`).

  Returns:
    float32 [n_fft // 2 + 1, 1 + T // hop_length] (frequency, time); frame j
    is centred on sample j * hop_length, periodic Hann window.
  """
  if pad_mode not in PAD_MODES:
    raise errors.ConfigError(
        f"stft_pad_mode={pad_mode!r} must be one of {PAD_MODES}")
  half = n_fft // 2
  padded = np.pad(np.asarray(x, np.float64), half, mode=pad_mode)
  spec = stft(padded, n_fft, hop_length)
  return np.log(np.abs(spec) + LOG_EPS).T.astype(np.float32)


# ----------------------------------------------------------------------------
# Frames.


def load_rgb(path: str, size: int) -> np.ndarray:
  """Opens an image as RGB and resizes it to size x size (PIL bilinear).

  This is torchvision's `Resize((size, size))` on a PIL image.

  Returns:
    uint8 [size, size, 3].

  Raises:
    DataError: Pillow is missing, or the file is missing or not an image.
  """
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.DataError(
        "reading frames needs Pillow: pip install pillow (it is installed"
        " with matplotlib)") from None
  try:
    with Image.open(path) as img:
      img = img.convert("RGB").resize((size, size), Image.BILINEAR)
      return np.asarray(img, dtype=np.uint8)
  except FileNotFoundError:
    raise errors.DataError(f"{path} is missing; restore the frame") from None
  except OSError as e:
    raise errors.DataError(
        f"{path} is not a readable image ({e}); re-extract the frames of this"
        " clip") from None


def open_rgb(path: str):
  """The image as an RGB PIL image (loaded), for transforms.

  Raises:
    DataError: Pillow is missing, or the file is missing or not an image.
  """
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.DataError(
        "reading frames needs Pillow: pip install pillow (it is installed"
        " with matplotlib)") from None
  try:
    with Image.open(path) as img:
      return img.convert("RGB")
  except FileNotFoundError:
    raise errors.DataError(f"{path} is missing; restore the frame") from None
  except OSError as e:
    raise errors.DataError(
        f"{path} is not a readable image ({e}); re-extract the frames of this"
        " clip") from None


def list_frames(folder: str) -> list[str]:
  """Image file names (.jpg/.jpeg/.png) of a frame folder, sorted by name."""
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(IMAGE_EXTENSIONS))


def official_frame_choice(num_frames: int, size: int,
                          seed: int = 999) -> np.ndarray:
  """Frame indices of the official `np.random.seed(seed); np.random.choice(
  num_frames, size=size, replace=False)`, without the global NumPy state.

  Raises:
    DataError: fewer frames than requested.
  """
  if num_frames < size:
    raise errors.DataError(
        f"a frame folder has {num_frames} frames but {size} are needed")
  return np.random.RandomState(seed).choice(num_frames, size=size,
                                            replace=False)


def frames_array(paths: Sequence[str], size: int) -> np.ndarray:
  """uint8 [T, size, size, 3] of the given frames, in order."""
  return np.stack([load_rgb(p, size) for p in paths])


class NormalizedImages:
  """uint8 RGB images [N, ..., 3] read as float32 `(x / 255 - mean) / std`.

  The torchvision `ToTensor()` + `Normalize(mean, std)` of the official
  loaders, applied on read so the storage stays uint8 (4x smaller). Use
  scale 1.0 for such a modality in `Split.scales`.
  """

  def __init__(self, images, mean: Sequence[float], std: Sequence[float]):
    if images.shape[-1] != 3:
      raise errors.DataError(
          f"NormalizedImages expects RGB images [..., 3], got {images.shape}")
    self._images = images
    self._mean = np.asarray(mean, np.float32)
    self._std = np.asarray(std, np.float32)
    self.shape = tuple(images.shape)
    self.dtype = np.dtype(np.float32)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def raw(self):
    """The underlying uint8 images."""
    return self._images

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    x = np.asarray(self._images[key]).astype(np.float32) / np.float32(255.0)
    return (x - self._mean) / self._std

  def __array__(self, dtype=None, copy=None):
    del copy
    arr = self[np.arange(self.shape[0])]
    return arr if dtype is None else arr.astype(dtype)
