"""`python -m g2d_jax.data.prepare` on tiny raw downloads in the releases'
container formats (written here with PyAV): whole runs per dataset, the
layouts the loaders read (and the loaders on them), a run killed between
clips and inside a clip that resumes to the same files, corrupt, silent
and missing clips, refused reruns, and the CREMA-D smoke job end to end on
the prepared output."""

import contextlib
import csv
import filecmp
import io
import json
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import scipy.io.wavfile

import ml_collections

from g2d_jax.data import ave
from g2d_jax.data import cremad
from g2d_jax.data import ks
from g2d_jax.data import media
from g2d_jax.data import prepare
from g2d_jax.data import testclips
from g2d_jax.data import vggsound
from g2d_jax.pipeline import run
from tests import pipeline_fixtures as fx

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
EMOTIONS = cremad.CLASSES


def write_wav(path, seconds=1.5, rate=16000, hz=300.0):
  t = np.arange(int(seconds * rate)) / rate
  scipy.io.wavfile.write(path, rate,
                         (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16))


def cremad_raw(root, n_per_class=8):
  """CREMA-D-like release: 6 x n_per_class .flv clips (FLV1 + MP3) and
  their WAVs, except: one clip has no WAV (its audio comes from the .flv),
  one has neither a WAV nor an audio track, one .flv is corrupt."""
  (root / "VideoFlash").mkdir(parents=True)
  (root / "AudioWAV").mkdir()
  ids = [f"{1001 + i}_DFA_{e}_XX" for e in EMOTIONS
         for i in range(n_per_class)]
  for k, c in enumerate(ids):
    flv = str(root / "VideoFlash" / f"{c}.flv")
    if c == ids[2]:
      testclips.write_clip(flv, 2.0, audio_rate=None)
      continue
    testclips.write_clip(flv, 2.0 + 0.25 * (k % 3))
    if c != ids[1]:
      write_wav(root / "AudioWAV" / f"{c}.wav", hz=200.0 + 10 * k)
  with open(root / "VideoFlash" / f"{ids[3]}.flv", "wb") as f:
    f.write(b"FLV\x01 not really")
  return ids


def run_cli(args, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "g2d_jax.data.prepare",
                         *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def run_here(args, caplog):
  """(status, summary or None, log text) of `prepare.cli` in this process
  (one worker: no process start-up)."""
  out = io.StringIO()
  caplog.clear()
  with caplog.at_level(logging.INFO), contextlib.redirect_stdout(out):
    status = prepare.cli(list(map(str, args)))
  lines = out.getvalue().strip().splitlines()
  return status, json.loads(lines[-1]) if lines else None, caplog.text


def read_csv(path):
  with open(path, newline="") as f:
    return [tuple(r) for r in csv.reader(f)]


@pytest.fixture(scope="module")
def cremad_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cremad")
  ids = cremad_raw(tmp / "raw")
  proc = run_cli(["cremad", "--raw", tmp / "raw", "--out", tmp / "out",
                  "--workers", 2])
  return tmp, ids, proc


def test_cremad_whole_run(cremad_run):
  tmp, ids, proc = cremad_run
  out = tmp / "out"
  # Exit 1: two clips failed; the summary line counts them.
  assert proc.returncode == 1, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert (summary["done"], summary["skipped"], summary["failed"]) == (46, 0, 2)
  failed = dict(line.split("\t") for line in
                open(out / prepare.FAILED_FILE).read().splitlines())
  assert sorted(failed) == sorted([ids[2], ids[3]])
  assert "no audio track" in failed[ids[2]]
  assert "not a readable video" in failed[ids[3]]
  assert "clips/s ETA" in proc.stderr
  # Frames: the first frame of each second (8 fps clips of 2, 2.25, 2.5 s).
  for k in (0, 4, 5):
    names = sorted(os.listdir(out / "Image-01-FPS" / ids[k]))
    assert names == ["00000.jpg", "00008.jpg", "00016.jpg"][:2 + (k % 3 != 0)]
    level = media.load_rgb(str(out / "Image-01-FPS" / ids[k] / names[1]),
                           32).mean()
    assert testclips.level_to_frame(level) == 8
  # Audio: the release's WAV copied byte for byte, or extracted at 16 kHz.
  assert filecmp.cmp(out / "AudioWAV" / f"{ids[0]}.wav",
                     tmp / "raw" / "AudioWAV" / f"{ids[0]}.wav", shallow=False)
  sr, x = scipy.io.wavfile.read(out / "AudioWAV" / f"{ids[1]}.wav")
  assert sr == 16000 and x.ndim == 1 and abs(len(x) - 2.25 * 16000) < 2000
  # The seeded split: 10% of each class (round(0.8) = 1) to test, drawn
  # among the listed clips (stable across reruns), so a failed NEU clip
  # may leave NEU without a test clip.
  train = read_csv(out / "train.csv")
  test = read_csv(out / "test.csv")
  assert len(train) + len(test) == 46
  labels = sorted(lab for _, lab in test)
  assert labels in (sorted(EMOTIONS), sorted(set(EMOTIONS) - {"NEU"}))
  assert all(c.split("_")[2] == lab for c, lab in train + test)
  meta = json.load(open(out / prepare.SETTINGS_FILE))
  assert meta["finished"] and meta["clips"] == 46
  assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_cremad_loader_reads_the_prepared_output(cremad_run, monkeypatch):
  tmp, ids, _ = cremad_run
  cfg = cremad.default_config()
  cfg.data_dir, cfg.subdir = str(tmp), "out"
  cfg.storage, cfg.image_size = "on_demand", 16
  ds = cremad.load(cfg)
  n = {s: len(ds.splits[s].labels) for s in ("train", "val", "test")}
  n_test = len(read_csv(tmp / "out" / "test.csv"))
  assert n["test"] == n_test and n["train"] + n["val"] == 46 - n_test
  x = ds.splits["test"].inputs["visual"]
  assert x.shape == (n_test, 1, 16, 16, 3)
  # Un-normalise one frame and find which source frame it was: one of the
  # kept 0, 8, 16, by the official choice among 2 or 3 files.
  raw = ds.splits["test"].inputs["visual"].raw[0].mean()
  assert testclips.level_to_frame(raw) in (0, 8, 16)
  assert ds.splits["test"].inputs["audio"].shape == (n_test, 257, 188, 1)


def test_rerun_skips_finished_clips_and_refuses_other_settings(
    cremad_run, caplog, capsys):
  tmp, _, _ = cremad_run
  status, summary, _ = run_here(["cremad", "--raw", tmp / "raw", "--out",
                                 tmp / "out", "--workers", 1], caplog)
  assert status == 1
  assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 46, 2)
  status, _, _ = run_here(["cremad", "--raw", tmp / "raw", "--out",
                           tmp / "out", "--split_seed", 3], caplog)
  err = capsys.readouterr().err
  assert status == 2 and "prepared with other settings" in err
  assert "use another --out" in err


def test_kill_between_and_inside_clips_resumes_to_the_same_files(
    cremad_run, tmp_path):
  tmp, _, _ = cremad_run
  raw, out = tmp / "raw", tmp_path / "out"
  args = ["cremad", "--raw", raw, "--out", out, "--workers", 1]
  killed = run_cli(args, {prepare.KILL_ENV: "after_clips:5"})
  assert killed.returncode == -signal.SIGKILL
  assert not (out / "train.csv").exists()
  assert not json.load(open(out / prepare.SETTINGS_FILE))["finished"]
  assert len(os.listdir(out / "Image-01-FPS")) == 5
  # Killed inside the next clip: its audio is written, its frames are not.
  inside = run_cli(args, {prepare.KILL_ENV: "after_audio"})
  assert inside.returncode == -signal.SIGKILL
  assert len(os.listdir(out / "AudioWAV")) == 6
  assert len(os.listdir(out / "Image-01-FPS")) == 5
  again = run_cli(args)
  summary = json.loads(again.stdout.strip().splitlines()[-1])
  assert (summary["done"], summary["skipped"]) == (41, 5)
  cmp = filecmp.dircmp(out, tmp / "out", ignore=[prepare.SETTINGS_FILE])
  def same(c):
    assert not (c.left_only or c.right_only or c.diff_files), c.report()
    for sub in c.subdirs.values():
      same(sub)
  same(cmp)


def test_official_split_files_and_a_row_without_its_clip(cremad_run,
                                                        tmp_path, caplog):
  tmp, ids, _ = cremad_run
  splits = tmp_path / "splits"
  splits.mkdir()
  with open(splits / "train.csv", "w") as f:
    f.write("\ufeff" + "".join(f"{c},{c.split('_')[2]}\n" for c in ids[:40]))
  with open(splits / "test.csv", "w") as f:
    f.write("".join(f"{c},{c.split('_')[2]}\n" for c in ids[40:]))
    f.write("1099_XXX_ANG_XX,ANG\n")
  status, _, _ = run_here(["cremad", "--raw", tmp / "raw", "--out",
                           tmp_path / "out", "--splits", splits, "--workers",
                           1], caplog)
  assert status == 1
  failed = open(tmp_path / "out" / prepare.FAILED_FILE).read()
  assert "1099_XXX_ANG_XX\tlisted in a split file" in failed
  assert [r[0] for r in read_csv(tmp_path / "out" / "test.csv")] == ids[40:]
  assert len(read_csv(tmp_path / "out" / "train.csv")) == 38


def test_bad_arguments(tmp_path, caplog, capsys):
  status, _, _ = run_here(["cremad", "--raw", tmp_path / "nowhere", "--out",
                           tmp_path / "o"], caplog)
  assert status == 2 and "is not a directory" in capsys.readouterr().err
  (tmp_path / "raw").mkdir()
  status, _, _ = run_here(["ave", "--raw", tmp_path / "raw", "--out",
                           tmp_path / "o"], caplog)
  assert status == 2
  assert "Annotations.txt is missing" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    prepare.cli(["imagenet", "--raw", str(tmp_path), "--out", "o"])
  assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_vggsound_layout_and_loader(tmp_path, caplog):
  raw = tmp_path / "raw"
  (raw / "video").mkdir(parents=True)
  rows = [("a-b_c", 30, "dog barking", "train"), ("Zx", 0, "dog barking",
                                                  "train"),
          ("q", 5, "rain", "train"), ("r", 7, "rain", "train"),
          ("s", 1, "dog barking", "test"), ("t", 2, "rain", "test"),
          ("gone", 9, "rain", "test"), ("u", 3, "rain", "validate")]
  with open(raw / "vggsound.csv", "w") as f:
    f.write("youtube_id,time,label,split\n")
    f.writelines(f"{y},{t},{lab},{s}\n" for y, t, lab, s in rows)
  for k, (y, t, _, _) in enumerate(rows):
    if y != "gone":
      testclips.write_clip(str(raw / "video" / f"{y}_{t:06d}.mp4"), 4.5,
                           channels=2, tone_hz=300 + 100 * k)
  status, _, _ = run_here(["vggsound", "--raw", raw, "--out",
                           tmp_path / "out", "--workers", 1], caplog)
  assert status == 1
  out = tmp_path / "out"
  assert open(out / prepare.FAILED_FILE).read().startswith("gone_000009\t")
  assert read_csv(out / "vggsound.csv") == [
      ("youtube_id", "time", "label", "split")] + [
          (y, str(t), lab, s) for y, t, lab, s in rows[:6]]
  sr, x = scipy.io.wavfile.read(out / "audio" / "train" / "a-b_c_000030.wav")
  assert sr == 16000 and x.shape[1] == 2
  assert sorted(os.listdir(out / "frames" / "test" / "Image-01-FPS"
                           / "s_000001")) == [f"{8 * i:05d}.jpg"
                                              for i in range(5)]
  cfg = vggsound.default_config()
  cfg.data_dir, cfg.subdir = str(tmp_path), "out"
  cfg.storage, cfg.image_size, cfg.val_fraction = "on_demand", 16, 0.5
  ds = vggsound.load(cfg)
  assert ds.num_classes == 2
  labels = [*ds.splits["train"].labels, *ds.splits["val"].labels]
  assert sorted(labels) == [0, 0, 1, 1] and len(ds.splits["val"].labels) == 2
  assert ds.splits["test"].inputs["visual"].shape == (2, 3, 16, 16, 3)


def kinetics_raw(raw):
  """train/<class>/ and val/<class>/ folders (cvdf spelling), one class not
  in Kinetics-Sounds."""
  clips = {}
  for split, n in (("train", 3), ("val", 1)):
    for cls in ("playing_bagpipes", "tapping pen", "juggling balls"):
      d = raw / split / cls
      d.mkdir(parents=True)
      for i in range(n):
        c = f"y{split}{cls[:3]}{i}_{10 * i:06d}_{10 * i + 10:06d}"
        testclips.write_clip(str(d / f"{c}.mp4"), 10.0, fps=4)
        clips[c] = (split, cls)
  return clips


def test_kinetics_sounds_layout(tmp_path, caplog):
  clips = kinetics_raw(tmp_path / "raw")
  status, _, log = run_here(["kinetics_sounds", "--raw", tmp_path / "raw",
                             "--out", tmp_path / "out", "--workers", 1],
                            caplog)
  assert status == 0
  out = tmp_path / "out"
  classes = open(out / "classes.txt").read().splitlines()
  assert len(classes) == 31 and classes[8] == "playing bagpipes"
  assert "29 classes of ks31 have no clip" in log
  train = read_csv(out / "train.csv")
  assert sorted(train) == sorted(
      (c, {"playing_bagpipes": "playing bagpipes"}.get(cls, cls))
      for c, (s, cls) in clips.items() if s == "train" and cls != "juggling"
      " balls")
  assert len(read_csv(out / "test.csv")) == 2
  some = train[0][0]
  names = sorted(os.listdir(out / "frames" / some))
  assert names == [f"frame_{i:05d}.jpg" for i in range(1, 11)]
  # 40 frames at 4 fps: moviepy positions round(4 * (i + 0.5)) - 1.
  levels = [testclips.level_to_frame(media.load_rgb(
      str(out / "frames" / some / n), 8).mean()) for n in names]
  assert levels == [round(4 * (i + 0.5)) - 1 for i in range(10)]
  sr, x = scipy.io.wavfile.read(out / "audio" / f"{some}.wav")
  assert sr == 16000 and x.ndim == 1
  cfg = ks.default_config()
  cfg.data_dir, cfg.subdir = str(tmp_path), "out"
  cfg.storage, cfg.image_size, cfg.val_fraction = "on_demand", 8, 0.34
  ds = ks.load(cfg)
  assert ds.num_classes == 31
  train_labels = [*ds.splits["train"].labels, *ds.splits["val"].labels]
  assert sorted(train_labels) == [8, 8, 8, 29, 29, 29]
  assert sorted(ds.splits["test"].labels) == [8, 29]
  assert ds.splits["test"].inputs["audio"].shape == (2, 1024, 128, 1)
  # Frames 1, 4, 7 of the 10 prepared: source frames 1, 13, 25.
  frames = ds.splits["test"].inputs["visual"].raw[0]
  assert [testclips.level_to_frame(f.mean()) for f in frames] == [1, 13, 25]
  assert prepare.class_list("ks32")[-5:] == [
      "strumming guitar", "tap dancing", "tapping guitar", "tapping pen",
      "tickling"]
  assert len(prepare.class_list("ks34")) == 34


def test_ave_layout(tmp_path, caplog):
  raw = tmp_path / "raw"
  (raw / "AVE").mkdir(parents=True)
  ann = [("Church bell", "v1", 0, 10), ("Church bell", "v2", 2, 6),
         ("Male speech, man speaking", "v3", 1, 4),
         ("Male speech, man speaking", "v1", 0, 3),
         ("Bark", "v4", 0, 10), ("Bark", "v5", 3, 9)]
  line = lambda r: f"{r[0]}&{r[1]}&good&{r[2]}&{r[3]}\n"
  (raw / "Annotations.txt").write_text(
      "Category&VideoID&Quality&StartTime&EndTime\n"
      + "".join(map(line, ann)))
  (raw / "trainSet.txt").write_text("".join(map(line, ann[:2] + ann[3:5])))
  (raw / "valSet.txt").write_text(line(ann[2]) + line(ann[2]))
  (raw / "testSet.txt").write_text(line(ann[5]) + line(("Bark", "v9", 0, 1)))
  for vid in ("v1", "v2", "v3", "v4", "v5"):
    testclips.write_clip(str(raw / "AVE" / f"{vid}.mp4"), 10.0, fps=4)
  status, _, _ = run_here(["ave", "--raw", raw, "--out", tmp_path / "out",
                           "--workers", 1], caplog)
  assert status == 1
  out = tmp_path / "out"
  assert open(out / "classes.txt").read().splitlines() == [
      "Church bell", "Male speech, man speaking", "Bark"]
  # The first row of a repeated VideoID is kept (MLB / PMR).
  assert read_csv(out / "train.csv") == [
      ("v1", "Church bell", "0", "10"), ("v2", "Church bell", "2", "6"),
      ("v4", "Bark", "0", "10")]
  assert read_csv(out / "val.csv") == [
      ("v3", "Male speech, man speaking", "1", "4")]
  assert read_csv(out / "test.csv") == [("v5", "Bark", "3", "9")]
  assert "v9\tlisted but AVE/v9.mp4 is missing" in open(
      out / prepare.FAILED_FILE).read()
  assert len(os.listdir(out / "frames" / "v3")) == 10
  cfg = ave.default_config()
  cfg.data_dir, cfg.subdir = str(tmp_path), "out"
  cfg.storage, cfg.image_size = "on_demand", 8
  ds = ave.load(cfg)
  assert ds.num_classes == 3
  assert [list(ds.splits[s].labels) for s in ("train", "val", "test")] == [
      [0, 0, 2], [1], [2]]
  assert ds.splits["val"].inputs["audio"].shape == (1, 257, 1004, 1)
  frames = ds.splits["val"].inputs["visual"].raw[0]
  assert [testclips.level_to_frame(f.mean()) for f in frames] == [1, 13, 25]


def test_cremad_smoke_job_on_the_prepared_output(cremad_run, tmp_path,
                                                  monkeypatch):
  """The CREMA-D smoke config on the prepared output, every stage. Its
  ResNets are swapped for a tiny CNN (audio) and MLP (frames),
  spectrograms are made smaller (65 x 48) and the teachers run one epoch,
  to keep the suite fast; training uses two augmented views
  (the ResNets compile for about two minutes); experiments/README.md has
  the unchanged smoke preset on a prepared fixture."""
  tmp, _, _ = cremad_run
  monkeypatch.setenv("G2D_CACHE_DIR", str(tmp_path / "cache"))
  cfg = fx.config_module("cremad").get_config("smoke")
  with cfg.unlocked():
    cfg.data.data_dir, cfg.data.subdir = str(tmp), "out"
    cfg.data.n_fft, cfg.data.hop_length = 128, 1400
    cfg.teacher.epochs, cfg.student.epochs = 1, 2
    cfg.data.augment_views = 2
    cnn = dict(kind="cnn", channels=(4, 8), downsample="stride",
               use_batchnorm=True)
    cfg.model.encoders = ml_collections.ConfigDict(
        dict(audio=cnn, visual=dict(kind="mlp", hidden_dims=(16,))))
  run.run(cfg, str(tmp_path / "w"))
  summary = json.load(open(tmp_path / "w" / "summary.json"))
  n_test = len(read_csv(tmp / "out" / "test.csv"))
  assert summary["dataset"] == "cremad"
  # Two training views: the teacher cache holds a row per (sample, view),
  # and its manifest says so.
  manifest = json.load(open(tmp_path / "w" / "teacher_cache" /
                            "manifest.json"))
  assert manifest["views"] == {"train": 2, "val": 1, "test": 1}
  assert manifest["splits"]["train"] == 2 * 32
  assert manifest["data"]["settings"]["augment_views"] == 2
  logits = np.load(tmp_path / "w" / "teacher_cache" / "train" /
                   "visual.logits.npy")
  assert logits.shape == (64, 6)
  # Views differ, so their teacher outputs do (rows 2i and 2i + 1).
  assert np.abs(logits[0::2] - logits[1::2]).max() > 1e-4
  acc = summary["student"]["test_accuracy"]
  # An accuracy over n_test clips: a multiple of 1 / n_test.
  assert 0.0 <= acc <= 1.0
  assert abs(acc * n_test - round(acc * n_test)) < 1e-6
