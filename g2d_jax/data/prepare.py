r"""From raw dataset downloads to the layout our loaders read.

  python -m g2d_jax.data.prepare DATASET --raw DIR --out DIR [--workers N]

DATASET and what `--raw` holds (the release's own layout):

  cremad           VideoFlash/<clip>.flv and AudioWAV/<clip>.wav (the
                   CREMA-D release); optional train.csv / test.csv (the
                   OGM-GE / G2D split files) in --raw or --splits.
  vggsound         vggsound.csv (youtube_id,time,label,split) and the clips
                   as video/<youtube_id>_<time:06d>.mp4 (or directly in
                   --raw).
  kinetics_sounds  Kinetics clips, either <split>/<class>/<clip>.mp4 or
                   <split>/<clip>.mp4 with annotations/<split>.csv (the
                   Kinetics-400 columns label,youtube_id,time_start,
                   time_end,split), for split train and val (val is KS's
                   test set); --classes ks31 (default), ks32, ks34 or a file
                   with one class name per line.
  ave              AVE/<VideoID>.mp4, Annotations.txt, trainSet.txt,
                   valSet.txt, testSet.txt (the AVE release).

What `--out` gets (exactly what `configs/<dataset>.py` reads under
$G2D_DATA_DIR/<dataset>; see each loader's docstring):

  cremad           train.csv, test.csv, AudioWAV/<clip>.wav (the release's
                   WAV copied as is; extracted from the .flv at 16 kHz mono
                   if absent), Image-01-FPS/<clip>/{count:05d}.jpg
  vggsound         vggsound.csv, audio/<split>/<clip>.wav (16 kHz, source
                   channels, as `ffmpeg -ar 16000`),
                   frames/<split>/Image-01-FPS/<clip>/{count:05d}.jpg
  kinetics_sounds  classes.txt, train.csv, test.csv (`<clip>,<class>`),
                   audio/<clip>.wav (16 kHz mono), frames/<clip>/
                   frame_00001.jpg .. frame_00010.jpg
  ave              classes.txt (Annotations.txt block order), train.csv,
                   val.csv, test.csv (`<VideoID>,<class>,<start>,<end>`),
                   audio/<VideoID>.wav (16 kHz mono, whole clip),
                   frames/<VideoID>/frame_00001.jpg .. frame_00010.jpg

Frames follow the released extraction scripts (`data.decode`): CREMA-D and
VGGSound the OpenCV first-frame-of-each-second sampler of G2D / OGM-GE,
Kinetics-Sounds and AVE the OGM-GE moviepy mid-second sampler. Frames are
stored at native resolution (the loaders resize).

Running: clips are processed by `--workers` processes with a progress line
(clips/s, ETA). Each clip's outputs are written to temporaries and renamed
(the audio first, the frame folder last), so a clip is finished exactly
when both exist; a rerun skips finished clips and redoes the rest
(temporaries of killed runs are removed). A clip that cannot be read, has
no audio track or no frames, or is listed but missing, is counted, logged
and listed in `prepare_failed.txt` (`<clip>\t<reason>`); the run goes on.
The split files and class lists are written at the end, atomically, with
the finished clips only; `prepare.json` records the settings and the
counts. Rerunning into the same --out with other settings is refused.
Exit status: 0, 1 if any clip failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.resources
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable

from absl import logging
import numpy as np
import scipy.io.wavfile

from g2d_jax import artifacts
from g2d_jax import errors
from g2d_jax import progress
from g2d_jax.data import decode

DATASETS = ("cremad", "vggsound", "kinetics_sounds", "ave")
CLASS_LISTS = ("ks31", "ks32", "ks34")
CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
FAILED_FILE = "prepare_failed.txt"
SETTINGS_FILE = "prepare.json"
# Testing hook: SIGKILL this process at a point of the run
# ("after_clips:<n>" after n clips are recorded, "after_audio" inside the
# first clip, between its audio and its frames).
KILL_ENV = "G2D_PREPARE_KILL_AT"


@dataclasses.dataclass(frozen=True)
class ClipJob:
  """One clip to prepare."""
  clip_id: str
  video: str                      # the source clip ("" if it is missing)
  wav_out: str
  frames_out: str
  sampler: str                    # "opencv" or "midsecond"
  fps: int = 1                    # frames kept per second (opencv)
  seconds: int = 10               # frames kept (midsecond)
  sample_rate: int = 16000
  mono: bool = True
  copy_wav: str = ""              # a WAV to copy instead of extracting

  def finished(self) -> bool:
    return os.path.exists(self.wav_out) and os.path.isdir(self.frames_out)


@dataclasses.dataclass
class Plan:
  """A dataset's clips and how to write its index files once they ran."""
  jobs: list[ClipJob]
  missing: list[tuple[str, str]]          # listed clips without a source
  write_index: Callable[[set[str]], None]
  settings: dict


def _maybe_kill(point: str, count: int = 0) -> None:
  spec = os.environ.get(KILL_ENV, "")
  if spec == point or (spec.startswith("after_clips:") and point == "clips"
                       and count >= int(spec.split(":")[1])):
    os.kill(os.getpid(), signal.SIGKILL)


def _write_wav(path: str, samples, rate: int) -> None:
  def write(tmp):
    scipy.io.wavfile.write(tmp, rate, samples)
  artifacts.replace_file(path, write)


def prepare_clip(job: ClipJob) -> tuple[str, str]:
  """Writes one clip's audio and frames; returns (clip id, "" or the reason
  it failed). Never raises for a bad clip."""
  try:
    if job.sampler == "opencv":
      frames = decode.opencv_frames(job.video, job.fps)
    else:
      frames = decode.midsecond_frames(job.video, job.seconds)
    if job.copy_wav:
      audio = None
    else:
      audio = decode.audio(job.video, job.sample_rate, job.mono)
  except errors.DataError as e:
    return job.clip_id, str(e)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  quality = (decode.OPENCV_JPEG_QUALITY if job.sampler == "opencv"
             else decode.IMAGEIO_JPEG_QUALITY)
  os.makedirs(os.path.dirname(job.wav_out), exist_ok=True)
  if job.copy_wav:
    artifacts.replace_file(job.wav_out,
                           lambda tmp: shutil.copyfile(job.copy_wav, tmp))
  else:
    samples, rate = audio
    _write_wav(job.wav_out, samples[:, 0] if samples.shape[1] == 1
               else samples, rate)
  _maybe_kill("after_audio")
  with artifacts.atomic_directory(job.frames_out, replace=True) as tmp:
    for name, rgb in frames:
      Image.fromarray(rgb).save(os.path.join(tmp, name), quality=quality)
  return job.clip_id, ""


# ----------------------------------------------------------------------------
# Datasets.


def _write_csv(path: str, rows: Iterable[Iterable], header=None) -> None:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  if header:
    w.writerow(header)
  w.writerows(rows)
  text = buf.getvalue()

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  artifacts.replace_file(path, write)


def _write_lines(path: str, lines: Iterable[str]) -> None:
  text = "".join(f"{line}\n" for line in lines)

  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  artifacts.replace_file(path, write)


def _need(path: str, what: str) -> str:
  if not os.path.exists(path):
    raise errors.DataError(f"{path} is missing: {what}")
  return path


def plan_cremad(args) -> Plan:
  """CREMA-D: every VideoFlash/*.flv; labels from the clip names
  (`1001_DFA_ANG_XX`: the third field)."""
  flv_dir = _need(os.path.join(args.raw, "VideoFlash"),
                  "--raw must hold the CREMA-D release's VideoFlash/ folder")
  wav_dir = os.path.join(args.raw, "AudioWAV")
  clips = sorted(f[:-4] for f in os.listdir(flv_dir) if f.endswith(".flv"))
  if not clips:
    raise errors.DataError(f"{flv_dir} holds no .flv clip")
  jobs = []
  for c in clips:
    wav = os.path.join(wav_dir, c + ".wav")
    jobs.append(ClipJob(
        c, os.path.join(flv_dir, c + ".flv"),
        os.path.join(args.out, "AudioWAV", c + ".wav"),
        os.path.join(args.out, "Image-01-FPS", c), "opencv", fps=1,
        copy_wav=wav if os.path.exists(wav) else ""))
  split_dir = args.splits or args.raw
  official = all(os.path.exists(os.path.join(split_dir, f"{s}.csv"))
                 for s in ("train", "test"))
  rows: dict[str, list[tuple[str, str]]] = {}
  if official:
    for s in ("train", "test"):
      with open(os.path.join(split_dir, f"{s}.csv"), encoding="utf-8-sig",
                newline="") as f:
        rows[s] = [(r[0].strip(), r[1].strip()) for r in csv.reader(f)
                   if len(r) >= 2]
  else:
    logging.warning(
        "no train.csv / test.csv in %s: writing a seeded 90/10 split per"
        " class (seed %d), NOT the OGM-GE / G2D split; pass --splits DIR with"
        " the official files to use theirs", split_dir, args.split_seed)
    by_class: dict[str, list[str]] = {}
    for c in clips:
      parts = c.split("_")
      label = parts[2] if len(parts) > 2 else ""
      if label not in CREMAD_CLASSES:
        raise errors.DataError(
            f"clip {c!r}: no CREMA-D emotion ({'/'.join(CREMAD_CLASSES)}) as"
            " the third field of its name; pass --splits with split files")
      by_class.setdefault(label, []).append(c)
    rng = np.random.default_rng(args.split_seed)
    rows = {"train": [], "test": []}
    test_ids = set()
    for ids in by_class.values():
      perm = rng.permutation(len(ids))
      test_ids |= {ids[i] for i in perm[:round(0.1 * len(ids))]}
    for c in clips:
      rows["test" if c in test_ids else "train"].append(
          (c, c.split("_")[2]))
  known = set(clips)
  missing = [(c, "listed in a split file but VideoFlash/" + c
              + ".flv is missing") for s in rows for c, _ in rows[s]
             if c not in known]

  def write_index(done: set[str]) -> None:
    for s in ("train", "test"):
      _write_csv(os.path.join(args.out, f"{s}.csv"),
                 [r for r in rows[s] if r[0] in done])

  return Plan(jobs, missing, write_index,
              {"split": "official" if official else
               f"seeded 90/10 per class, seed {args.split_seed}"})


def plan_vggsound(args) -> Plan:
  """VGGSound: the clips of vggsound.csv's train and test rows."""
  csv_path = _need(os.path.join(args.raw, "vggsound.csv"),
                   "--raw must hold the VGGSound list vggsound.csv")
  rows = []
  with open(csv_path, encoding="utf-8-sig", newline="") as f:
    for i, r in enumerate(csv.reader(f)):
      if not r or (i == 0 and [x.strip() for x in r][:2] == ["youtube_id",
                                                             "time"]):
        continue
      if len(r) != 4:
        raise errors.DataError(
            f"{csv_path} line {i + 1}: expected youtube_id,time,label,split,"
            f" got {r!r}")
      rows.append(tuple(x.strip() for x in r))
  jobs, missing, kept = [], [], []
  seen = set()
  for yid, t, label, split in rows:
    if split not in ("train", "test"):
      continue
    try:
      clip = f"{yid}_{int(t):06d}"
    except ValueError:
      raise errors.DataError(f"{csv_path}: time {t!r} of {yid!r} is not an"
                             " integer") from None
    if clip in seen:
      continue
    seen.add(clip)
    kept.append((yid, t, label, split, clip))
    src = next((p for p in (os.path.join(args.raw, "video", clip + ".mp4"),
                            os.path.join(args.raw, clip + ".mp4"))
                if os.path.exists(p)), "")
    if not src:
      missing.append((clip, "listed in vggsound.csv but video/" + clip
                      + ".mp4 is missing"))
      continue
    jobs.append(ClipJob(
        clip, src, os.path.join(args.out, "audio", split, clip + ".wav"),
        os.path.join(args.out, "frames", split, "Image-01-FPS", clip),
        "opencv", fps=1, sample_rate=16000, mono=False))

  def write_index(done: set[str]) -> None:
    _write_csv(os.path.join(args.out, "vggsound.csv"),
               [(y, t, lab, s) for y, t, lab, s, c in kept if c in done],
               header=("youtube_id", "time", "label", "split"))

  return Plan(jobs, missing, write_index, {})


def class_list(name_or_path: str) -> list[str]:
  """A Kinetics-Sounds class list: a shipped one by name (ks31, ks32, ks34;
  see data/classlists/README.md) or a file with one name per line."""
  if name_or_path in CLASS_LISTS:
    text = (importlib.resources.files("g2d_jax.data") / "classlists"
            / f"{name_or_path}.txt").read_text(encoding="utf-8")
  else:
    text = open(_need(name_or_path, "--classes names a shipped list ("
                      + ", ".join(CLASS_LISTS) + ") or a file"),
                encoding="utf-8").read()
  names = [line.strip() for line in text.splitlines()
           if line.strip() and not line.startswith("#")]
  if len(set(map(normalize_class, names))) != len(names):
    raise errors.DataError(f"class list {name_or_path} repeats a name")
  return names


def normalize_class(name: str) -> str:
  """Kinetics spells classes with spaces (labels) or underscores (folder
  names), sometimes quoted: compare them lower-cased with spaces."""
  return " ".join(name.strip().strip('"').replace("_", " ").lower().split())


def _kinetics_split(args, split: str, classes: dict[str, str]
                    ) -> list[tuple[str, str, str]]:
  """[(clip id, class name, path)] of one Kinetics split in the list."""
  root = os.path.join(args.raw, split)
  if not os.path.isdir(root):
    return []
  out = []
  annotations = os.path.join(args.raw, "annotations", f"{split}.csv")
  if os.path.exists(annotations):
    with open(annotations, encoding="utf-8-sig", newline="") as f:
      for r in csv.DictReader(f):
        name = classes.get(normalize_class(r["label"]))
        if name is None:
          continue
        clip = (f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_"
                f"{int(float(r['time_end'])):06d}")
        out.append((clip, name, os.path.join(root, clip + ".mp4")))
    return out
  for folder in sorted(os.listdir(root)):
    name = classes.get(normalize_class(folder))
    if name is None or not os.path.isdir(os.path.join(root, folder)):
      continue
    for f in sorted(os.listdir(os.path.join(root, folder))):
      if f.endswith(".mp4"):
        out.append((f[:-4], name, os.path.join(root, folder, f)))
  return out


def plan_kinetics_sounds(args) -> Plan:
  """Kinetics-Sounds: the Kinetics train and val clips of the class list."""
  names = class_list(args.classes)
  classes = {normalize_class(n): n for n in names}
  test_split = "val" if os.path.isdir(os.path.join(args.raw, "val")) else (
      "test")
  found = {"train": _kinetics_split(args, "train", classes),
           "test": _kinetics_split(args, test_split, classes)}
  if not found["train"] or not found["test"]:
    raise errors.DataError(
        f"{args.raw} needs train/ and val/ (or test/) folders with clips of"
        f" the {args.classes} classes, as <split>/<class>/<clip>.mp4 or"
        " <split>/<clip>.mp4 with annotations/<split>.csv")
  empty = [n for n in names
           if not any(c == n for s in found.values() for _, c, _ in s)]
  if empty:
    logging.warning("%d classes of %s have no clip in %s: %s", len(empty),
                    args.classes, args.raw, empty)
  jobs, missing = [], []
  for split in ("train", "test"):
    for clip, _, path in found[split]:
      if not os.path.exists(path):
        missing.append((clip, f"listed in annotations but {path} is"
                        " missing"))
        continue
      jobs.append(ClipJob(
          clip, path, os.path.join(args.out, "audio", clip + ".wav"),
          os.path.join(args.out, "frames", clip), "midsecond", seconds=10))

  def write_index(done: set[str]) -> None:
    _write_lines(os.path.join(args.out, "classes.txt"), names)
    for split in ("train", "test"):
      _write_csv(os.path.join(args.out, f"{split}.csv"),
                 [(c, n) for c, n, _ in found[split] if c in done])

  return Plan(jobs, missing, write_index,
              {"classes": args.classes, "num_classes": len(names),
               "test_split": test_split})


def read_ave_list(path: str, header: bool) -> list[tuple[str, str, int, int]]:
  """[(category, VideoID, start, end)] of an AVE annotation file
  (`Category&VideoID&Quality&StartTime&EndTime`)."""
  out = []
  with open(_need(path, "it is part of the AVE release"),
            encoding="utf-8-sig") as f:
    for i, line in enumerate(f):
      if not line.strip() or (header and i == 0
                              and line.startswith("Category&")):
        continue
      parts = [p.strip() for p in line.split("&")]
      if len(parts) != 5:
        raise errors.DataError(
            f"{path} line {i + 1}: expected Category&VideoID&Quality&Start"
            f"&End, got {line.strip()!r}")
      try:
        out.append((parts[0], parts[1], int(parts[3]), int(parts[4])))
      except ValueError:
        raise errors.DataError(f"{path} line {i + 1}: start and end must be"
                               " whole seconds") from None
  return out


def plan_ave(args) -> Plan:
  """AVE: the videos of the official train / val / test lists."""
  annotations = read_ave_list(os.path.join(args.raw, "Annotations.txt"), True)
  classes = list(dict.fromkeys(c for c, _, _, _ in annotations))
  splits = {}
  for s, f in (("train", "trainSet.txt"), ("val", "valSet.txt"),
               ("test", "testSet.txt")):
    first = {}
    for c, vid, start, end in read_ave_list(os.path.join(args.raw, f), False):
      if c not in classes:
        raise errors.DataError(f"{f}: class {c!r} of {vid} is not in"
                               " Annotations.txt")
      first.setdefault(vid, (vid, c, start, end))   # MLB/PMR keep the first
    splits[s] = list(first.values())
  videos = sorted({r[0] for rows in splits.values() for r in rows})
  jobs, missing = [], []
  for vid in videos:
    path = os.path.join(args.raw, "AVE", vid + ".mp4")
    if not os.path.exists(path):
      missing.append((vid, f"listed but AVE/{vid}.mp4 is missing"))
      continue
    jobs.append(ClipJob(
        vid, path, os.path.join(args.out, "audio", vid + ".wav"),
        os.path.join(args.out, "frames", vid), "midsecond", seconds=10))

  def write_index(done: set[str]) -> None:
    _write_lines(os.path.join(args.out, "classes.txt"), classes)
    for s, rows in splits.items():
      _write_csv(os.path.join(args.out, f"{s}.csv"),
                 [r for r in rows if r[0] in done])

  return Plan(jobs, missing, write_index, {"num_classes": len(classes)})


PLANNERS = {"cremad": plan_cremad, "vggsound": plan_vggsound,
            "kinetics_sounds": plan_kinetics_sounds, "ave": plan_ave}


# ----------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class Summary:
  done: int
  skipped: int
  failed: list[tuple[str, str]]


def _check_settings(out: str, settings: dict) -> None:
  path = os.path.join(out, SETTINGS_FILE)
  if os.path.exists(path):
    old = artifacts.read_json(path).get("settings")
    if old != settings:
      raise errors.ConfigError(
          f"{out} was prepared with other settings ({old} != {settings}):"
          " use another --out, or delete it to start over")


def run(args) -> Summary:
  """Prepares `args.dataset` from `args.raw` into `args.out`."""
  if not os.path.isdir(args.raw):
    raise errors.DataError(f"--raw {args.raw} is not a directory")
  if os.path.abspath(args.raw) == os.path.abspath(args.out):
    raise errors.ConfigError("--out must differ from --raw")
  plan = PLANNERS[args.dataset](args)
  settings = {"dataset": args.dataset, **plan.settings}
  os.makedirs(args.out, exist_ok=True)
  _check_settings(args.out, settings)
  artifacts.write_json(os.path.join(args.out, SETTINGS_FILE),
                       {"settings": settings, "finished": False})
  for p in artifacts.remove_dead_temporaries(args.out):
    logging.info("removed the leftover of a killed run: %s", p)
  todo = [j for j in plan.jobs if not j.finished()]
  skipped = len(plan.jobs) - len(todo)
  logging.info("%s: %d clips listed, %d already prepared, %d to do, %d"
               " missing, %d workers", args.dataset, len(plan.jobs) +
               len(plan.missing), skipped, len(todo), len(plan.missing),
               args.workers)
  failed = list(plan.missing)
  bar = progress.Progress(f"prepare {args.dataset}", len(todo), unit="clips",
                          seconds=args.log_seconds)
  done = 0

  def record(result: tuple[str, str], n: int) -> None:
    nonlocal done
    clip, reason = result
    if reason:
      logging.warning("skipping %s: %s", clip, reason)
      failed.append((clip, reason))
    else:
      done += 1
    bar.update(n)
    _maybe_kill("clips", n)

  if args.workers <= 1 or len(todo) <= 1:
    for n, job in enumerate(todo, start=1):
      record(prepare_clip(job), n)
  else:
    # Fork, unless this process has started JAX's backend (whose threads a
    # fork must not copy): spawned workers spend seconds importing the
    # package, which halved the 2-worker throughput on 300 clips.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    ctx = multiprocessing.get_context(
        "spawn" if xla_bridge.backends_are_initialized() else "fork")
    with ctx.Pool(args.workers) as pool:
      for n, result in enumerate(pool.imap_unordered(prepare_clip, todo),
                                 start=1):
        record(result, n)
  finished = {j.clip_id for j in plan.jobs if j.finished()}
  plan.write_index(finished)
  _write_lines(os.path.join(args.out, FAILED_FILE),
               [f"{c}\t{r}" for c, r in sorted(failed)])
  artifacts.write_json(os.path.join(args.out, SETTINGS_FILE), {
      "settings": settings, "finished": True, "clips": len(finished),
      "done_this_run": done, "skipped": skipped, "failed": len(failed)})
  logging.info("%s: %d clips done, %d skipped (already prepared), %d failed"
               " (listed in %s)", args.dataset, done, skipped, len(failed),
               os.path.join(args.out, FAILED_FILE))
  return Summary(done, skipped, failed)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m g2d_jax.data.prepare",
      description="Turn a raw dataset download into the layout g2d_jax's"
      " loaders read.", epilog="See the module docstring for each dataset's"
      " input and output layout.")
  p.add_argument("dataset", choices=DATASETS)
  p.add_argument("--raw", required=True, help="the raw download")
  p.add_argument("--out", required=True,
                 help="where to write (e.g. $G2D_DATA_DIR/<dataset>)")
  p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                 help="parallel processes (default: the CPU count)")
  p.add_argument("--classes", default="ks31",
                 help="kinetics_sounds: ks31, ks32, ks34 or a class file")
  p.add_argument("--splits", default="",
                 help="cremad: a folder with the official train.csv and"
                 " test.csv (default: --raw)")
  p.add_argument("--split_seed", type=int, default=0,
                 help="cremad without split files: seed of the 90/10 split")
  p.add_argument("--log_seconds", type=float, default=10.0,
                 help="seconds between progress lines")
  return p


def cli(argv: list[str]) -> int:
  """Runs the tool; returns 0, 1 if clips failed, 2 on a bad argument."""
  args = parser().parse_args(argv)
  if args.workers < 1:
    print("error: --workers must be >= 1", file=sys.stderr)
    return 2
  t0 = time.perf_counter()
  try:
    summary = run(args)
  except errors.G2DError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  dt = time.perf_counter() - t0
  print(json.dumps({"done": summary.done, "skipped": summary.skipped,
                    "failed": len(summary.failed), "seconds": round(dt, 2)}))
  return 1 if summary.failed else 0


def console() -> None:
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  sys.exit(cli(sys.argv[1:]))


if __name__ == "__main__":
  console()
