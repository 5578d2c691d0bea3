"""Small in-memory datasets and configs for pipeline tests (not real data)."""

import importlib.util
import os

import jax
import ml_collections
import numpy as np

from g2d_jax.data import base
from g2d_jax.pipeline import config as config_lib


def tiny_dataset(n_train=128, n_val=64, n_test=64, seed=0, label_offset=0,
                 image_map=False):
  """Two modalities (an 8x8 'audio' map, a 6-d 'image' vector), 4 classes.

  Made up for tests; `label_offset` changes the labels (a different dataset);
  `image_map` makes the image a 6x6 map (for two conv encoders, `CNN_IMAGE`).
  """
  rng = np.random.default_rng(seed)
  splits = {}
  for s, n in [("train", n_train), ("val", n_val), ("test", n_test)]:
    y = ((rng.integers(0, 4, n) + label_offset) % 4).astype(np.int32)
    a = (rng.normal(size=(n, 8, 8, 1)) + 0.5 * y[:, None, None, None])
    b = rng.normal(size=(n, 6)) + 0.3 * y[:, None]
    if image_map:
      b = (rng.normal(size=(n, 6, 6, 1)) + 0.3 * y[:, None, None, None])
    splits[s] = base.Split(inputs={"audio": a.astype(np.float32),
                                   "image": b.astype(np.float32)},
                           labels=y, scales={"audio": 1.0, "image": 1.0})
  return base.MultimodalDataset(
      "tiny_test_data", ("audio", "image"), splits, 4, "classification",
      base.make_fingerprint("tiny_test_data", {"seed": seed}, splits,
                            "classification"))


# tiny_config override: a conv image encoder (with tiny_dataset(image_map)).
CNN_IMAGE = {"model.encoders.image": dict(kind="cnn", channels=(4, 8),
                                          downsample="stride")}


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.model.encoders = ml_collections.ConfigDict(dict(
      audio=dict(kind="cnn", channels=(4, 8), downsample="stride"),
      image=dict(kind="mlp", hidden_dims=(16,))))
  c.teacher = config_lib.train_config(
      2, 32, config_lib.optimizer_config(0.05, decay_epochs=()))
  c.student = config_lib.train_config(
      3, 32, config_lib.optimizer_config(0.05, decay_epochs=(2,)))
  c.gating.taus = (1,)
  c.eval.batch_size = 32
  c.log_every_steps = 2
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  c.lock()
  return c


def student(config, dataset, mesh):
  """(model, initial state) of the student `config` builds."""
  from g2d_jax.pipeline import student as student_lib  # pylint: disable=g-import-not-at-top
  s = student_lib.build_student(config, dataset, mesh)
  return s.model, s.state


def softmax(z):
  """NumPy softmax over the last axis (for transcriptions of released
  formulas)."""
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def first_batch(dataset, batch_size=32):
  """The first training batch of epoch 0 (seed 0)."""
  from g2d_jax.pipeline import loader  # pylint: disable=g-import-not-at-top
  return next(loader.train_batches(dataset.splits["train"], batch_size,
                                   seed=0, epoch=0))


def one_step(config, dataset, epoch):
  """One training step of a fresh student on `first_batch`: (model,
  params before, BatchNorm stats before, the batch, params after, the
  step's scalar metrics as floats)."""
  from g2d_jax.pipeline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import student as student_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(config, dataset, mesh)
  params0 = jax.device_get(s.state.params)
  bs0 = jax.device_get(s.state.batch_stats)
  batch = first_batch(dataset)
  batch["gate"] = s.gate.for_batch(batch, epoch)
  new, metrics = s.step(s.state, mesh_lib.shard_batch(batch, mesh),
                        np.int32(epoch), jax.random.key(0))
  return s.model, params0, bs0, batch, jax.device_get(new.params), {
      k: float(v) for k, v in metrics["scalars"].items()}


def assert_resume_exact(config, dataset, tmp_path, stops):
  """Trains `config` straight, and again killed after each of `stops` steps
  (counted from each restart) and resumed; both end with identical
  weights."""
  import pytest  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import student as student_lib  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import trainer  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  student_lib.train_student(config, dataset, straight, mesh)
  for stop in stops:
    with pytest.raises(trainer.Interrupted):
      student_lib.train_student(config, dataset, resumed, mesh,
                                stop_after_steps=stop)
  student_lib.train_student(config, dataset, resumed, mesh)
  wa = jax.device_get(student_lib.load_student(config, dataset, straight,
                                               mesh)[1])
  wb = jax.device_get(student_lib.load_student(config, dataset, resumed,
                                               mesh)[1])
  for a, b in zip(jax.tree.leaves(wa), jax.tree.leaves(wb), strict=True):
    np.testing.assert_array_equal(a, b)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_module(name):
  """configs/<name>.py, imported from its file."""
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def assert_sgd_step(params0, grads, params1, lr):
  """Every leaf of `params1` is `params0 - lr * grads` (plain SGD), named by
  its path on failure."""
  for (path, p0), g, got in zip(
      jax.tree_util.tree_flatten_with_path(params0)[0],
      jax.tree.leaves(grads), jax.tree.leaves(params1)):
    np.testing.assert_allclose(got, p0 - lr * np.asarray(g), rtol=1e-5,
                               atol=1e-6, err_msg=str(path))


def experiment_module(name):
  """experiments/<name>.py, imported once per process (the scripts define
  absl flags, and `teacher_strength` imports `leaderboard`)."""
  import sys  # pylint: disable=g-import-not-at-top
  folder = os.path.join(ROOT, "experiments")
  if folder not in sys.path:
    sys.path.insert(0, folder)
  return importlib.import_module(name)


def abstract_outputs(config, dataset, n=2):
  """Shapes of the config's student outputs on n of the dataset's samples
  (nothing is computed)."""
  from g2d_jax.pipeline import build  # pylint: disable=g-import-not-at-top
  model = build.student_model(config, dataset)
  x = build.example_inputs(dataset.splits["train"], n)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))
  return jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)


def data_config(name, data_dir, cache_dir=None, **overrides):
  """The default data config of `name` reading `data_dir` (and building into
  `cache_dir`, with two threads), with `overrides`."""
  from g2d_jax import data  # pylint: disable=g-import-not-at-top
  cfg = data.default_data_config(name)
  cfg.data_dir = str(data_dir)
  if cache_dir is not None:
    cfg.cache_dir = str(cache_dir)
    cfg.build_threads = 2
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def check_presets(name, modalities, extra=()):
  """Every preset of configs/<name>.py (and `extra` ones) names the dataset
  and validates for 4 devices; returns the config module."""
  module = config_module(name)
  for preset in module.PRESETS + tuple(extra):
    c = module.get_config(preset)
    assert c.data.name == name
    config_lib.validate(c, 4, modalities)
  return module


def write_pickle(path, obj, protocol=4):
  """Pickles `obj` to `path`, creating its folder (feature-pickle fixtures)."""
  import pickle  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(obj, f, protocol=protocol)
