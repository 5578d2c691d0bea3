"""Training views of clip datasets (`data.augment_views`): the crop box of
torchvision's RandomResizedCrop, views as a pure function of (seed, sample,
view), the K-view train split beside the unchanged val and test, and K = 1
exactly as before."""

import numpy as np
import pytest
from PIL import Image

from g2d_jax.data import clips
from g2d_jax.data import cremad
from g2d_jax.data import media
from g2d_jax.data import base
from g2d_jax.errors import ConfigError
from tests.test_data_cremad import _cfg
from tests.test_data_cremad import fixture_dir  # noqa: F401


def test_crop_box_full_and_fallback_by_hand():
  rng = np.random.default_rng(0)
  # Scale 1 at the image's own aspect ratio: the whole image, placed at 0.
  assert clips.resized_crop_box(rng, 24, 32, (1.0, 1.0), (4 / 3, 4 / 3)) == (
      0, 0, 24, 32)
  # 20 wide, 40 high, square crops of the full area (28 x 28) never fit:
  # after ten tries, the centre crop clamped to ratio 1 (20 x 20 at top 10).
  assert clips.resized_crop_box(rng, 40, 20, (1.0, 1.0), (1.0, 1.0)) == (
      10, 0, 20, 20)
  # Wider than the ratio range: full height, width = height * max ratio.
  assert clips.resized_crop_box(rng, 10, 100, (1.0, 1.0), (0.5, 2.0)) == (
      0, 40, 10, 20)


def test_crop_box_draws_follow_torchvision_order():
  """One try that fits: area fraction, then log aspect, then top, left,
  from one stream (torchvision's order), recomputed here by hand."""
  seed = np.random.SeedSequence([5, 3, 1])
  got = clips.resized_crop_box(np.random.default_rng(seed), 300, 400,
                               (0.5, 0.6), (0.9, 1.1))
  rng = np.random.default_rng(np.random.SeedSequence([5, 3, 1]))
  target = 120000 * rng.uniform(0.5, 0.6)
  aspect = np.exp(rng.uniform(np.log(0.9), np.log(1.1)))
  w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target /
                                                                  aspect)))
  top, left = rng.integers(0, 300 - h + 1), rng.integers(0, 400 - w + 1)
  assert got == (top, left, h, w)
  assert 0.5 * 120000 * 0.97 <= h * w <= 0.6 * 120000 * 1.03


@pytest.fixture
def frames(tmp_path):
  """Two 32 x 24 frames with a left-to-right ramp (so a flip shows)."""
  paths = []
  for k in range(2):
    x = np.tile(np.linspace(0, 250, 32, dtype=np.uint8)[None, :, None],
                (24, 1, 3))
    x[..., 1] = 40 * k
    p = str(tmp_path / f"{k}.png")
    Image.fromarray(x).save(p)
    paths.append(p)
  return tuple(paths)


def view_config(**overrides):
  cfg = cremad.default_config()
  cfg.image_size = 16
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_views_are_pure_and_differ(frames):
  cfg = view_config()
  a = clips.augmented_frames(frames, cfg, index=7, view=2)
  assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, clips.augmented_frames(frames, cfg, 7, 2))
  others = [clips.augmented_frames(frames, cfg, i, v)
            for i, v in ((7, 3), (8, 2))]
  assert all(np.abs(o.astype(int) - a).sum() > 0 for o in others)
  cfg.augment_seed = 1
  assert np.abs(clips.augmented_frames(frames, cfg, 7, 2).astype(int)
                - a).sum() > 0


def test_full_crop_without_flip_is_the_test_transform(frames):
  """Scale 1 at the frames' 4:3 ratio crops nothing: with no flip a view
  is exactly the deterministic Resize, with flip its mirror image."""
  det = media.frames_array(frames, 16)
  keep = view_config(crop_scale=(1.0, 1.0), crop_ratio=(4 / 3, 4 / 3),
                     flip_probability=0.0)
  np.testing.assert_array_equal(clips.augmented_frames(frames, keep, 0, 0),
                                det)
  keep.flip_probability = 1.0
  np.testing.assert_array_equal(clips.augmented_frames(frames, keep, 0, 0),
                                det[:, :, ::-1])


@pytest.mark.parametrize("field,value,message", [
    ("augment_views", 0, "must be >= 1"),
    ("crop_scale", (0.5, 0.2), "0 < lo <= hi <= 1"),
    ("crop_ratio", (0.0, 1.0), "0 < lo <= hi"),
    ("flip_probability", 1.5, "must be in [0, 1]"),
])
def test_bad_view_settings(field, value, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
    clips.validate_augment(view_config(**{field: value}))


# ----------------------------------------------------------------------------
# A clip dataset with views, on the CREMA-D loader's fixture.

def load(fixture_dir, tmp, **kw):  # noqa: F811
  return cremad.load(_cfg(fixture_dir[0], str(tmp), **kw))


def test_k_views_of_the_train_split_and_unchanged_val_test(
    fixture_dir, tmp_path):  # noqa: F811
  one = load(fixture_dir, tmp_path / "c1")
  three = load(fixture_dir, tmp_path / "c3", augment_views=3)
  tr1, tr3 = one.splits["train"], three.splits["train"]
  n = len(tr1)
  assert (tr1.views, tr3.views) == (1, 3)
  assert (len(tr3), tr3.num_samples) == (3 * n, n)
  np.testing.assert_array_equal(tr3.labels, np.repeat(tr1.labels, 3))
  # The audio has no augmentation: its rows repeat.
  np.testing.assert_array_equal(np.asarray(tr3.inputs["audio"]),
                                np.repeat(np.asarray(tr1.inputs["audio"]), 3,
                                          axis=0))
  # Row 3i + v of the visual input is view v of sample i.
  vis = np.asarray(tr3.inputs["visual"].raw)
  for i in (0, n - 1):
    for v in range(3):
      want = clips.augmented_frames(
          _frames_of(fixture_dir, three, i), _cfg(fixture_dir[0], "",
                                                  augment_views=3), i, v)
      np.testing.assert_array_equal(vis[3 * i + v], want)
  for s in ("val", "test"):
    assert three.splits[s].views == 1
    np.testing.assert_array_equal(np.asarray(three.splits[s].inputs["visual"]),
                                  np.asarray(one.splits[s].inputs["visual"]))
  settings = three.fingerprint["settings"]
  assert settings["augment_views"] == 3 and settings["crop_scale"] == [0.08,
                                                                       1.0]


def _frames_of(fixture_dir, ds, i):  # noqa: F811
  """The chosen frame paths of training sample i (by the loader's list)."""
  cfg = _cfg(fixture_dir[0], "", augment_views=3)
  samples, _ = cremad.list_samples(cfg)
  labels = np.array([s.label for s in samples["train"]])
  tr, _ = base.carve_validation(labels, cfg.val_fraction, cfg.val_seed)
  return samples["train"][tr[i]].frames


def test_one_view_is_todays_build(fixture_dir, tmp_path):  # noqa: F811
  """K = 1 leaves the view fields out of the build settings, so the cache
  key, the fingerprint and every value are those of a config without
  them."""
  cfg = _cfg(fixture_dir[0], str(tmp_path))
  plain = _cfg(fixture_dir[0], str(tmp_path))
  for f in clips.AUGMENT_FIELDS:
    del plain[f]
  a, b = cremad.load(cfg), cremad.load(plain)
  assert a.fingerprint == b.fingerprint
  assert not set(clips.AUGMENT_FIELDS) & set(a.fingerprint["settings"])
  assert a.splits["train"].views == 1
  np.testing.assert_array_equal(np.asarray(a.splits["train"].inputs["visual"]),
                                np.asarray(b.splits["train"].inputs["visual"]))

