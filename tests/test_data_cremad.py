"""Tests of the CREMA-D loader on a small fixture in the official layout.

The fixture (written into tmp_path by `_write_fixture`) is made up for these
tests: a few synthetic tones as WAV files and flat-colour JPEG frames under
CREMA-D's file names. It is not CREMA-D data.
"""

import os

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal
from PIL import Image

from g2d_jax import schedule
from g2d_jax import data
from g2d_jax import errors
from g2d_jax.data import base
from g2d_jax.data import cremad
from g2d_jax.data import media
from tests import pipeline_fixtures as fx

SR = 22050
SENTENCES = ("IEO", "DFA", "IOM", "ITH", "ITS", "IWL")
# n frames -> official frame index (seed 999, size 1, replace=False).
OFFICIAL_INDEX = {1: 0, 2: 1, 3: 1, 4: 2, 5: 3, 6: 2, 7: 3, 8: 3}


def _tone(seconds, freq, sr, amp=0.5, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * sr)) / sr
  return amp * np.sin(2 * np.pi * freq * t) + 0.01 * rng.normal(size=t.size)


def _write_wav(path, x, sr, as_float=False):
  if as_float:
    scipy.io.wavfile.write(path, sr, x.astype(np.float32))
  else:
    q = np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)
    scipy.io.wavfile.write(path, sr, q)


def _read_fixture_wav(path):
  sr, x = scipy.io.wavfile.read(path)
  x = x.astype(np.float64) / (32768.0 if x.dtype == np.int16 else 1.0)
  return sr, x


def _write_frames(folder, n):
  os.makedirs(folder)
  for k in range(n):
    # Frame k is a flat grey of level 20 + 40 k (exact through JPEG and
    # bilinear resizing), so the chosen frame is readable from the pixels.
    img = np.full((30, 40, 3), 20 + 40 * k, np.uint8)
    Image.fromarray(img).save(os.path.join(folder, f"{25 * k:05d}.jpg"),
                              quality=95)


def _write_fixture(root):
  """CREMA-D layout: 12 + 2 train rows (2 skipped), 4 test rows."""
  os.makedirs(os.path.join(root, "AudioWAV"))
  os.makedirs(os.path.join(root, "Image-01-FPS"))
  info = {}
  rows = {"train": [], "test": []}
  k = 0
  for part, per_class in (("train", 2), ("test", None)):
    classes = cremad.CLASSES if per_class else ("NEU", "HAP", "SAD", "ANG")
    for c in classes:
      for j in range(per_class or 1):
        clip = f"{1001 + k}_{SENTENCES[k % 6]}_{c}_XX"
        n_frames = 1 + k % 5
        sr = 16000 if (part == "test" and c == "SAD") else SR
        x = _tone(1.3 + 0.1 * (k % 7), 200 + 37 * k, sr, seed=k)
        as_float = (part == "train" and c == "ANG" and j == 0)
        if as_float:
          x = 3.2 * x       # exceeds [-1, 1]: exercises the clipping
        _write_wav(os.path.join(root, "AudioWAV", clip + ".wav"), x, sr,
                   as_float)
        _write_frames(os.path.join(root, "Image-01-FPS", clip), n_frames)
        info[clip] = {"n_frames": n_frames, "sr": sr}
        rows[part].append(f"{clip},{c}")
        k += 1
  # Kept out by the official rule: no wav / no frame folder.
  rows["train"].append("1090_IEO_HAP_LO,HAP")
  _write_frames(os.path.join(root, "Image-01-FPS", "1090_IEO_HAP_LO"), 2)
  rows["train"].append("1091_DFA_SAD_HI,SAD")
  _write_wav(os.path.join(root, "AudioWAV", "1091_DFA_SAD_HI.wav"),
             _tone(1.5, 300, SR), SR)
  for part in ("train", "test"):
    with open(os.path.join(root, f"{part}.csv"), "w") as f:
      f.write("\n".join(rows[part]) + "\n")
  return info


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("data")
  info = _write_fixture(str(data_dir / "cremad"))
  return str(data_dir), info


def _cfg(data_dir, tmp, **kw):
  return fx.data_config("cremad", data_dir, tmp, **{
      "image_size": 32, "val_fraction": 0.5, **kw})


@pytest.fixture(scope="module")
def dataset(fixture_dir, tmp_path_factory):
  data_dir, _ = fixture_dir
  return data.load_dataset(_cfg(data_dir, tmp_path_factory.mktemp("cache")))


def _split_ids(data_dir, **kw):
  cfg = _cfg(data_dir, "", **kw)
  samples, _ = cremad.list_samples(cfg)
  labels = np.array([s.label for s in samples["train"]])
  tr, va = base.carve_validation(labels, cfg.val_fraction, cfg.val_seed)
  return {"train": [samples["train"][i].clip_id for i in tr],
          "val": [samples["train"][i].clip_id for i in va],
          "test": [s.clip_id for s in samples["test"]]}


def test_official_frame_choice_indices():
  got = [int(media.official_frame_choice(n, 1)[0]) for n in range(1, 9)]
  assert got == [0, 1, 1, 2, 3, 2, 3, 3]
  # Same as the official global-state call, which we must not disturb.
  state = np.random.get_state()
  try:
    for n in range(3, 12):
      np.random.seed(999)
      want = np.random.choice(n, size=3, replace=False)
      np.testing.assert_array_equal(media.official_frame_choice(n, 3), want)
  finally:
    np.random.set_state(state)
  before = np.random.get_state()[1].copy()
  media.official_frame_choice(7, 1)
  np.testing.assert_array_equal(np.random.get_state()[1], before)
  with pytest.raises(errors.DataError, match="2 frames but 3"):
    media.official_frame_choice(2, 3)


def test_shapes_dtypes_labels_and_split_sizes(dataset, fixture_dir):
  data_dir, _ = fixture_dir
  ds = dataset
  assert ds.name == "cremad" and ds.modalities == ("audio", "visual")
  assert ds.num_classes == 6 and ds.task == "classification"
  # 12 kept train rows (2 skipped), half of each class to val; 4 test rows.
  assert {s: len(ds.splits[s]) for s in ds.splits} == {
      "train": 6, "val": 6, "test": 4}
  ids = _split_ids(data_dir)
  for s, split in ds.splits.items():
    want = [cremad.CLASSES.index(i.split("_")[2]) for i in ids[s]]
    np.testing.assert_array_equal(split.labels, want)
    assert split.labels.dtype == np.int32
    assert split.inputs["audio"].shape == (len(split), 257, 188, 1)
    assert split.inputs["visual"].shape == (len(split), 1, 32, 32, 3)
    batch = split.batch(np.arange(len(split)))
    assert batch["audio"].dtype == np.float32
    assert batch["visual"].dtype == np.float32
    assert batch["visual"].shape == (len(split), 1, 32, 32, 3)
  assert not set(ids["train"]) & set(ids["val"])
  assert {i.split("_")[2] for i in ids["val"]} == set(cremad.CLASSES)
  assert "1090_IEO_HAP_LO" not in ids["train"] + ids["val"]
  assert "1091_DFA_SAD_HI" not in ids["train"] + ids["val"]


def _direct_dft_column(x, j, pad_mode, n_fft=512, hop=353, n=66150):
  """log(|X| + 1e-7) of STFT frame j by an explicit DFT (independent)."""
  y = np.clip(np.tile(x, 3)[:n], -1.0, 1.0)
  half = n_fft // 2
  if pad_mode == "constant":
    p = np.concatenate([np.zeros(half), y, np.zeros(half)])
  else:  # reflect without repeating the edge sample
    p = np.concatenate([y[1:half + 1][::-1], y, y[-half - 1:-1][::-1]])
  seg = p[j * hop:j * hop + n_fft]
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
  k = np.arange(n_fft // 2 + 1)[:, None]
  basis = np.exp(-2j * np.pi * k * np.arange(n_fft)[None, :] / n_fft)
  return np.log(np.abs(basis @ (seg * w)) + 1e-7)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_spectrogram_matches_direct_dft(fixture_dir, tmp_path, pad_mode):
  data_dir, _ = fixture_dir
  ds = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                              stft_pad_mode=pad_mode))
  ids = _split_ids(data_dir)
  root = os.path.join(data_dir, "cremad")
  checked, clipped = 0, 0
  for s in ("train", "val", "test"):
    for i, clip in enumerate(ids[s]):
      sr, x = _read_fixture_wav(os.path.join(root, "AudioWAV", clip + ".wav"))
      if sr != SR:
        continue
      clipped += int(np.abs(x).max() > 1.0)
      spec = ds.splits[s].inputs["audio"][i]
      for j in (0, 1, 100, 187):
        np.testing.assert_allclose(spec[:, j, 0],
                                   _direct_dft_column(x, j, pad_mode),
                                   rtol=1e-5, atol=2e-4)
      checked += 1
  assert checked == 15
  # One float clip peaks above 1 and was clipped before the STFT.
  assert clipped == 1


def test_pad_modes_differ_only_at_the_edges(fixture_dir, tmp_path):
  data_dir, _ = fixture_dir
  a = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand"))
  b = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                             stft_pad_mode="reflect"))
  x, y = a.splits["train"].inputs["audio"][0], b.splits["train"].inputs[
      "audio"][0]
  np.testing.assert_array_equal(x[:, 2:-2], y[:, 2:-2])
  assert np.abs(x[:, 0] - y[:, 0]).max() > 1e-3


def test_resampled_clip(fixture_dir, dataset):
  data_dir, info = fixture_dir
  ids = _split_ids(data_dir)
  i = next(i for i, c in enumerate(ids["test"]) if info[c]["sr"] == 16000)
  root = os.path.join(data_dir, "cremad")
  _, x = _read_fixture_wav(os.path.join(root, "AudioWAV",
                                        ids["test"][i] + ".wav"))
  x22 = scipy.signal.resample_poly(x, 441, 320)   # 16000 -> 22050
  got = dataset.splits["test"].inputs["audio"][i]
  np.testing.assert_allclose(got[:, 50, 0], _direct_dft_column(
      x22, 50, "constant"), rtol=1e-5, atol=2e-4)


def test_frame_choice_and_normalisation(dataset, fixture_dir):
  data_dir, info = fixture_dir
  ids = _split_ids(data_dir)
  mean = np.array(media.IMAGENET_MEAN, np.float32)
  std = np.array(media.IMAGENET_STD, np.float32)
  seen = set()
  for s, split in dataset.splits.items():
    raw = split.inputs["visual"].raw
    assert raw.dtype == np.uint8
    for i, clip in enumerate(ids[s]):
      n = info[clip]["n_frames"]
      level = 20 + 40 * OFFICIAL_INDEX[n]
      assert abs(float(raw[i].mean()) - level) < 1.5, (clip, n)
      seen.add(OFFICIAL_INDEX[n])
    got = split.batch(np.arange(len(split)))["visual"]
    want = (raw[:].astype(np.float32) / 255.0 - mean) / std
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert seen == {0, 1, 2, 3}


def test_cache_equals_on_demand_and_is_reused(fixture_dir, tmp_path):
  data_dir, _ = fixture_dir
  cached = data.load_dataset(_cfg(data_dir, tmp_path))
  lazy = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand"))
  builds = os.listdir(os.path.join(tmp_path, "cremad"))
  for s in cached.splits:
    idx = np.arange(len(cached.splits[s]))
    a, b = cached.splits[s].batch(idx), lazy.splits[s].batch(idx)
    for m in ("audio", "visual", "label"):
      np.testing.assert_array_equal(a[m], b[m])
    assert isinstance(cached.splits[s].inputs["audio"], np.memmap)
  assert cached.fingerprint == lazy.fingerprint
  again = data.load_dataset(_cfg(data_dir, tmp_path))
  assert os.listdir(os.path.join(tmp_path, "cremad")) == builds
  assert again.fingerprint == cached.fingerprint
  other = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                                 val_seed=1))
  assert other.fingerprint != cached.fingerprint


def test_full_size_frame_and_max_examples(fixture_dir, tmp_path):
  data_dir, _ = fixture_dir
  ds = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                              image_size=224, max_examples_per_split=2))
  assert {s: len(v) for s, v in ds.splits.items()} == {
      "train": 2, "val": 2, "test": 2}
  assert ds.splits["test"].batch(np.arange(1))["visual"].shape == (
      1, 1, 224, 224, 3)


def test_bad_input_raises_data_error(fixture_dir, tmp_path):
  data_dir, _ = fixture_dir
  with pytest.raises(errors.DataError, match="CREMA-D folder"):
    data.load_dataset(_cfg(str(tmp_path), tmp_path))
  bad = tmp_path / "bad"
  (bad / "cremad" / "AudioWAV").mkdir(parents=True)
  (bad / "cremad" / "Image-01-FPS").mkdir()
  with pytest.raises(errors.DataError, match=r"train\.csv is missing"):
    data.load_dataset(_cfg(str(bad), tmp_path))
  (bad / "cremad" / "train.csv").write_text("1001_DFA_ANG_XX,ANG\n"
                                            "1002_DFA_XYZ_XX,XYZ\n")
  with pytest.raises(errors.DataError, match="line 2: unknown label 'XYZ'"):
    data.load_dataset(_cfg(str(bad), tmp_path))
  with pytest.raises(errors.DataError, match="audio folder"):
    data.load_dataset(_cfg(data_dir, tmp_path, audio_dir="NoSuchDir"))
  with pytest.raises(errors.ConfigError, match="stft_pad_mode"):
    data.load_dataset(_cfg(data_dir, tmp_path, stft_pad_mode="edge"))
  with pytest.raises(errors.ConfigError, match="val_fraction"):
    data.load_dataset(_cfg(data_dir, tmp_path, val_fraction=0.0))


def test_empty_frame_folder(fixture_dir, tmp_path):
  data_dir, _ = fixture_dir
  root = os.path.join(data_dir, "cremad")
  clip = "1099_IEO_NEU_XX"
  _write_wav(os.path.join(root, "AudioWAV", clip + ".wav"),
             _tone(1.4, 500, SR), SR)
  os.makedirs(os.path.join(root, "Image-01-FPS", clip))
  with open(os.path.join(root, "test.csv"), "a") as f:
    f.write(f"{clip},NEU\n")
  try:
    with pytest.raises(errors.DataError, match="skip_empty_frame_folders"):
      data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand"))
    ds = data.load_dataset(_cfg(data_dir, tmp_path, storage="on_demand",
                                skip_empty_frame_folders=True))
    assert len(ds.splits["test"]) == 4
  finally:
    with open(os.path.join(root, "test.csv")) as f:
      lines = [ln for ln in f if not ln.startswith(clip)]
    with open(os.path.join(root, "test.csv"), "w") as f:
      f.writelines(lines)


def test_config_presets_build_and_validate():
  module = fx.check_presets("cremad", cremad.MODALITIES, ("paper,joint",))
  paper = module.get_config()
  assert paper.model.encoders.audio.kind == "resnet18"
  assert paper.student.batch_size == 16 and paper.student.epochs == 300
  assert schedule.gating_taus(paper) == (151,)
  with pytest.raises(ValueError, match="unknown preset"):
    module.get_config("fast")


def test_smoke_model_accepts_fixture_inputs(dataset):
  c = fx.config_module("cremad").get_config("smoke")
  out = fx.abstract_outputs(c, dataset)
  assert out.logits.shape == (2, 6)
  assert set(out.features) == {"audio", "visual"}
