"""Training batches of a split with views (`data.augment_views`): each
sample shows the view `hash(seed, epoch, i) mod K` of its epoch, samples are
shuffled exactly as without views, and teacher rows join by view."""

import numpy as np

from g2d_jax.data import base
from g2d_jax.pipeline import loader

MASK = (1 << 64) - 1


def splitmix64(x):
  """The splitmix64 finalizer on Python ints (a separate implementation)."""
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
  return x ^ (x >> 31)


def test_view_index_is_the_chained_hash():
  idx = np.array([0, 1, 2, 7, 123456, 2**40])
  for seed, epoch, k in ((0, 0, 4), (42, 3, 3), (7, 11, 5)):
    h0 = splitmix64((seed + 0x9E3779B97F4A7C15) & MASK)
    want = [splitmix64(splitmix64(h0 ^ epoch) ^ int(i)) % k for i in idx]
    np.testing.assert_array_equal(loader.view_index(seed, epoch, idx, k),
                                  want)


def test_views_spread_evenly_and_change_per_epoch():
  idx = np.arange(40000)
  v0 = loader.view_index(0, 0, idx, 4)
  assert set(np.unique(v0)) == {0, 1, 2, 3}
  counts = np.bincount(v0, minlength=4)
  assert np.all(np.abs(counts - 10000) < 300)       # about 3 sigma
  v1 = loader.view_index(0, 1, idx, 4)
  assert 0.7 < np.mean(v0 != v1) < 0.8               # 3/4 for independent


def make_split(n, k):
  """Row r holds the value r: inputs [n*k, 2], labels repeated."""
  x = np.arange(n * k, dtype=np.float32)[:, None].repeat(2, axis=1)
  return base.Split({"audio": x}, np.repeat(np.arange(n) % 3, k),
                    {"audio": 1.0}, views=k)


def test_batches_read_each_samples_view_of_the_epoch():
  n, k, seed = 50, 3, 5
  plain, views = make_split(n, 1), make_split(n, k)
  teacher = {"audio": {"logits": np.arange(n * k, dtype=np.float32)[:, None]
                       * 10}}
  for epoch in (0, 1):
    a = list(loader.train_batches(plain, 8, seed=seed, epoch=epoch))
    b = list(loader.train_batches(views, 8, seed=seed, epoch=epoch,
                                  teacher=teacher,
                                  teacher_keys=frozenset({"logits"})))
    assert len(a) == len(b) == 6                       # 50 // 8
    for x, y in zip(a, b):
      samples = x["index"]
      np.testing.assert_array_equal(y["index"] // k, samples)
      np.testing.assert_array_equal(
          y["index"] % k, loader.view_index(seed, epoch, samples, k))
      np.testing.assert_array_equal(y["inputs"]["audio"][:, 0], y["index"])
      np.testing.assert_array_equal(y["label"], samples % 3)
      np.testing.assert_array_equal(y["teacher"]["logits"]["audio"][:, 0],
                                    10 * y["index"])
  # Resuming mid-epoch is slicing: the same rows from step 2 on.
  full = list(loader.train_batches(views, 8, seed=seed, epoch=1))
  tail = list(loader.train_batches(views, 8, seed=seed, epoch=1,
                                   start_step=2))
  assert len(tail) == 4
  for x, y in zip(full[2:], tail):
    np.testing.assert_array_equal(x["index"], y["index"])


def test_one_view_rows_are_the_samples():
  s = make_split(10, 1)
  idx = np.array([3, 1, 9])
  np.testing.assert_array_equal(loader.view_rows(s, 0, 4, idx), idx)
  assert s.num_samples == 10 and len(make_split(10, 4)) == 40
