"""Tests of the VGGSound loader on a small fixture in the official layout.

The fixture (written into tmp_path) is made up for these tests: synthetic
tones as 16 kHz WAV files and flat-colour JPEG frames under VGGSound-style
clip names. It is not VGGSound data.
"""

import hashlib
import os

import numpy as np
import pytest
import scipy.io.wavfile
from PIL import Image

from g2d_jax import schedule
from g2d_jax import data
from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import media
from g2d_jax.data import vggsound
from tests import pipeline_fixtures as fx

SR = 16000
CLASSES = ("waterfall burbling", "playing tennis", "car engine starting")
# (youtube id, time, label, split, seconds of audio, frames, has wav).
ROWS = [
    ("Fx00-dropAA", 30, "playing tennis", "train", 4.0, 3, True),  # <= 3
    ("Fx01-aB_cdE", 30, "waterfall burbling", "train", 2.7, 4, True),
    ("Fx02_xY-zzQ", 185, "playing tennis", "train", 11.0, 5, True),
    ("Fx03-qqWWee", 40, "car engine starting", "train", 10.0, 6, True),
    ("Fx04-nowav0", 12, "car engine starting", "train", 3.0, 5, False),
    ("Fx05-rTyUio", 242, "waterfall burbling", "train", 6.5, 7, True),
    ("Fx06-pAsDfg", 7, "playing tennis", "train", 9.9, 8, True),
    ("Fx07-hJkLzx", 1, "car engine starting", "train", 1.3, 4, True),
    ("Fx08-cVbNmq", 90, "waterfall burbling", "train", 5.0, 5, True),
    ("Fx09-wErTyu", 60, "playing tennis", "train", 3.3, 6, True),
    ("Fx10-iOpAsd", 20, "car engine starting", "train", 8.0, 7, True),
    ("Fx11-otherS", 20, "car engine starting", "val", 8.0, 7, True),
    ("Fx12-fGhJkl", 3, "car engine starting", "test", 4.4, 5, True),
    ("Fx13-zXcVbn", 45, "waterfall burbling", "test", 10.5, 4, True),
    ("Fx14-mQwErt", 77, "playing tennis", "test", 2.2, 6, True),
]


def _write_fixture(root, rows=ROWS, header=True, name="vggsound.csv"):
  lines = ["youtube_id,time,label,split"] if header else []
  for k, (yid, t, label, split, secs, n_frames, has_wav) in enumerate(rows):
    lines.append(f"{yid},{t},{label},{split}")
    clip = f"{yid}_{t:06d}"
    folder = os.path.join(root, "frames", split, "Image-01-FPS", clip)
    os.makedirs(folder, exist_ok=True)
    for f in range(n_frames):
      img = np.full((36, 48, 3), 10 + 30 * f, np.uint8)
      Image.fromarray(img).save(os.path.join(folder, f"{25 * f:05d}.jpg"),
                                quality=95)
    if has_wav:
      os.makedirs(os.path.join(root, "audio", split), exist_ok=True)
      n = int(secs * SR)
      x = 0.6 * np.sin(2 * np.pi * (300 + 50 * k) * np.arange(n) / SR)
      x += 0.05 * np.random.default_rng(k).normal(size=n)
      x[n // 3] = 1.0          # int16 full scale survives; clipping is a no-op
      q = np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)
      scipy.io.wavfile.write(os.path.join(root, "audio", split,
                                          clip + ".wav"), SR, q)
  with open(os.path.join(root, name), "w") as f:
    f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  _write_fixture(str(d / "vggsound"))
  return str(d)


def _cfg(data_dir, cache_dir, **kw):
  # val_fraction: one clip of each class's three goes to val.
  return fx.data_config("vggsound", data_dir, cache_dir, **{
      "image_size": 32, "val_fraction": 0.34, **kw})


@pytest.fixture(scope="module")
def dataset(data_dir, tmp_path_factory):
  return data.load_dataset(_cfg(data_dir, tmp_path_factory.mktemp("cache")))


def _split_rows(cfg):
  """Fixture rows of each split in index order (from the loader's listing)."""
  samples, _, _ = vggsound.list_samples(cfg)
  labels = np.array([s.label for s in samples["train"]])
  tr, va = base.carve_validation(labels, cfg.val_fraction,
                                            cfg.val_seed)
  by_id = {f"{r[0]}_{r[1]:06d}": r for r in ROWS}
  return {"train": [by_id[samples["train"][i].clip_id] for i in tr],
          "val": [by_id[samples["train"][i].clip_id] for i in va],
          "test": [by_id[s.clip_id] for s in samples["test"]]}


def _official_choice(n):
  state = np.random.get_state()
  try:
    np.random.seed(999)
    return np.random.choice(n, size=3, replace=False)
  finally:
    np.random.set_state(state)


def test_kept_rows_classes_and_splits(dataset, data_dir):
  ds = dataset
  assert ds.name == "vggsound" and ds.modalities == ("audio", "visual")
  assert ds.num_classes == 3
  rows = _split_rows(_cfg(data_dir, ""))
  # 9 kept train rows (3 frames / no wav dropped, "val" rows ignored).
  assert {s: len(v) for s, v in ds.splits.items()} == {
      "train": 6, "val": 3, "test": 3}
  kept_ids = {r[0] for s in rows.values() for r in s}
  assert not kept_ids & {"Fx00-dropAA", "Fx04-nowav0", "Fx11-otherS"}
  for s, split in ds.splits.items():
    # First appearance among *kept* train rows: the dropped first row does
    # not make "playing tennis" class 0.
    np.testing.assert_array_equal(
        split.labels, [CLASSES.index(r[2]) for r in rows[s]])
    assert split.labels.dtype == np.int32
    assert split.inputs["audio"].shape == (len(split), 129, 626, 1)
    b = split.batch(np.arange(len(split)))
    assert b["audio"].dtype == np.float32 and b["visual"].dtype == np.float32
    assert b["visual"].shape == (len(split), 3, 32, 32, 3)
  assert sorted(r[2] for r in rows["val"]) == sorted(CLASSES)


def _direct_dft_column(x, start, j, n_fft=256, hop=128, crop=80000):
  while len(x) < 160000:
    x = np.tile(x, 2)
  y = np.clip(x[start:start + crop], -1.0, 1.0)
  p = np.concatenate([np.zeros(n_fft // 2), y, np.zeros(n_fft // 2)])
  seg = p[j * hop:j * hop + n_fft]
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
  k = np.arange(n_fft // 2 + 1)[:, None]
  basis = np.exp(-2j * np.pi * k * np.arange(n_fft)[None, :] / n_fft)
  return np.log(np.abs(basis @ (seg * w)) + 1e-7)


def _wav(data_dir, row):
  yid, t, _, split = row[:4]
  sr, q = scipy.io.wavfile.read(os.path.join(
      data_dir, "vggsound", "audio", split, f"{yid}_{t:06d}.wav"))
  assert sr == SR
  return q.astype(np.float64) / 32768.0


@pytest.mark.parametrize("crop", ["center", "start", "seeded"])
def test_spectrogram_matches_direct_dft(data_dir, tmp_path, crop):
  cfg = _cfg(data_dir, tmp_path, storage="on_demand", crop=crop, crop_seed=3)
  ds = data.load_dataset(cfg)
  rows = _split_rows(cfg)
  starts = []
  for s in ("train", "test"):
    for i, row in enumerate(rows[s][:2]):
      clip = f"{row[0]}_{row[1]:06d}"
      if crop == "center":
        start = 40000
      elif crop == "start":
        start = 0
      else:
        digest = hashlib.sha256(f"3:{clip}".encode()).digest()
        start = int.from_bytes(digest[:8], "little") % 80001
      starts.append(start)
      spec = ds.splits[s].inputs["audio"][i]
      x = _wav(data_dir, row)
      for j in (0, 313, 625):
        np.testing.assert_allclose(spec[:, j, 0],
                                   _direct_dft_column(x, start, j),
                                   rtol=1e-5, atol=2e-4)
  if crop == "seeded":
    assert len(set(starts)) == len(starts)
    assert all(0 <= s <= 80000 for s in starts)


def test_three_frames_in_official_choice_order(dataset, data_dir):
  rows = _split_rows(_cfg(data_dir, ""))
  mean = np.array(media.IMAGENET_MEAN, np.float32)
  std = np.array(media.IMAGENET_STD, np.float32)
  for s, split in dataset.splits.items():
    raw = split.inputs["visual"].raw
    for i, row in enumerate(rows[s]):
      chosen = _official_choice(row[5])
      levels = raw[i].reshape(3, -1).mean(axis=1)
      np.testing.assert_allclose(levels, 10 + 30 * chosen, atol=1.5)
    got = split.batch(np.arange(len(split)))["visual"]
    np.testing.assert_allclose(
        got, (raw[:].astype(np.float32) / 255 - mean) / std, atol=1e-6)
  # For 4..8 frames the official choice is a fixed, unsorted triple.
  assert _official_choice(4).tolist() == [2, 1, 3]


def test_cache_equals_on_demand_and_headerless_csv(data_dir, dataset,
                                                   tmp_path):
  lazy = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand"))
  root = os.path.join(data_dir, "vggsound")
  with open(os.path.join(root, "vggsound.csv")) as f:
    body = f.read().split("\n", 1)[1]
  with open(os.path.join(root, "noheader.csv"), "w") as f:
    f.write(body)
  plain = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                                 csv="noheader.csv"))
  for s in dataset.splits:
    idx = np.arange(len(dataset.splits[s]))
    a = dataset.splits[s].batch(idx)
    for other in (lazy, plain):
      b = other.splits[s].batch(idx)
      for m in ("audio", "visual", "label"):
        np.testing.assert_array_equal(a[m], b[m])
  assert lazy.fingerprint["label_sha256"] == dataset.fingerprint[
      "label_sha256"]


def test_bad_input_raises_data_error(data_dir, tmp_path):
  with pytest.raises(errors.DataError, match="VGGSound folder"):
    data.load_dataset(_cfg(str(tmp_path), tmp_path))
  with pytest.raises(errors.DataError, match="missing.csv is missing"):
    data.load_dataset(_cfg(data_dir, tmp_path, csv="missing.csv"))
  with pytest.raises(errors.DataError, match="frames folder"):
    data.load_dataset(_cfg(data_dir, tmp_path, frames_dir="nope"))
  bad = tmp_path / "bad"
  rows = [r for r in ROWS if r[3] == "train"] + [
      ("Fx20-newcls", 5, "dog barking", "test", 3.0, 5, True)]
  _write_fixture(str(bad / "vggsound"), rows)
  with pytest.raises(errors.DataError,
                     match=r"test-only \['dog barking'\]"):
    data.load_dataset(_cfg(str(bad), tmp_path))
  with open(bad / "vggsound" / "vggsound.csv", "a") as f:
    f.write("Fx21-badrow,notanint,dog barking,test\n")
  with pytest.raises(errors.DataError, match="is not an integer"):
    data.load_dataset(_cfg(str(bad), tmp_path))
  with pytest.raises(errors.ConfigError, match="crop"):
    data.load_dataset(_cfg(data_dir, tmp_path, crop="random"))


def test_config_presets_build_and_validate():
  module = fx.check_presets("vggsound", vggsound.MODALITIES, ("smoke,umt",))
  paper = module.get_config("paper")
  assert paper.data.num_frames == 3 and paper.data.crop == "center"
  assert paper.student.epochs == 300 and schedule.gating_taus(paper) == (151,)


def test_smoke_model_accepts_fixture_inputs(dataset):
  c = fx.config_module("vggsound").get_config("smoke")
  out = fx.abstract_outputs(c, dataset)
  assert out.logits.shape == (2, 3)
