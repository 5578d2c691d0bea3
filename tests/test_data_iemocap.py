"""Tests of the IEMOCAP reader on a small fixture in MulT's pickle layout.

The fixture pickle (written into tmp_path) holds random feature sequences of
IEMOCAP's feature sizes with MulT-style [N, 4, 2] labels; it is made up for
these tests and is not IEMOCAP data.
"""

import os

import numpy as np
import pytest

from g2d_jax import data
from g2d_jax import errors
from g2d_jax.data import iemocap
from tests import pipeline_fixtures as fx

DIMS = {"text": 300, "audio": 74, "vision": 35}
# Emotion (Neutral 0, Happy 1, Sad 2, Angry 3) of each utterance.
EMOTION = {"train": [0, 1, 2, 3, 1, 0, 2], "valid": [3, 2, 1], "test": [1, 0,
                                                                      3, 2]}


def _mult_labels(emotions):
  """MulT layout: labels[i, k] = (absent, present) one-hot for emotion k."""
  out = np.zeros((len(emotions), 4, 2), np.float32)
  out[:, :, 0] = 1.0
  for i, e in enumerate(emotions):
    out[i, e] = (0.0, 1.0)
  return out


def _split(emotions, seed, lengths=None):
  lengths = lengths or {k: 20 for k in DIMS}
  rng = np.random.default_rng(seed)
  n = len(emotions)
  out = {k: rng.normal(size=(n, lengths[k], d)).astype(np.float32)
         for k, d in DIMS.items()}
  for k in DIMS:
    out[k][:, :3] = 0.0          # front padding
  out["audio"][0, 5, 1] = -np.inf
  out["labels"] = _mult_labels(emotions)
  out["id"] = np.array([[b"Ses01F_impro01", b"F000", b"x"]] * n)
  return out


def _write(path, obj, protocol=4):
  fx.write_pickle(path, obj, protocol)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  obj = {k: _split(v, i) for i, (k, v) in enumerate(EMOTION.items())}
  _write(str(d / "iemocap" / "iemocap_data.pkl"), obj)
  unaligned = {k: _split(v, i, {"text": 20, "audio": 40, "vision": 50})
               for i, (k, v) in enumerate(EMOTION.items())}
  _write(str(d / "iemocap" / "iemocap_data_noalign.pkl"), unaligned)
  return str(d), obj, unaligned


def _cfg(data_dir, **kw):
  return fx.data_config("iemocap", data_dir, **kw)


def test_four_way_labels_and_arrays_as_stored(fixture):
  data_dir, obj, _ = fixture
  ds = data.load_dataset(_cfg(data_dir))
  assert ds.name == "iemocap" and ds.num_classes == 4
  assert ds.modalities == ("audio", "visual", "text")
  assert {s: len(v) for s, v in ds.splits.items()} == {
      "train": 7, "val": 3, "test": 4}
  for s, key in (("train", "train"), ("val", "valid"), ("test", "test")):
    split = ds.splits[s]
    np.testing.assert_array_equal(split.labels, EMOTION[key])
    assert split.labels.dtype == np.int32
    for m, pkey in (("audio", "audio"), ("visual", "vision"),
                    ("text", "text")):
      want = np.where(np.isfinite(obj[key][pkey]), obj[key][pkey], 0.0)
      np.testing.assert_array_equal(split.inputs[m], want)
      assert split.inputs[m].shape == (len(split), 20, DIMS[pkey])
      assert split.inputs[m].dtype == np.float32


def test_binary_emotion_mode(fixture):
  data_dir, _, _ = fixture
  ds = data.load_dataset(_cfg(data_dir, label_mode="sad"))
  assert ds.num_classes == 2
  np.testing.assert_array_equal(ds.splits["train"].labels,
                                [0, 0, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(ds.splits["test"].labels, [0, 0, 0, 1])


def test_ambiguous_labels(fixture, tmp_path):
  _, obj, _ = fixture
  bad = {k: dict(v) for k, v in obj.items()}
  labels = bad["train"]["labels"].copy()
  labels[1, 3] = (0.0, 1.0)          # Happy and Angry
  labels[4, 1] = (1.0, 0.0)          # no emotion
  bad["train"]["labels"] = labels
  _write(str(tmp_path / "iemocap" / "iemocap_data.pkl"), bad)
  with pytest.raises(errors.DataError,
                     match="1 utterances have no present emotion and 1"
                     " several.*drop_ambiguous"):
    data.load_dataset(_cfg(str(tmp_path)))
  ds = data.load_dataset(_cfg(str(tmp_path), drop_ambiguous=True))
  np.testing.assert_array_equal(ds.splits["train"].labels, [0, 2, 3, 0, 2])
  np.testing.assert_array_equal(
      ds.splits["train"].inputs["text"][1], bad["train"]["text"][2])


def test_unaligned_file_with_per_modality_lengths(fixture):
  data_dir, _, unaligned = fixture
  path = os.path.join("iemocap", "iemocap_data_noalign.pkl")
  with pytest.raises(errors.DataError, match="align='text' needs equal"):
    data.load_dataset(_cfg(data_dir, path=path, align="text"))
  ds = data.load_dataset(_cfg(data_dir, path=path, seq_len_audio=40,
                              seq_len_visual=50))
  assert ds.splits["test"].inputs["audio"].shape == (4, 40, 74)
  assert ds.splits["test"].inputs["visual"].shape == (4, 50, 35)
  assert ds.splits["test"].inputs["text"].shape == (4, 20, 300)
  # A common shorter length keeps each sequence's last steps ("none").
  short = data.load_dataset(_cfg(data_dir, path=path, seq_len=10))
  np.testing.assert_array_equal(short.splits["val"].inputs["visual"][2],
                                unaligned["valid"]["vision"][2][-10:])
  # "per_modality" strips each modality's own front padding (3 steps).
  per = data.load_dataset(_cfg(data_dir, path=path, align="per_modality",
                               pad_side="back", seq_len=45))
  v = per.splits["val"].inputs["visual"][0]
  np.testing.assert_array_equal(v, unaligned["valid"]["vision"][0][3:48])
  a = per.splits["val"].inputs["audio"][0]
  want = unaligned["valid"]["audio"][0][3:]
  np.testing.assert_array_equal(a[:37], np.where(np.isfinite(want), want, 0))
  assert a[2, 1] == 0.0              # the stored -inf, now 0
  assert np.all(a[37:] == 0.0)


def test_integer_labels(fixture, tmp_path):
  _, obj, _ = fixture
  ints = {k: dict(v) for k, v in obj.items()}
  for k in ints:
    ints[k]["labels"] = np.array(EMOTION[k])[:, None]
  _write(str(tmp_path / "iemocap" / "iemocap_data.pkl"), ints)
  ds = data.load_dataset(_cfg(str(tmp_path)))
  np.testing.assert_array_equal(ds.splits["val"].labels, EMOTION["valid"])
  angry = data.load_dataset(_cfg(str(tmp_path), label_mode="angry"))
  np.testing.assert_array_equal(angry.splits["val"].labels, [1, 0, 0])
  with pytest.raises(errors.DataError, match="labels out of range"):
    data.load_dataset(_cfg(str(tmp_path), num_classes=3))


def test_bad_files_raise_data_error(fixture, tmp_path):
  data_dir, obj, _ = fixture
  with pytest.raises(errors.DataError, match="iemocap_data.pkl is missing"):
    data.load_dataset(_cfg(str(tmp_path)))
  bad = {k: dict(v) for k, v in obj.items()}
  bad["test"]["labels"] = np.zeros((4, 3, 2))
  _write(str(tmp_path / "iemocap" / "iemocap_data.pkl"), bad)
  with pytest.raises(errors.DataError,
                     match=r"test/labels has shape \(4, 3, 2\)"):
    data.load_dataset(_cfg(str(tmp_path)))
  bad["test"] = dict(obj["test"], text=obj["test"]["text"][0])
  _write(str(tmp_path / "iemocap" / "iemocap_data.pkl"), bad)
  with pytest.raises(errors.DataError, match=r"test/text has shape \(20,"):
    data.load_dataset(_cfg(str(tmp_path)))
  with pytest.raises(errors.ConfigError, match="label_mode"):
    data.load_dataset(_cfg(data_dir, label_mode="fear"))


def test_config_presets_build_and_validate():
  module = fx.check_presets("iemocap", iemocap.MODALITIES, ("paper,g2d",))
  paper = module.get_config()
  assert paper.model.encoders.text.hidden_dim == 768
  assert paper.model.encoders.audio.num_layers == 4
  assert paper.model.encoders.visual.num_heads == 8


def test_small_model_accepts_fixture_inputs(fixture):
  data_dir, _, _ = fixture
  ds = data.load_dataset(_cfg(data_dir))
  c = fx.config_module("iemocap").get_config("small")
  out = fx.abstract_outputs(c, ds)
  assert out.logits.shape == (2, 4)
