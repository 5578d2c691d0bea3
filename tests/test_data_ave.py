"""Tests of the AVE loader on a small fixture in the prepared layout.

The fixture (written into tmp_path) is made up for these tests: 16 kHz WAV
files whose tone changes every second (so the event segment is visible in
the spectrogram) and flat-colour JPEG frames (frame t has its own colour)
under AVE-style video ids and real AVE category names. It is not AVE data.
"""

import logging
import os

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
from PIL import Image

from g2d_jax import data
from g2d_jax import errors
from g2d_jax import schedule
from g2d_jax.data import ave
from g2d_jax.data import clips
from g2d_jax.pipeline import config as config_lib
from tests import pipeline_fixtures as fx

SR = 16000
CLASSES = ("Church bell", "Male speech, man speaking", "Bark",
           "Frying (food)")
ALPHABETICAL = ("Bark", "Church bell", "Frying (food)",
                "Male speech, man speaking")
# (split, VideoID, category, start, end, wav seconds or 0, frames); kept
# rows carry their frames (clip recipe, event recipe with 3 frames).
ROWS = [
    ("train", "-a0Xy_12ab", CLASSES[0], 0, 10, 10.0, 10),
    ("train", "a1_-QwErTy", CLASSES[1], 2, 5, 10.0, 10),
    ("train", "a2ZZZZZZZZZ", CLASSES[2], 7, 8, 10.0, 10),
    ("train", "a3zero0000", CLASSES[3], 3, 3, 10.0, 10),   # zero-length
    ("train", "a4--------", CLASSES[0], 8, 10, 10.0, 10),
    ("train", "a1_-QwErTy", CLASSES[2], 0, 4, 10.0, 10),   # repeated id
    ("train", "a5nowav000", CLASSES[2], 1, 9, 0, 10),      # no wav
    ("train", "a6five0000", CLASSES[1], 4, 6, 10.0, 5),    # 5 frames
    ("train", "a7six00000", CLASSES[3], 7, 9, 10.0, 6),    # none in event
    ("val", "v0aaaaaaaa", CLASSES[0], 0, 10, 10.0, 10),
    ("val", "v1bbbbbbbb", CLASSES[3], 2, 4, 10.0, 10),
    ("val", "v2cccccccc", CLASSES[2], 5, 10, 10.0, 10),
    ("test", "t0shortwav", CLASSES[1], 0, 3, 2.5, 10),     # 2.5 s wav
    ("test", "t1dddddddd", CLASSES[2], 9, 10, 10.0, 10),
    ("test", "t2eeeeeeee", CLASSES[0], 4, 7, 10.0, 10),
]
CLIP_FRAMES = {"-a0Xy_12ab": (1, 4, 7), "a1_-QwErTy": (1, 4, 7),
               "a2ZZZZZZZZZ": (1, 4, 7), "a3zero0000": (1, 4, 7),
               "a4--------": (1, 4, 7), "a6five0000": (1, 2, 3),
               "a7six00000": (1, 3, 5), "v0aaaaaaaa": (1, 4, 7),
               "v1bbbbbbbb": (1, 4, 7), "v2cccccccc": (1, 4, 7),
               "t0shortwav": (1, 4, 7), "t1dddddddd": (1, 4, 7),
               "t2eeeeeeee": (1, 4, 7)}
EVENT_FRAMES = {"-a0Xy_12ab": (1, 2, 3), "a1_-QwErTy": (3, 4, 5),
                "a2ZZZZZZZZZ": (8, 8, 8), "a4--------": (9, 10, 10),
                "a6five0000": (5, 5, 5), "v0aaaaaaaa": (1, 2, 3),
                "v1bbbbbbbb": (3, 4, 4), "v2cccccccc": (6, 7, 8),
                "t0shortwav": (1, 2, 3), "t1dddddddd": (10, 10, 10),
                "t2eeeeeeee": (5, 6, 7)}
FIRST = {}
for _r in ROWS:
  FIRST.setdefault((_r[0], _r[1]), _r)


def _colour(t):
  return (15 + 20 * t, 240 - 18 * t, 90 + 12 * t)


def _write_fixture(root, rows=ROWS):
  os.makedirs(os.path.join(root, "audio"))
  os.makedirs(os.path.join(root, "frames"))
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("\n".join(CLASSES) + "\n")
  lines = {"train": [], "val": [], "test": []}
  done = set()
  for k, (split, vid, cat, start, end, secs, n_frames) in enumerate(rows):
    lines[split].append(f'{vid},"{cat}",{start},{end}')
    if vid in done:
      continue
    done.add(vid)
    if secs:
      n = int(secs * SR)
      t = np.arange(n) / SR
      freq = 200.0 + 150.0 * np.floor(t) + 13.0 * k   # a new tone each second
      x = 0.5 * np.sin(2 * np.pi * freq * t)
      x += 0.03 * np.random.default_rng(k).normal(size=n)
      q = np.round(x * 32767).astype(np.int16)
      scipy.io.wavfile.write(os.path.join(root, "audio", vid + ".wav"), SR, q)
    folder = os.path.join(root, "frames", vid)
    os.makedirs(folder)
    for t in range(1, n_frames + 1):
      img = np.zeros((20, 28, 3), np.uint8) + np.uint8(_colour(t))
      Image.fromarray(img).save(os.path.join(folder, f"frame_{t:05d}.jpg"),
                                quality=95)
  for split, body in lines.items():
    with open(os.path.join(root, f"{split}.csv"), "w") as f:
      f.write("\n".join(body) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  _write_fixture(str(d / "ave"))
  return str(d)


def _cfg(data_dir, cache_dir, **kw):
  return fx.data_config("ave", data_dir, cache_dir,
                        **{"image_size": 16, **kw})


@pytest.fixture(scope="module")
def dataset(data_dir, tmp_path_factory):
  return data.load_dataset(_cfg(data_dir, tmp_path_factory.mktemp("cache")))


def _kept(split, event):
  """Fixture rows the loader keeps, in order (independent of it)."""
  out, seen = [], set()
  for r in ROWS:
    if r[0] != split or r[1] in seen:
      continue
    seen.add(r[1])
    if not r[5] or (event and (r[3] == r[4] or r[1] not in EVENT_FRAMES)):
      continue
    out.append(r)
  return out


def _wav(data_dir, vid):
  sr, q = scipy.io.wavfile.read(os.path.join(data_dir, "ave", "audio",
                                             vid + ".wav"))
  assert sr == SR
  return q.astype(np.float64) / 32768.0


def _tukey_periodic(n=512, alpha=0.25):
  """scipy's default ('tukey', 0.25) window, periodic: the symmetric
  window of n + 1 points without its last one."""
  x = np.arange(n + 1) / n
  w = np.ones(n + 1)
  lo, hi = x < alpha / 2, x > 1 - alpha / 2
  w[lo] = 0.5 * (1 - np.cos(2 * np.pi * x[lo] / alpha))
  w[hi] = 0.5 * (1 - np.cos(2 * np.pi * (1 - x[hi]) / alpha))
  return w[:-1]


def _spectrogram(y, fs, standardize):
  """scipy.signal.spectrogram's defaults written out: constant detrend,
  periodic Tukey(0.25), one-sided PSD density, then log and z-score."""
  w = _tukey_periodic()
  seg = np.lib.stride_tricks.sliding_window_view(y, 512)[::159]
  seg = seg - seg.mean(axis=1, keepdims=True)
  p = np.abs(np.fft.rfft(seg * w, axis=1)) ** 2 / (fs * np.sum(w ** 2))
  p[:, 1:-1] *= 2
  s = np.log(p.T + 1e-7)
  return (s - s.mean()) / (s.std() + 1e-9) if standardize else s


def _expected_audio(data_dir, row, event, standardize=True):
  x = _wav(data_dir, row[1])
  if event:
    y = np.tile(x[SR * row[3]:SR * row[4]], 10)
    if len(y) < 160000:
      y = np.tile(y, 10)
    fs = SR
  else:
    y = np.tile(scipy.signal.resample_poly(x, 441, 320), 10)
    fs = 22050
  return _spectrogram(np.clip(y[:160000], -1, 1), fs, standardize)


def test_tukey_reference_is_scipys_default():
  np.testing.assert_allclose(
      _tukey_periodic(), scipy.signal.get_window(("tukey", 0.25), 512),
      atol=1e-12)


def test_kept_rows_labels_and_official_splits(dataset, data_dir, caplog):
  ds = dataset
  assert ds.name == "ave" and ds.modalities == ("audio", "visual")
  assert ds.num_classes == 4
  assert "val_fraction" not in data.default_data_config("ave")
  # 9 train rows: a repeated id and a row without wav left out; the official
  # val and test rows as they are.
  assert {s: len(v) for s, v in ds.splits.items()} == {
      "train": 7, "val": 3, "test": 3}
  for s, split in ds.splits.items():
    rows = _kept(s, event=False)
    assert split.inputs["audio"].shape == (len(split), 257, 1004, 1)
    assert split.inputs["visual"].shape == (len(split), 3, 16, 16, 3)
    np.testing.assert_array_equal(split.labels,
                                  [CLASSES.index(r[2]) for r in rows])
    b = split.batch(np.arange(len(split)))
    assert b["audio"].dtype == np.float32 and b["visual"].dtype == np.float32
  # The repeated VideoID keeps its first row (Male speech, not Bark).
  assert ds.splits["train"].labels[1] == 1
  caplog.set_level(logging.INFO)
  ave.list_samples(_cfg(data_dir, "", segment="event"))
  log = " ".join(r.getMessage() for r in caplog.records)
  assert ("AVE train.csv (event): kept 5 of 9 rows (1 repeated VideoIDs left"
          " out, 1 zero-length events, 1 without wav or frame folder, 1"
          " without frames)") in log
  assert ds.fingerprint["classes_sha256"] == clips.names_sha256(
      list(CLASSES))


def test_alphabetical_class_order(data_dir, tmp_path):
  ds = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                              class_order="alphabetical"))
  for s, split in ds.splits.items():
    np.testing.assert_array_equal(
        split.labels, [ALPHABETICAL.index(r[2]) for r in _kept(s, False)])
  assert ds.fingerprint["classes_sha256"] == clips.names_sha256(
      list(ALPHABETICAL))
  # "Male speech, man speaking" is 1 in annotation order, 3 here.
  assert ds.splits["train"].labels[1] == 3


def test_clip_spectrogram_matches_independent_computation(dataset, data_dir):
  for s in ("train", "test"):
    for i, row in enumerate(_kept(s, event=False)[:3]):
      got = dataset.splits[s].inputs["audio"][i][..., 0]
      want = _expected_audio(data_dir, row, event=False)
      assert want.shape == (257, 1004)
      np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
      assert abs(float(got.mean())) < 1e-4
      assert float(got.std()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("standardize", [True, False])
def test_event_spectrogram_matches_independent_computation(
    data_dir, tmp_path, standardize):
  ds = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                              segment="event", standardize=standardize))
  assert {s: len(v) for s, v in ds.splits.items()} == {
      "train": 5, "val": 3, "test": 3}
  checked = 0
  for s in ("train", "test"):
    rows = _kept(s, event=True)
    np.testing.assert_array_equal(ds.splits[s].labels,
                                  [CLASSES.index(r[2]) for r in rows])
    for i, row in enumerate(rows[:3]):
      got = ds.splits[s].inputs["audio"][i][..., 0]
      want = _expected_audio(data_dir, row, True, standardize)
      np.testing.assert_allclose(got, want, rtol=0,
                                 atol=2e-4 if standardize else 1e-3)
      checked += 1
  assert checked == 6
  # The event and the whole clip give different spectrograms.
  clip = _expected_audio(data_dir, ROWS[1], event=False)
  event = _expected_audio(data_dir, ROWS[1], event=True)
  assert np.abs(clip - event).mean() > 0.1


def test_frame_choice_by_colour(dataset, data_dir, tmp_path):
  event = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                                 segment="event"))
  mlb = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                               segment="event", num_frames=4))
  checked = 0
  for ds, is_event, table, k in ((dataset, False, CLIP_FRAMES, 3),
                                 (event, True, EVENT_FRAMES, 3),
                                 (mlb, True, None, 4)):
    for s, split in ds.splits.items():
      raw = split.inputs["visual"].raw
      assert raw.shape[1] == k
      for i, row in enumerate(_kept(s, is_event)):
        if table is None:   # 4 frames: the 3-frame choice, topped up
          ts = EVENT_FRAMES[row[1]]
          more = row[3] + 4 if row[3] + 4 <= min(row[4], row[6]) else ts[-1]
          ts = ts + (more,)
        else:
          ts = table[row[1]]
        got = raw[i].reshape(k, -1, 3).mean(axis=1)
        np.testing.assert_allclose(got, [_colour(t) for t in ts], atol=2.0)
        checked += 1
  assert checked == 13 + 11 + 11
  assert ave.clip_frames(10) == [1, 4, 7] and ave.clip_frames(2) == [1, 1, 1]
  names = [f"frame_{t:05d}.jpg" for t in range(1, 11)]
  assert ave.event_frames(names, 2, 5, 4) == [3, 4, 5, 5]
  assert ave.event_frames(names[:5], 6, 9, 3) == []


def test_short_signals_are_tiled_to_length(tmp_path):
  path = str(tmp_path / "short.wav")
  x = np.round(0.3 * np.sin(np.arange(800) / 7.0) * 32767).astype(np.int16)
  scipy.io.wavfile.write(path, SR, x)
  cfg = data.default_data_config("ave")
  clip = ave.Event("short", 0, path, (), 0, 1)
  y = ave.waveform(clip, cfg)
  x22 = scipy.signal.resample_poly(x / 32768.0, 441, 320)
  assert y.shape == (160000,) and len(x22) == 1103
  np.testing.assert_allclose(y, np.tile(x22, 146)[:160000], atol=1e-12)
  cfg.segment = "event"
  np.testing.assert_allclose(ave.waveform(clip, cfg),
                             np.tile(x / 32768.0, 200), atol=1e-12)
  late = ave.Event("short", 0, path, (), 3, 5)
  with pytest.raises(errors.DataError, match="ends before the event"):
    ave.waveform(late, cfg)


def test_cache_equals_on_demand_and_settings(data_dir, dataset, tmp_path):
  lazy = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand"))
  for s in dataset.splits:
    idx = np.arange(len(dataset.splits[s]))
    a, b = dataset.splits[s].batch(idx), lazy.splits[s].batch(idx)
    for m in ("audio", "visual", "label"):
      np.testing.assert_array_equal(a[m], b[m])
    assert isinstance(dataset.splits[s].inputs["audio"], np.memmap)
  assert lazy.fingerprint == dataset.fingerprint
  settings = dataset.fingerprint["settings"]
  assert settings["clip_sample_rate"] == 22050
  assert "event_sample_rate" not in settings
  ev = ave.build_settings(_cfg(data_dir, "", segment="event"))
  assert ev["event_sample_rate"] == 16000 and "clip_sample_rate" not in ev


def test_bad_input_raises(data_dir, tmp_path):
  with pytest.raises(errors.DataError, match="AVE folder"):
    data.load_dataset(_cfg(str(tmp_path), tmp_path))
  root = tmp_path / "bad" / "ave"
  _write_fixture(str(root), [r for r in ROWS if r[1] in (
      "-a0Xy_12ab", "v0aaaaaaaa", "t2eeeeeeee")])
  cfg = lambda **kw: _cfg(str(tmp_path / "bad"), tmp_path,
                          storage="on_demand", **kw)
  assert len(data.load_dataset(cfg()).splits["val"]) == 1
  test_csv = (root / "test.csv").read_text()
  os.remove(root / "val.csv")
  with pytest.raises(errors.DataError, match=r"val\.csv is missing"):
    data.load_dataset(cfg())
  (root / "val.csv").write_text("v0aaaaaaaa,Male speech, man speaking,0,4\n")
  with pytest.raises(errors.DataError, match="quote categories"):
    data.load_dataset(cfg())
  (root / "val.csv").write_text('v0aaaaaaaa,"Male speech",0,4\n')
  with pytest.raises(errors.DataError, match="category 'Male speech'"):
    data.load_dataset(cfg())
  (root / "val.csv").write_text('v0aaaaaaaa,"Bark",5,4\n')
  with pytest.raises(errors.DataError, match="ends .4 s. before"):
    data.load_dataset(cfg())
  (root / "val.csv").write_text('v0aaaaaaaa,"Bark",1.5,4\n')
  with pytest.raises(errors.DataError, match="whole number of seconds"):
    data.load_dataset(cfg())
  (root / "val.csv").write_text(test_csv)
  os.remove(root / "classes.txt")
  with pytest.raises(errors.DataError,
                     match=r"classes\.txt is missing.*prepare ave"):
    data.load_dataset(cfg())
  with pytest.raises(errors.ConfigError, match="class_order"):
    data.load_dataset(cfg(class_order="sorted"))
  with pytest.raises(errors.ConfigError, match="segment"):
    data.load_dataset(cfg(segment="se"))
  with pytest.raises(errors.ConfigError, match="noverlap"):
    data.load_dataset(cfg(noverlap=512))


def test_config_presets_build_and_validate():
  module = fx.check_presets("ave", ave.MODALITIES, ("smoke,mlb",))
  paper = module.get_config()
  assert paper.data.segment == "clip" and paper.data.num_frames == 3
  assert paper.data.class_order == "annotation"
  assert paper.student.epochs == 300 and schedule.gating_taus(paper) == (151,)
  config_lib.validate(module.get_config("small"), 1, ave.MODALITIES)


def test_smoke_model_accepts_fixture_inputs(dataset):
  c = fx.config_module("ave").get_config("smoke")
  out = fx.abstract_outputs(c, dataset)
  assert out.logits.shape == (2, 4)
  assert set(out.features) == {"audio", "visual"}
