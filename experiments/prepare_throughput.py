r"""Preparation throughput: clips per second of `g2d_jax.data.prepare` with
1 and 2 workers, on a synthetic CREMA-D-shaped fixture (not CREMA-D data).

The fixture has the release's format and size per clip: FLV1 video with MP3
audio at 480 x 360, 30 fps, 2.0-3.0 s long, with a moving noise texture (so
the codec has work, unlike flat frames), and a 16 kHz WAV beside it.

  python experiments/prepare_throughput.py --clips=60 \
      --out=experiments/results/prepare_throughput.json

Each worker count prepares the same raw folder into a fresh output folder,
`--repeats` times; the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import scipy.io.wavfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__),
                                                "..")))
from g2d_jax.data import prepare  # noqa: E402
from g2d_jax.data import testclips  # noqa: E402

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


def make_fixture(raw: str, n: int, texture: bool = True) -> None:
  """`n` CREMA-D-shaped clips under `raw`; `texture=False` gives flat
  frames (what experiments/augment_views_cost.py times: the G2D smoke
  student diverges on the noise texture at the smoke preset's rate)."""
  os.makedirs(os.path.join(raw, "VideoFlash"))
  os.makedirs(os.path.join(raw, "AudioWAV"))
  rng = np.random.default_rng(0)
  for i in range(n):
    clip = f"{1001 + i // 6}_FIX_{EMOTIONS[i % 6]}_XX"
    seconds = float(rng.uniform(2.0, 3.0))
    testclips.write_clip(os.path.join(raw, "VideoFlash", clip + ".flv"),
                         seconds, fps=30, size=(480, 360), texture=texture)
    t = np.arange(int(seconds * 16000)) / 16000
    scipy.io.wavfile.write(
        os.path.join(raw, "AudioWAV", clip + ".wav"), 16000,
        (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--clips", type=int, default=60)
  p.add_argument("--workers", default="1,2")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="")
  args = p.parse_args()
  tmp = tempfile.mkdtemp(prefix="prepare_throughput-")
  try:
    raw = os.path.join(tmp, "raw")
    make_fixture(raw, args.clips)
    results = {}
    for rep in range(args.repeats):
      for w in map(int, args.workers.split(",")):
        out = os.path.join(tmp, f"out{w}")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        status = prepare.cli(["cremad", "--raw", raw, "--out", out,
                              "--workers", str(w), "--log_seconds", "1e9"])
        dt = time.perf_counter() - t0
        assert status == 0, status
        results.setdefault(w, []).append(dt)
        print(f"repeat {rep} workers {w}: {dt:.2f} s, "
              f"{args.clips / dt:.2f} clips/s", file=sys.stderr)
    rows = {w: {"seconds_median": statistics.median(v),
                "clips_per_second": args.clips / statistics.median(v),
                "seconds": v} for w, v in results.items()}
    report = {"clips": args.clips, "fixture": "synthetic CREMA-D-shaped "
              "FLV1+MP3 480x360 30 fps 2-3 s, moving noise texture, 16 kHz"
              " WAV", "workers": rows,
              "cpu_count": os.cpu_count()}
    print(json.dumps(report, indent=2))
    if args.out:
      with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
