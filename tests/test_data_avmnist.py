"""Tests of the AV-MNIST build: recipe, determinism, cache, bad inputs.

Builds are small (max_examples_per_split) and share a per-module cache.
"""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import scipy.io.wavfile
import scipy.signal

from g2d_jax import errors
from g2d_jax.data import audio
from g2d_jax.data import avmnist
from g2d_jax.data import mnist
from tests.conftest import DATA_DIR

SMALL = 200


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("avmnist_cache"))


def _cfg(cache_root, n=SMALL, **kw):
  cfg = avmnist.default_config()
  cfg.data_dir = DATA_DIR
  cfg.cache_dir = cache_root
  cfg.max_examples_per_split = n
  for k, v in kw.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def small(cache_root):
  return avmnist.load(_cfg(cache_root))


@pytest.fixture(scope="module")
def mnist_data():
  return mnist.load_mnist(os.path.join(DATA_DIR, "mnist"))


def test_small_build_layout(small, mnist_data):
  assert small.name == "avmnist" and small.modalities == ("audio", "image")
  assert small.num_classes == 10 and small.task == "classification"
  for s in ("train", "val", "test"):
    sp = small.splits[s]
    assert len(sp) == SMALL
    assert isinstance(sp.inputs["audio"], np.memmap)
    assert sp.inputs["audio"].shape == (SMALL, 112, 112, 1)
    assert sp.inputs["image"].shape == (SMALL, 28, 28, 1)
    assert sp.inputs["audio"].dtype == sp.inputs["image"].dtype == np.uint8
    assert sp.scales == {"audio": 1 / 255, "image": 1 / 255}
  np.testing.assert_array_equal(small.splits["train"].labels,
                                mnist_data["train"][1][:SMALL])
  np.testing.assert_array_equal(small.splits["val"].labels,
                                mnist_data["train"][1][55000:55000 + SMALL])
  np.testing.assert_array_equal(small.splits["test"].labels,
                                mnist_data["test"][1][:SMALL])
  fp = small.fingerprint
  assert json.loads(json.dumps(fp)) == fp
  assert fp["split_sizes"] == {"train": SMALL, "val": SMALL, "test": SMALL}
  assert fp["settings"]["snr_db"] == avmnist.default_config().snr_db
  assert fp["sources"]["fsdd"] == (
      "ddb17656a0bca4c5ddace082be188ca630516dc2ef1110afe3c4e9cc71173de4")


def test_full_split_sizes_from_metadata(mnist_data):
  ranges = avmnist._split_ranges(avmnist.default_config())
  assert ranges == {"train": ("train", 0, 55000),
                    "val": ("train", 55000, 5000),
                    "test": ("test", 0, 10000)}
  assert len(mnist_data["train"][1]) == 60000
  assert len(mnist_data["test"][1]) == 10000


def test_rows_equal_first_rows_of_larger_build(small, cache_root):
  # A second, larger build of the same recipe (another cache directory)
  # reproduces the small build's bytes index by index.
  big = avmnist.load(_cfg(cache_root, n=SMALL + 150))
  assert big.fingerprint["build_key"] != small.fingerprint["build_key"]
  for s in ("train", "val", "test"):
    for m in ("audio", "image"):
      np.testing.assert_array_equal(big.splits[s].inputs[m][:SMALL],
                                    small.splits[s].inputs[m])
    np.testing.assert_array_equal(big.splits[s].labels[:SMALL],
                                  small.splits[s].labels)


def test_image_is_pca_reconstruction(small, mnist_data):
  cfg = avmnist.default_config()
  k = cfg.pca_components or 3
  x = mnist_data["train"][0][:55000].reshape(55000, -1).astype(np.float32)
  mean = x.mean(0, dtype=np.float64)
  # float32 covariance: a different computation from the library's float64
  # chunked one, accurate enough for the well-separated top components.
  c = x - mean.astype(np.float32)
  evals, evecs = np.linalg.eigh((c.T @ c).astype(np.float64))
  v = evecs[:, np.argsort(evals)[::-1][:k]]
  xt = mnist_data["test"][0][:SMALL].reshape(SMALL, -1) - mean
  ref = np.clip(np.rint(mean + xt @ v @ v.T), 0, 255)
  got = small.splits["test"].inputs["image"].reshape(SMALL, -1)
  assert np.abs(got.astype(int) - ref).max() <= 1
  assert np.mean(got == ref) > 0.999


def test_audio_matches_time_domain_recipe(small, mnist_data):
  """Recomputes a few test spectrograms from the WAVs, in the time domain."""
  cfg = avmnist.default_config()
  rec_dir = os.path.join(DATA_DIR, "fsdd", "recordings")
  noise_dir = os.path.join(DATA_DIR, "speech_commands_noise")
  names = sorted(f for f in os.listdir(rec_dir) if f.endswith(".wav"))
  # Default pools (take split): test = every speaker's test_takes.
  assert cfg.audio_split == "take"
  pool = [f for f in names if int(f[:-4].split("_")[2]) in cfg.test_takes]
  n_fft, hop = cfg.n_fft, cfg.hop_length
  length = n_fft + 111 * hop
  win = scipy.signal.get_window("hann", n_fft)
  target = 10 ** (cfg.speech_level_dbfs / 20)
  noises = {}
  for f in cfg.noise_files:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)
      sr, x = scipy.io.wavfile.read(os.path.join(noise_dir, f + ".wav"))
    assert sr == 16000
    noises[f] = scipy.signal.resample_poly(x / 32768.0, 1, 2)
  for i in (0, 3, 77, 199):
    label = int(mnist_data["test"][1][i])
    members = [f for f in pool if f.startswith(f"{label}_")]
    h = [int(avmnist.counter_hash(cfg.seed, 2, s, np.array([i]))[0])
         for s in range(3)]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)
      _, speech = scipy.io.wavfile.read(
          os.path.join(rec_dir, members[h[0] % len(members)]))
    speech = speech / 32768.0
    if len(speech) > length:
      start = (len(speech) - length) // 2
      speech = speech[start:start + length]
    speech = speech * target / np.sqrt(np.mean(speech**2))
    placed = np.zeros(length)
    start = (length - len(speech)) // 2
    placed[start:start + len(speech)] = speech
    noise = noises[cfg.noise_files[h[1] % len(cfg.noise_files)]]
    offset = (h[2] % ((len(noise) - length) // hop + 1)) * hop
    seg = noise[offset:offset + length]
    seg_rms = np.sqrt(np.mean(seg**2))
    mix = placed + seg * (target / seg_rms) * 10 ** (-cfg.snr_db / 20)
    _, _, spec = scipy.signal.spectrogram(
        mix, window="hann", nperseg=n_fft, noverlap=n_fft - hop,
        mode="complex", scaling="spectrum", detrend=False)
    mag = np.abs(spec[:112, :112]) * win.sum()
    db = 10 * np.log10(mag**2 / (win.sum() / 2) ** 2 + 1e-10)
    ref = np.clip(np.rint((db - cfg.spec_db_min) * 255
                          / (cfg.spec_db_max - cfg.spec_db_min)), 0, 255)
    got = small.splits["test"].inputs["audio"][i, :, :, 0].astype(int)
    assert np.abs(got - ref).max() <= 1, i
    assert np.mean(got == ref) > 0.99, i


def test_recordings_match_label_digit_and_pools_are_disjoint(mnist_data):
  cfg = avmnist.default_config()
  cfg.audio_split = "speaker"
  recs = audio.list_fsdd(os.path.join(DATA_DIR, "fsdd", "recordings"))
  pools = avmnist.speaker_pools(recs, cfg)
  speakers = {s: {recs[i].speaker for i in p} for s, p in pools.items()}
  takes = {s: {recs[i].take for i in p} for s, p in pools.items()}
  assert speakers["train"] == {"george", "jackson", "lucas", "nicolas"}
  assert speakers["val"] == speakers["test"] == {"theo", "yweweler"}
  assert takes["val"] == set(range(5, 10))
  assert takes["test"] == set(range(5)) | set(range(10, 50))
  assert len(pools["train"]) == 2000 and len(pools["val"]) == 100
  assert len(pools["test"]) == 900
  names = {s: {recs[i].name for i in p} for s, p in pools.items()}
  assert not names["train"] & names["val"]
  assert not names["train"] & names["test"]
  assert not names["val"] & names["test"]
  labels = mnist_data["train"][1][:55000].astype(np.int32)
  idx = avmnist.assign_recordings(labels, pools["train"], recs, cfg.seed, 0)
  assert np.all(np.array([recs[i].digit for i in idx]) == labels)
  assert {recs[i].speaker for i in idx} == speakers["train"]
  # Every recording of the pool is used; choice per index is deterministic.
  assert len(np.unique(idx)) == len(pools["train"])
  sub = avmnist.assign_recordings(labels[100:300], pools["train"], recs,
                                  cfg.seed, 0, start=100)
  np.testing.assert_array_equal(sub, idx[100:300])


def test_three_way_speaker_split():
  cfg = avmnist.default_config()
  cfg.audio_split = "speaker"
  cfg.train_speakers = ("george", "jackson", "lucas", "nicolas")
  cfg.val_speakers = ("theo",)
  cfg.test_speakers = ("yweweler",)
  recs = audio.list_fsdd(os.path.join(DATA_DIR, "fsdd", "recordings"))
  pools = avmnist.speaker_pools(recs, cfg)
  assert {recs[i].speaker for i in pools["val"]} == {"theo"}
  assert {recs[i].speaker for i in pools["test"]} == {"yweweler"}
  assert len(pools["val"]) == len(pools["test"]) == 500


def test_take_split_pools():
  cfg = avmnist.default_config()
  cfg.audio_split = "take"
  recs = audio.list_fsdd(os.path.join(DATA_DIR, "fsdd", "recordings"))
  pools = avmnist.speaker_pools(recs, cfg)
  takes = {s: {recs[i].take for i in p} for s, p in pools.items()}
  assert takes["test"] == set(range(5))
  assert takes["val"] == set(range(5, 10))
  assert takes["train"] == set(range(10, 50))
  assert len(pools["train"]) == 2400 and len(pools["test"]) == 300
  assert cfg.audio_split == avmnist.default_config().audio_split
  assert sum(len(p) for p in pools.values()) == 3000


def test_counter_hash_streams_differ_and_are_stable():
  idx = np.arange(1000)
  a = avmnist.counter_hash(0, 0, 0, idx)
  assert a.dtype == np.uint64 and len(np.unique(a)) == 1000
  assert not np.array_equal(a, avmnist.counter_hash(0, 0, 1, idx))
  assert not np.array_equal(a, avmnist.counter_hash(0, 1, 0, idx))
  assert not np.array_equal(a, avmnist.counter_hash(1, 0, 0, idx))
  np.testing.assert_array_equal(a[500:],
                                avmnist.counter_hash(0, 0, 0, idx[500:]))
  # Roughly uniform: each of 10 buckets gets 100 +- 40.
  counts = np.bincount((a % np.uint64(10)).astype(int))
  assert counts.min() > 60 and counts.max() < 140


def test_missing_data_dir(monkeypatch, tmp_path):
  monkeypatch.delenv("G2D_DATA_DIR", raising=False)
  monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
  cfg = _cfg(str(tmp_path), data_dir="")
  with pytest.raises(errors.DataError, match="the default location, as "
                     "G2D_DATA_DIR and config.data.data_dir are unset"):
    avmnist.load(cfg)
  with pytest.raises(errors.DataError, match="fsdd/recordings is missing"):
    (tmp_path / "d" / "mnist").mkdir(parents=True)
    avmnist.load(_cfg(str(tmp_path), data_dir=str(tmp_path / "d")))


def _fake_data_dir(tmp_path):
  """A data dir linking the real FSDD/noise and holding its own mnist/."""
  d = tmp_path / "data"
  (d / "mnist").mkdir(parents=True)
  (d / "fsdd").mkdir()
  os.symlink(os.path.join(DATA_DIR, "fsdd", "recordings"),
             d / "fsdd" / "recordings")
  os.symlink(os.path.join(DATA_DIR, "speech_commands_noise"),
             d / "speech_commands_noise")
  for stem in mnist.FILES:
    os.symlink(os.path.join(DATA_DIR, "mnist", stem + ".gz"),
               d / "mnist" / (stem + ".gz"))
  return d


def test_truncated_idx_leaves_no_build(tmp_path):
  d = _fake_data_dir(tmp_path)
  target = d / "mnist" / "train-images-idx3-ubyte.gz"
  data = open(target, "rb").read()
  os.remove(target)
  target.write_bytes(data[: len(data) // 3])
  cache_dir = tmp_path / "cache"
  with pytest.raises(errors.DataError) as e:
    avmnist.load(_cfg(str(cache_dir), n=20, data_dir=str(d)))
  msg = str(e.value)
  assert ("train-images-idx3-ubyte.gz is truncated: expected 47,040,016"
          " bytes") in msg
  assert f"python -m g2d_jax.data.download --dest {d}" in msg
  builds = [n for n in os.listdir(cache_dir / "avmnist")
            if not n.startswith(".")]
  assert builds == [] and not any(
      n.startswith(".tmp") for n in os.listdir(cache_dir / "avmnist"))


def test_interrupted_build_is_never_picked_up(tmp_path, monkeypatch):
  cfg = _cfg(str(tmp_path), n=20)

  def half_written(out_dir, *unused_args):
    np.lib.format.open_memmap(os.path.join(out_dir, "train", "image.npy"),
                              mode="w+", dtype=np.uint8, shape=(20, 28, 28, 1))
    raise KeyboardInterrupt  # killed mid-build
  monkeypatch.setattr(avmnist, "_build_images", half_written)
  with pytest.raises(KeyboardInterrupt):
    avmnist.load(cfg)
  assert [n for n in os.listdir(tmp_path / "avmnist")
          if not n.endswith(".lock")] == []


def test_final_dir_without_manifest_is_refused(small, tmp_path):
  key = small.fingerprint["build_key"]
  (tmp_path / "avmnist" / key).mkdir(parents=True)
  with pytest.raises(errors.DataError, match="has no manifest"):
    avmnist.load(_cfg(str(tmp_path)))


def test_damaged_cache_is_refused(small, cache_root, tmp_path):
  key = small.fingerprint["build_key"]
  shutil.copytree(os.path.join(cache_root, "avmnist", key),
                  tmp_path / "avmnist" / key)
  again = avmnist.load(_cfg(str(tmp_path)))
  np.testing.assert_array_equal(again.splits["val"].inputs["audio"],
                                small.splits["val"].inputs["audio"])
  labels = tmp_path / "avmnist" / key / "val" / "labels.npy"
  np.save(labels, (np.load(labels) + 1) % 10)
  with pytest.raises(errors.DataError, match="labels.npy does not match its"
                     " manifest; delete .* and run again"):
    avmnist.load(_cfg(str(tmp_path)))
  audio_file = tmp_path / "avmnist" / key / "test" / "audio.npy"
  audio_file.write_bytes(audio_file.read_bytes()[:1000])
  np.save(labels, small.splits["val"].labels)
  with pytest.raises(errors.DataError, match="is damaged"):
    avmnist.load(_cfg(str(tmp_path)))


SPEAKER = {"audio_split": "speaker"}


@pytest.mark.parametrize("overrides, match", [
    ({"val_speakers": ("george",), **SPEAKER},
     "train_speakers and val_speakers share"),
    ({"test_speakers": ("theo", "lucas"), **SPEAKER},
     "train_speakers and test_speakers share"),
    ({"test_speakers": (), **SPEAKER}, "test_speakers is empty"),
    ({"pca_energy": 1.5}, r"pca_energy=1.5 must be in \(0, 1\]"),
    ({"n_fft": 128}, "n_fft=128 gives 65 frequency bins"),
    ({"audio_split": "random"},
     "audio_split='random'; use 'speaker' or 'take'"),
    ({"snr_db": float("inf")}, "snr_db=inf must be finite"),
])
def test_bad_config(tmp_path, overrides, match):
  with pytest.raises(errors.ConfigError, match=match):
    avmnist.load(_cfg(str(tmp_path), **overrides))


def test_unknown_speaker(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"names \['bob'\], not among"):
    avmnist.load(_cfg(str(tmp_path), n=5, test_speakers=("bob",),
                      audio_split="speaker"))
  # Rejected before any build starts.
  assert not (tmp_path / "avmnist").exists()


def test_per_split_pca_with_energy_rule(cache_root, mnist_data):
  ds = avmnist.load(_cfg(cache_root, n=30, pca_fit="per_split",
                         pca_components=0))
  build_dir = os.path.join(cache_root, "avmnist", ds.fingerprint["build_key"])
  with open(os.path.join(build_dir, "manifest.json")) as f:
    manifest = json.load(f)
  # The test split gets its own PCA, fitted on all 10k test images.
  x = mnist_data["test"][0].reshape(10000, -1).astype(np.float64)
  mean = x.mean(0)
  evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
  order = np.argsort(evals)[::-1]
  ratio = np.cumsum(evals[order]) / evals.sum()
  k = int(np.sum(ratio < 0.25))
  assert manifest["image"]["test"]["components"] == k
  assert manifest["image"]["train"]["components"] == 3
  v = evecs[:, order[:k]]
  ref = np.clip(np.rint(mean + (x[:30] - mean) @ v @ v.T), 0, 255)
  got = ds.splits["test"].inputs["image"].reshape(30, -1).astype(int)
  assert np.abs(got - ref).max() <= 1
