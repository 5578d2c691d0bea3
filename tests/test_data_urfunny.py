"""Tests of the UR-Funny reader on a small fixture in MultiBench's layout.

The fixture pickle (written into tmp_path) holds random feature sequences of
UR-Funny's sizes, front-padded like MultiBench's humor.pkl; it is made up for
these tests and is not UR-Funny data.
"""

import os
import pickle

import numpy as np
import pytest

from g2d_jax import schedule
from g2d_jax import data
from g2d_jax import errors
from g2d_jax.data import sequences
from g2d_jax.data import urfunny
from tests import pipeline_fixtures as fx

L = 50
DIMS = {"vision": 371, "audio": 81, "text": 300}
SIZES = {"train": 6, "valid": 3, "test": 4}


def _split(n, seed, empty_text=None):
  """Front-padded sequences; sample i has 5 + 7 i valid steps (max 50)."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((n, L, d)) for k, d in DIMS.items()}
  lengths = np.minimum(5 + 7 * np.arange(n), L)
  for i, v in enumerate(lengths):
    for k, d in DIMS.items():
      out[k][i, L - v:] = rng.normal(size=(v, d)) + 0.5
  out["audio"][0, L - 2, 3] = -np.inf              # COVAREP's -inf
  out["audio"][1, 0, 0] = 7.0      # audio before the text starts
  if empty_text is not None:
    out["text"][empty_text] = 0.0
  out["labels"] = (np.arange(n) % 2).astype(np.float64)[:, None]
  out["id"] = np.array([[f"{seed}_{i}".encode()] for i in range(n)])
  return out, lengths


def _write(path, obj, protocol=4):
  fx.write_pickle(path, obj, protocol)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  obj, lengths = {}, {}
  for k, (key, n) in enumerate(SIZES.items()):
    obj[key], lengths[key] = _split(n, k, empty_text=2 if key == "train"
                                    else None)
  _write(str(d / "urfunny" / "humor.pkl"), obj)
  return str(d), obj, lengths


def _cfg(data_dir, **kw):
  return fx.data_config("urfunny", data_dir, **kw)


def _expected(x, start, seq_len, pad_side="back"):
  """Independent reference: slice the valid steps, then pad with zeros."""
  x = np.where(np.isfinite(x), x, 0.0)
  kept = x[start:start + seq_len]
  pad = np.zeros((seq_len - len(kept), x.shape[1]))
  return np.concatenate([kept, pad] if pad_side == "back" else [pad, kept])


def test_shapes_labels_and_sizes(fixture):
  data_dir, obj, _ = fixture
  ds = data.load_dataset(_cfg(data_dir))
  assert ds.name == "urfunny" and ds.modalities == ("audio", "visual", "text")
  assert ds.num_classes == 2
  # Train sample 2 has no text and is dropped (MultiBench drop_entry).
  assert {s: len(v) for s, v in ds.splits.items()} == {
      "train": 5, "val": 3, "test": 4}
  np.testing.assert_array_equal(ds.splits["train"].labels, [0, 1, 1, 0, 1])
  np.testing.assert_array_equal(ds.splits["val"].labels, [0, 1, 0])
  for split in ds.splits.values():
    assert split.labels.dtype == np.int32
    b = split.batch(np.arange(len(split)))
    for m, key in sequences.PICKLE_KEYS.items():
      assert b[m].shape == (len(split), 50, DIMS[key])
      assert b[m].dtype == np.float32
  assert ds.fingerprint["feature_dims"] == {"audio": 81, "visual": 371,
                                            "text": 300}


@pytest.mark.parametrize("seq_len,pad_side", [(50, "back"), (8, "back"),
                                              (12, "front")])
def test_text_aligned_padding_and_truncation(fixture, seq_len, pad_side):
  data_dir, obj, lengths = fixture
  ds = data.load_dataset(_cfg(data_dir, seq_len=seq_len, pad_side=pad_side))
  kept = [0, 1, 3, 4, 5]               # train sample 2 dropped
  for j, i in enumerate(kept):
    start = L - lengths["train"][i]    # text starts here for all modalities
    for m, key in sequences.PICKLE_KEYS.items():
      want = _expected(obj["train"][key][i], start, seq_len, pad_side)
      np.testing.assert_allclose(ds.splits["train"].inputs[m][j], want,
                                 rtol=1e-6, atol=1e-6)
  # The -inf became 0; the audio value before the text start is cut off.
  assert np.isfinite(ds.splits["train"].inputs["audio"]).all()
  assert 7.0 not in ds.splits["train"].inputs["audio"][1]


def test_per_modality_and_no_alignment(fixture):
  data_dir, obj, lengths = fixture
  per = data.load_dataset(_cfg(data_dir, align="per_modality",
                               drop_empty_text=False))
  # Sample 1's audio starts at step 0 (the stray 7.0), its text later.
  np.testing.assert_allclose(per.splits["train"].inputs["audio"][1],
                             _expected(obj["train"]["audio"][1], 0, 50),
                             atol=1e-6)
  assert len(per.splits["train"]) == 6
  none = data.load_dataset(_cfg(data_dir, align="none", seq_len=20,
                                drop_empty_text=False))
  # "none" keeps the last seq_len stored steps (front padding stays).
  np.testing.assert_allclose(none.splits["test"].inputs["text"][3],
                             obj["test"]["text"][3][L - 20:], atol=1e-6)


def test_standardize_uses_train_valid_steps(fixture):
  data_dir, _, _ = fixture
  ds = data.load_dataset(_cfg(data_dir, standardize=True))
  x = ds.splits["train"].inputs["visual"]
  mask = sequences.valid_mask(x)
  steps = x[mask]
  np.testing.assert_allclose(steps.mean(axis=0), 0.0, atol=1e-5)
  np.testing.assert_allclose(steps.std(axis=0), 1.0, atol=1e-4)
  assert np.all(x[~mask] == 0.0)
  raw = data.load_dataset(_cfg(data_dir))
  np.testing.assert_array_equal(
      sequences.valid_mask(raw.splits["train"].inputs["visual"]), mask)


def test_mask_helper_and_fix_length():
  x = np.zeros((2, 5, 2))
  x[0, 3:] = 1.0
  x[1, 1:] = 2.0
  out, valid = sequences.fix_length(x, sequences.first_nonzero_step(x), 3,
                                    "back")
  np.testing.assert_array_equal(valid, [[1, 1, 0], [1, 1, 1]])
  np.testing.assert_array_equal(out[0, :, 0], [1, 1, 0])
  np.testing.assert_array_equal(sequences.valid_mask(out), valid)
  out, valid = sequences.fix_length(x, np.array([5, 1]), 3, "front")
  np.testing.assert_array_equal(valid, [[0, 0, 0], [1, 1, 1]])


def test_restricted_unpickler(fixture, tmp_path):
  data_dir, obj, _ = fixture
  # Protocol 2 (what Python 2 era pickles use) reads the same.
  _write(str(tmp_path / "urfunny" / "humor.pkl"), obj, protocol=2)
  a = data.load_dataset(_cfg(str(tmp_path)))
  b = data.load_dataset(_cfg(data_dir))
  np.testing.assert_array_equal(a.splits["val"].inputs["text"],
                                b.splits["val"].inputs["text"])

  class Evil:
    def __reduce__(self):
      return (os.getcwd, ())

  _write(str(tmp_path / "evil.pkl"), {"train": Evil()})
  with pytest.raises(errors.DataError, match="posix.getcwd is not allowed"):
    data.load_dataset(_cfg(str(tmp_path), path="evil.pkl"))


def test_bad_files_raise_data_error(fixture, tmp_path):
  data_dir, obj, _ = fixture
  with pytest.raises(errors.DataError, match="humor.pkl is missing"):
    data.load_dataset(_cfg(str(tmp_path)))

  def variant(name, edit):
    bad = {k: dict(v) for k, v in obj.items()}
    edit(bad)
    _write(str(tmp_path / name), bad)
    return _cfg(str(tmp_path), path=name)

  with pytest.raises(errors.DataError, match="no 'valid' split"):
    data.load_dataset(variant("a.pkl", lambda o: o.pop("valid")))
  with pytest.raises(errors.DataError, match="has no 'vision' array"):
    data.load_dataset(variant("b.pkl", lambda o: o["test"].pop("vision")))
  with pytest.raises(errors.DataError,
                     match=r"test/vision has shape \(4, 18550\)"):
    data.load_dataset(variant("c.pkl", lambda o: o["test"].__setitem__(
        "vision", o["test"]["vision"].reshape(4, -1))))
  with pytest.raises(errors.DataError, match="4 vision sequences but 3 audio"):
    data.load_dataset(variant("d.pkl", lambda o: o["test"].__setitem__(
        "audio", o["test"]["audio"][:3])))
  with pytest.raises(errors.DataError, match="must be 0 .* or 1"):
    data.load_dataset(variant("e.pkl", lambda o: o["valid"].__setitem__(
        "labels", o["valid"]["labels"] + 1)))
  with pytest.raises(errors.DataError, match="feature sizes"):
    data.load_dataset(variant("f.pkl", lambda o: o["test"].__setitem__(
        "text", o["test"]["text"][:, :, :100])))
  with open(tmp_path / "g.pkl", "wb") as f:
    f.write(pickle.dumps(obj)[:1000])
  with pytest.raises(errors.DataError, match="not a readable pickle"):
    data.load_dataset(_cfg(str(tmp_path), path="g.pkl"))
  with pytest.raises(errors.ConfigError, match="align"):
    data.load_dataset(_cfg(data_dir, align="middle"))


def test_config_presets_build_and_validate():
  module = fx.check_presets("urfunny", urfunny.MODALITIES, ("small,joint",))
  paper = module.get_config()
  for m in urfunny.MODALITIES:
    enc = paper.model.encoders[m]
    assert (enc.kind, enc.hidden_dim, enc.num_layers, enc.num_heads) == (
        "transformer", 768, 4, 8)
  assert schedule.gating_taus(paper) == (75, 76)


def test_small_model_accepts_fixture_inputs(fixture):
  data_dir, _, _ = fixture
  ds = data.load_dataset(_cfg(data_dir))
  c = fx.config_module("urfunny").get_config("small")
  out = fx.abstract_outputs(c, ds)
  assert out.logits.shape == (2, 2)
  assert {m: f.shape for m, f in out.features.items()} == {
      m: (2, 32) for m in urfunny.MODALITIES}
