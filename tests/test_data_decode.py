"""The frame samplers and the audio decoder on clips written by PyAV: which
frames each sampler keeps (told apart by their grey level), the moviepy
positions by hand, and the audio's rate, channels and tone."""

import numpy as np
import pytest

from g2d_jax.data import decode
from g2d_jax.data import testclips
from g2d_jax.errors import DataError


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  d = tmp_path_factory.mktemp("clips")
  paths = {
      "flv": str(d / "a.flv"), "mp4": str(d / "b.mp4"),
      "silent": str(d / "c.mp4"), "bad": str(d / "d.mp4")}
  testclips.write_clip(paths["flv"], 2.5, fps=8)
  testclips.write_clip(paths["mp4"], 3.0, fps=10, channels=2, tone_hz=1000.0,
                       audio_rate=44100)
  testclips.write_clip(paths["silent"], 1.0, fps=8, audio_rate=None)
  with open(paths["bad"], "wb") as f:
    f.write(np.random.default_rng(0).bytes(3000))
  return paths


def frame_ids(frames):
  return [testclips.level_to_frame(img.mean()) for _, img in frames]


def test_opencv_sampler_keeps_the_first_frame_of_each_second(clips):
  frames = decode.opencv_frames(clips["flv"])        # 20 frames at 8 fps
  assert [n for n, _ in frames] == ["00000.jpg", "00008.jpg", "00016.jpg"]
  assert frame_ids(frames) == [0, 8, 16]
  assert frames[0][1].shape == (24, 32, 3) and frames[0][1].dtype == np.uint8
  two = decode.opencv_frames(clips["mp4"], per_second=2)   # 30 at 10 fps
  assert frame_ids(two) == [0, 5, 10, 15, 20, 25]


def test_midsecond_positions_by_hand():
  # 30 frames at 10 fps: moviepy positions 5, 15, 25 (1-based), then past
  # the end: last_frames = 10, last_start = 20, 35 -> 21 + (14 % 10) = 25.
  assert decode.midsecond_positions(30, 10.0, 4) == [4, 14, 24, 24]
  # 20 frames at 8 fps: 4, 12, 20; last_frames 4, last_start 16:
  # 28 -> 17 + (11 % 4) = 20, 36 -> 17 + (19 % 4) = 20.
  assert decode.midsecond_positions(20, 8.0, 5) == [3, 11, 19, 19, 19]
  # Banker's rounding of Python's round, as the script: 2.5 -> 2.
  assert decode.midsecond_positions(100, 5.0, 1) == [1]


def test_midsecond_sampler_names_and_frames(clips):
  frames = decode.midsecond_frames(clips["mp4"], seconds=4)
  assert [n for n, _ in frames] == [f"frame_{i:05d}.jpg" for i in (1, 2, 3, 4)]
  assert frame_ids(frames) == [4, 14, 24, 24]


def test_audio_rate_channels_and_tone(clips):
  mono, sr = decode.audio(clips["mp4"], 16000)
  stereo, _ = decode.audio(clips["mp4"], 16000, mono=False)
  assert sr == 16000 and mono.dtype == np.int16
  assert mono.shape[1] == 1 and stereo.shape[1] == 2
  # 3 s at 16 kHz, give or take the AAC encoder's priming samples.
  assert abs(len(mono) - 48000) <= 2048
  x = mono[4000:20000, 0].astype(np.float64)
  peak_hz = np.argmax(np.abs(np.fft.rfft(x))) * 16000 / len(x)
  assert abs(peak_hz - 1000.0) <= 2.0
  # An amplitude-0.3 tone: |x| peaks near 0.3 * 32767.
  assert 0.27 * 32767 < np.abs(x).max() < 0.33 * 32767


def test_bad_clips(clips):
  with pytest.raises(DataError, match="no audio track"):
    decode.audio(clips["silent"], 16000)
  assert frame_ids(decode.opencv_frames(clips["silent"])) == [0]
  with pytest.raises(DataError, match="not a readable video"):
    decode.opencv_frames(clips["bad"])
  with pytest.raises(DataError, match="is missing"):
    decode.midsecond_frames(clips["bad"] + ".nothing")
