"""Small synthetic clips in real container formats, written with PyAV, for
tests and for the preparation benchmark. They are not data of any dataset.

Frame k is grey with mean level `frame_level(k)` (plus a small zero-mean
left-to-right ramp), so a test can tell from a decoded or extracted frame
which one it is, and a crop or flip changes it; the audio is a sine tone.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from g2d_jax.data import decode

# (container format, video codec, audio codec) per file extension.
FORMATS = {
    ".flv": ("flv", "flv", "mp3"),
    ".mp4": ("mp4", "mpeg4", "aac"),
}


def frame_level(k: int) -> int:
  """Grey level of frame k (distinct for k < 80, 3 levels apart)."""
  return 10 + 3 * (k % 80)


def level_to_frame(level: float) -> int:
  """The frame index (< 80) whose grey level is nearest `level`."""
  return int(round((level - 10) / 3))


def write_clip(path: str, seconds: float, fps: int = 8,
               size: tuple[int, int] = (32, 24), audio_rate: int | None = 22050,
               channels: int = 1, tone_hz: float = 440.0,
               texture: bool = False) -> None:
  """Writes a clip of `seconds` at `fps` ([width, height] `size`) with a
  tone track at `audio_rate` Hz (None: no audio track).

  The container is chosen by the extension (.flv: FLV1 + MP3, the CREMA-D
  release's format; .mp4: MPEG-4 part 2 + AAC). `texture` adds a seeded
  zero-mean noise pattern (+-24 levels) that moves one pixel per frame, so
  the codec and the models see something like footage rather than flat
  grey.
  """
  av = decode._av()  # pylint: disable=protected-access
  ext = path[path.rfind("."):]
  fmt, vcodec, acodec = FORMATS[ext]
  w, h = size
  with av.open(path, "w", format=fmt) as out:
    v = out.add_stream(vcodec, rate=fps)
    v.width, v.height, v.pix_fmt = w, h, "yuv420p"
    v.bit_rate = 400_000
    a = None
    if audio_rate:
      a = out.add_stream(acodec, rate=audio_rate)
      a.layout = "mono" if channels == 1 else "stereo"
    n_video = int(round(seconds * fps))
    # A zero-mean left-to-right ramp, so crops and flips change a frame
    # while its mean stays the frame's level.
    ramp = np.linspace(-8.0, 8.0, w)
    pattern = None
    if texture:
      pattern = np.random.default_rng(w * 1000 + h).uniform(
          -24, 24, (h, 2 * w))
      pattern -= pattern.mean()
    for k in range(n_video):
      grey = frame_level(k) + ramp[None, :]
      if pattern is not None:
        shift = k % w
        grey = grey + pattern[:, shift:shift + w]
      img = np.clip(grey, 0, 255).astype(np.uint8)[..., None].repeat(3,
                                                                     axis=2)
      frame = av.VideoFrame.from_ndarray(img, format="rgb24")
      frame.pts = k
      frame.time_base = Fraction(1, fps)
      for packet in v.encode(frame):
        out.mux(packet)
    for packet in v.encode():
      out.mux(packet)
    if a is not None:
      t = np.arange(int(seconds * audio_rate)) / audio_rate
      tone = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
      samples = np.repeat(tone[None], channels, axis=0)
      # Encoders take fixed-size frames; feed 1024 samples at a time.
      for start in range(0, samples.shape[1], 1024):
        chunk = np.ascontiguousarray(samples[:, start:start + 1024])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp",
                                           layout=a.layout.name)
        frame.sample_rate = audio_rate
        frame.pts = start
        frame.time_base = Fraction(1, audio_rate)
        for packet in a.encode(frame):
          out.mux(packet)
      for packet in a.encode():
        out.mux(packet)
