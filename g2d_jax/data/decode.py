"""Decoding clips with PyAV (`pip install av`, which ships its own FFmpeg):
frames sampled as the official extraction scripts sample them, and audio
resampled as `ffmpeg -ar RATE` does.

Two frame samplers, after the released scripts:

- `opencv_frames` (G2D / OGM-GE `video_preprocessing.py` for CREMA-D and
  VGGSound): OpenCV reads every frame; with `fps = int(CAP_PROP_FPS)` (the
  stream's average rate, truncated) and `interval = int(fps / per_second)`,
  decoded frame `count` (0-based) is kept when `count % fps < interval *
  per_second` and `(count % fps) % interval == 0`. At 1 frame per second
  that is the first frame of every second. Files are `{count:05d}.jpg` at
  native resolution, JPEG quality 95 (OpenCV's default).
- `midsecond_frames` (OGM-GE `pre-processing/get_frame.py` for AVE and
  Kinetics-Sounds, moviepy): `seconds` frames, frame i at moviepy position
  `round((i + 0.5) * fps)` (1-based, so 0-based index one less); positions
  past the end wrap into the clip's last second with the script's formula.
  Files are `frame_{i + 1:05d}.jpg`, native resolution, JPEG quality 75
  (imageio's default).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from g2d_jax import errors

OPENCV_JPEG_QUALITY = 95
IMAGEIO_JPEG_QUALITY = 75


def _av():
  try:
    import av  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.DataError(
        "preparing raw clips needs PyAV: pip install av (it ships its own"
        " FFmpeg; it is in requirements.txt)") from None
  return av


def _open(path: str):
  av = _av()
  try:
    return av.open(path)
  except FileNotFoundError:
    raise errors.DataError(f"{path} is missing") from None
  except (av.error.FFmpegError, OSError, ValueError) as e:
    raise errors.DataError(f"{path} is not a readable video ({e})") from None


def _video_frames(path: str) -> tuple[float, Iterator[Any]]:
  """(the stream's frame rate, an iterator over its decoded frames)."""
  av = _av()
  container = _open(path)
  if not container.streams.video:
    container.close()
    raise errors.DataError(f"{path} has no video track")
  stream = container.streams.video[0]
  # One decoding thread: parallelism comes from the worker processes, and
  # FFmpeg's own threads would oversubscribe the cores.
  stream.thread_count = 1
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  if not rate or float(rate) <= 0:
    container.close()
    raise errors.DataError(f"{path}: the video track has no frame rate")

  def frames():
    try:
      yield from container.decode(stream)
    except (av.error.FFmpegError, ValueError) as e:
      raise errors.DataError(f"{path}: decoding failed ({e})") from None
    finally:
      container.close()

  return float(rate), frames()


def _rgb(frame) -> np.ndarray:
  return frame.to_ndarray(format="rgb24")


def opencv_frames(path: str, per_second: int = 1
                  ) -> list[tuple[str, np.ndarray]]:
  """[(file name, RGB uint8 [H, W, 3])] of the OpenCV 1-fps sampler.

  Raises:
    DataError: unreadable, no video track, or no frame decoded.
  """
  rate, frames = _video_frames(path)
  fps = int(rate)
  if fps < 1:
    raise errors.DataError(f"{path}: frame rate {rate} is below 1")
  interval = max(1, int(fps / per_second))
  out = []
  for count, frame in enumerate(frames):
    frame_id = count % fps
    if frame_id < interval * per_second and frame_id % interval == 0:
      out.append((f"{count:05d}.jpg", _rgb(frame)))
  if not out:
    raise errors.DataError(f"{path}: no video frame could be decoded")
  return out


def midsecond_positions(total_frames: int, fps: float,
                        seconds: int = 10) -> list[int]:
  """0-based frame indices of the OGM-GE moviepy sampler."""
  last_frames = int(total_frames % fps) or int(fps)
  last_start = total_frames - last_frames
  out = []
  for i in range(seconds):
    pos = round((0.5 + i) * fps)          # moviepy's 1-based frame number
    if pos > total_frames:
      pos = last_start + 1 + ((pos - last_start - 1) % last_frames)
    out.append(max(pos, 1) - 1)
  return out


def midsecond_frames(path: str, seconds: int = 10
                     ) -> list[tuple[str, np.ndarray]]:
  """[(file name, RGB uint8 [H, W, 3])] of the OGM-GE mid-second sampler.

  Frames are decoded once; the wrapped positions lie in the last second,
  which a small buffer keeps.

  Raises:
    DataError: unreadable, no video track, or no frame decoded.
  """
  rate, frames = _video_frames(path)
  wanted = {round((0.5 + i) * rate) - 1 for i in range(seconds)}
  keep: dict[int, Any] = {}
  tail: collections.deque = collections.deque(maxlen=int(math.ceil(rate)) + 2)
  total = 0
  for count, frame in enumerate(frames):
    if count in wanted:
      keep[count] = frame
    tail.append((count, frame))
    total = count + 1
  if not total:
    raise errors.DataError(f"{path}: no video frame could be decoded")
  keep.update(tail)
  return [(f"frame_{i + 1:05d}.jpg", _rgb(keep[p]))
          for i, p in enumerate(midsecond_positions(total, rate, seconds))]


def audio(path: str, sample_rate: int, mono: bool = True
          ) -> tuple[np.ndarray, int]:
  """The first audio track as int16 [T, channels], resampled to
  `sample_rate` by FFmpeg's resampler (as `ffmpeg -ar RATE`).

  Args:
    path: the clip.
    sample_rate: output rate.
    mono: downmix to one channel (`-ac 1`); False keeps the channels.

  Raises:
    DataError: unreadable file, no audio track, or no sample decoded.
  """
  av = _av()
  container = _open(path)
  try:
    if not container.streams.audio:
      raise errors.DataError(f"{path} has no audio track")
    stream = container.streams.audio[0]
    layout = "mono" if mono else stream.layout.name
    resampler = av.AudioResampler(format="s16", layout=layout,
                                  rate=sample_rate)
    chunks = []
    try:
      for frame in container.decode(stream):
        chunks.extend(resampler.resample(frame))
      chunks.extend(resampler.resample(None))
    except (av.error.FFmpegError, ValueError) as e:
      raise errors.DataError(f"{path}: decoding the audio failed ({e})"
                             ) from None
  finally:
    container.close()
  # Packed s16: each frame's plane holds [samples, channels] interleaved.
  parts = [c.to_ndarray().reshape(-1, len(c.layout.channels)) for c in chunks]
  if not parts or not sum(len(p) for p in parts):
    raise errors.DataError(f"{path}: the audio track holds no samples")
  return np.concatenate(parts).astype(np.int16), sample_rate
