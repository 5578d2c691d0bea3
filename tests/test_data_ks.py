"""Tests of the Kinetics-Sounds loader on a small fixture in the prepared
layout. (The whole pipeline on prepared output runs in
test_data_prepare; the smoke preset's ResNets take about two minutes to
compile, too slow for the suite.)

The fixture (written into tmp_path by `_write_fixture`) is made up for these
tests: synthetic tones as 16 kHz WAV files and flat-colour JPEG frames
(frame t has its own colour) under Kinetics-style clip names. It is not
Kinetics data.
"""

import logging
import os

import numpy as np
import pytest
import scipy.io.wavfile
from PIL import Image

from g2d_jax import data
from g2d_jax import errors
from g2d_jax import schedule
from g2d_jax.data import base
from g2d_jax.data import fbank
from g2d_jax.data import ks
from g2d_jax.data import media
from g2d_jax.pipeline import config as config_lib
from tests import pipeline_fixtures as fx
from tests.test_data_fbank import _reference

SR = 16000
CLASSES = ("blowing out candles", "playing bass guitar", "tapping pen")
# Frames in a folder -> the BalanceBenchmark test-time frames (1-based).
EXPECTED_FRAMES = {10: (1, 4, 7), 9: (1, 4, 7), 8: (1, 3, 5), 7: (1, 3, 5),
                   5: (1, 1, 1), 4: (1, 1, 1)}
PAD_VALUE = (0.0 + 4.503877) / (2 * 5.141276)


def _colour(t):
  return (20 + 20 * t, 230 - 15 * t, 60 + 10 * t)


def _rows():
  """(split, clip id, class as written in the CSV, seconds, frames, wav)."""
  rows = []
  counts = (10, 7, 5, 4, 10, 8, 9)
  for c, name in enumerate(CLASSES):
    for j in range(7):
      k = 7 * c + j
      secs = {3: 11.0, 10: 0.5}.get(k, 1.0 + 0.25 * j)
      # One row spells the class the Kinetics folder way.
      written = name.replace(" ", "_") if k == 8 else name
      rows.append(("train", f"-Kx{k:02d}_q_{k:06d}_{k + 10:06d}", written,
                   secs, counts[j], True))
    for j in range(2):
      rows.append(("test", f"Te{c}{j}-zz_{30 + j}", name, 1.5, counts[j],
                   True))
  rows += [("train", "drop3frames_000001_000011", CLASSES[0], 1.0, 3, True),
           ("train", "dropnowav_000001_000011", CLASSES[1], 1.0, 10, False),
           ("train", "dropnoframes_000001_000011", CLASSES[2], 1.0, 0, True),
           ("test", "dropnowav_7", CLASSES[2], 1.0, 10, False)]
  return rows


ROWS = _rows()
BY_ID = {r[1]: r for r in ROWS}


def _write_fixture(root, rows=ROWS, classes=CLASSES):
  os.makedirs(os.path.join(root, "audio"))
  os.makedirs(os.path.join(root, "frames"))
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("\n".join(classes) + "\n")
  lines = {"train": [], "test": []}
  for k, (split, clip, name, secs, n_frames, has_wav) in enumerate(rows):
    lines[split].append(f"{clip},{name}")
    if has_wav:
      n = int(secs * SR)
      t = np.arange(n) / SR
      x = 0.4 * np.sin(2 * np.pi * (220 + 97 * k) * t) + 0.05
      x += 0.02 * np.random.default_rng(k).normal(size=n)
      q = np.round(x * 32767).astype(np.int16)
      scipy.io.wavfile.write(os.path.join(root, "audio", clip + ".wav"), SR, q)
    if n_frames:
      folder = os.path.join(root, "frames", clip)
      os.makedirs(folder)
      for t in range(1, n_frames + 1):
        img = np.zeros((24, 32, 3), np.uint8) + np.uint8(_colour(t))
        Image.fromarray(img).save(
            os.path.join(folder, f"frame_{t:05d}.jpg"), quality=95)
  for split, body in lines.items():
    with open(os.path.join(root, f"{split}.csv"), "w") as f:
      f.write("\n".join(body) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  _write_fixture(str(d / "kinetics_sounds"))
  return str(d)


def _cfg(data_dir, cache_dir, **kw):
  return fx.data_config("kinetics_sounds", data_dir, cache_dir,
                        **{"image_size": 16, **kw})


@pytest.fixture(scope="module")
def dataset(data_dir, tmp_path_factory):
  return data.load_dataset(_cfg(data_dir, tmp_path_factory.mktemp("cache")))


def _split_rows(cfg):
  """Fixture rows of each split in index order (from the loader's list)."""
  samples, _, _ = ks.list_samples(cfg)
  labels = np.array([s.label for s in samples["train"]])
  tr, va = base.carve_validation(labels, cfg.val_fraction, cfg.val_seed)
  return {"train": [BY_ID[samples["train"][i].clip_id] for i in tr],
          "val": [BY_ID[samples["train"][i].clip_id] for i in va],
          "test": [BY_ID[s.clip_id] for s in samples["test"]]}


def _wav(data_dir, clip):
  sr, q = scipy.io.wavfile.read(os.path.join(
      data_dir, "kinetics_sounds", "audio", clip + ".wav"))
  assert sr == SR and q.dtype == np.int16
  return q.astype(np.float64) / 32768.0


def test_kept_rows_classes_and_splits(dataset, data_dir, caplog):
  ds = dataset
  assert ds.name == "kinetics_sounds" and ds.modalities == ("audio", "visual")
  assert ds.num_classes == 3 and ds.task == "classification"
  # 21 kept train rows (3 dropped), round(0.1 * 7) = 1 per class to val;
  # 6 kept test rows (1 dropped).
  assert {s: len(v) for s, v in ds.splits.items()} == {
      "train": 18, "val": 3, "test": 6}
  caplog.set_level(logging.INFO)
  rows = _split_rows(_cfg(data_dir, ""))
  log = " ".join(r.getMessage() for r in caplog.records)
  assert ("train.csv: kept 21 of 24 rows (2 without wav or frame folder, 1"
          " with fewer than 4 frames)") in log
  assert "test.csv: kept 6 of 7 rows (1 without wav" in log
  for s, split in ds.splits.items():
    want = [CLASSES.index(r[2].replace("_", " ")) for r in rows[s]]
    np.testing.assert_array_equal(split.labels, want)
    assert split.labels.dtype == np.int32
    assert split.inputs["audio"].shape == (len(split), 1024, 128, 1)
    assert split.inputs["visual"].shape == (len(split), 3, 16, 16, 3)
    b = split.batch(np.arange(len(split)))
    assert b["audio"].dtype == np.float32 and b["visual"].dtype == np.float32
  assert sorted(CLASSES.index(r[2]) for r in rows["val"]) == [0, 1, 2]
  kept = {r[1] for s in rows.values() for r in s}
  assert not kept & {r[1] for r in ROWS if r[1].startswith("drop")}
  assert ds.fingerprint["classes_sha256"] == ks.clips.names_sha256(
      list(CLASSES))


def test_fbank_matches_independent_computation(data_dir, tmp_path):
  cfg = _cfg(data_dir, tmp_path, storage="on_demand")
  ds = data.load_dataset(cfg)
  rows = _split_rows(cfg)
  seen = set()
  for s in ("train", "val", "test"):
    for i, row in enumerate(rows[s]):
      x = _wav(data_dir, row[1])
      n = 1 + (len(x) - 400) // 160
      got = ds.splits[s].inputs["audio"][i][..., 0]
      x = x - x.mean()
      if row[3] in (11.0, 0.5):      # the cut clip and the padded clip
        ref = _reference(x)
        seen.add(row[3])
      else:
        ref = fbank.kaldi_fbank(x, SR).astype(np.float64)
      ref = (ref[:1024] + 4.503877) / (2 * 5.141276)
      m = min(n, 1024)
      np.testing.assert_allclose(got[:m], ref, rtol=0, atol=1e-5)
      np.testing.assert_array_equal(got[m:], np.float32(PAD_VALUE))
  assert seen == {11.0, 0.5}
  # 11 s: 1098 frames cut to 1024; 0.5 s: 48 frames, then padding 0.438.
  assert PAD_VALUE == pytest.approx(0.43801, abs=1e-5)


def test_frame_choice_by_colour(dataset, data_dir):
  rows = _split_rows(_cfg(data_dir, ""))
  mean = np.array(media.IMAGENET_MEAN, np.float32)
  std = np.array(media.IMAGENET_STD, np.float32)
  seen = set()
  for s, split in dataset.splits.items():
    raw = split.inputs["visual"].raw
    assert raw.dtype == np.uint8
    for i, row in enumerate(rows[s]):
      ts = EXPECTED_FRAMES[row[4]]
      assert ks.balancebenchmark_frames(row[4]) == list(ts)
      got = raw[i].reshape(3, -1, 3).mean(axis=1)
      np.testing.assert_allclose(got, [_colour(t) for t in ts], atol=2.0)
      seen.add(ts)
    np.testing.assert_allclose(
        split.batch(np.arange(len(split)))["visual"],
        (raw[:].astype(np.float32) / 255 - mean) / std, atol=1e-6)
  assert seen == {(1, 4, 7), (1, 3, 5), (1, 1, 1)}


def test_num_frames_setting(data_dir, tmp_path):
  assert ks.balancebenchmark_frames(10, 2) == [2, 7]
  assert ks.balancebenchmark_frames(10, 1) == [5]
  ds = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                              num_frames=2))
  rows = _split_rows(_cfg(data_dir, "", num_frames=2))
  i = next(i for i, r in enumerate(rows["test"]) if r[4] == 10)
  got = ds.splits["test"].inputs["visual"].raw[i].reshape(2, -1, 3)
  np.testing.assert_allclose(got.mean(axis=1), [_colour(2), _colour(7)],
                             atol=2.0)


def test_cache_equals_on_demand(data_dir, dataset, tmp_path):
  lazy = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand"))
  for s in dataset.splits:
    idx = np.arange(len(dataset.splits[s]))
    a, b = dataset.splits[s].batch(idx), lazy.splits[s].batch(idx)
    for m in ("audio", "visual", "label"):
      np.testing.assert_array_equal(a[m], b[m])
    assert isinstance(dataset.splits[s].inputs["audio"], np.memmap)
  assert lazy.fingerprint == dataset.fingerprint


def test_bad_input_raises(data_dir, tmp_path):
  with pytest.raises(errors.DataError, match="Kinetics-Sounds folder"):
    data.load_dataset(_cfg(str(tmp_path), tmp_path))
  bad = tmp_path / "bad" / "kinetics_sounds"
  rows = [r for r in ROWS if r[1] in ("-Kx00_q_000000_000010", "Te00-zz_30")]
  _write_fixture(str(bad), rows)
  cfg = lambda **kw: _cfg(str(tmp_path / "bad"), tmp_path,
                          storage="on_demand", **kw)
  assert len(data.load_dataset(cfg(val_fraction=0.5)).splits["test"]) == 1
  os.remove(bad / "classes.txt")
  with pytest.raises(errors.DataError,
                     match=r"classes\.txt is missing.*prepare kinetics"):
    data.load_dataset(cfg())
  (bad / "classes.txt").write_text("tapping pen\n")
  with pytest.raises(errors.DataError,
                     match="class 'blowing out candles' of clip"):
    data.load_dataset(cfg())
  (bad / "classes.txt").write_text("tapping pen\ntapping_pen\n")
  with pytest.raises(errors.DataError, match="repeats line 1"):
    data.load_dataset(cfg())
  (bad / "classes.txt").write_text("\n".join(CLASSES) + "\n")
  with pytest.raises(errors.DataError, match=r"nope\.csv is missing"):
    data.load_dataset(cfg(test_csv="nope.csv"))
  with pytest.raises(errors.ConfigError, match="window"):
    data.load_dataset(cfg(window="hann"))
  with pytest.raises(errors.ConfigError, match="num_mel_bins"):
    data.load_dataset(cfg(num_mel_bins=3))
  with pytest.raises(errors.DataError, match="with >= 11 frames"):
    data.load_dataset(_cfg(data_dir, tmp_path, min_frames=11))


def test_config_presets_build_and_validate():
  # configs/ks.py names the dataset "kinetics_sounds" (fx.check_presets
  # expects the file to carry the dataset's name).
  module = fx.config_module("ks")
  for preset in module.PRESETS + ("smoke,ogm_ge",):
    c = module.get_config(preset)
    assert c.data.name == "kinetics_sounds"
    config_lib.validate(c, 4, ks.MODALITIES)
  paper = module.get_config()
  assert paper.data.name == "kinetics_sounds" and paper.data.num_frames == 3
  assert paper.model.encoders.audio.kind == "resnet18"
  assert paper.student.epochs == 300 and schedule.gating_taus(paper) == (151,)


def test_smoke_model_accepts_fixture_inputs(dataset):
  c = fx.config_module("ks").get_config("smoke")
  out = fx.abstract_outputs(c, dataset)
  assert out.logits.shape == (2, 3)
  assert set(out.features) == {"audio", "visual"}
