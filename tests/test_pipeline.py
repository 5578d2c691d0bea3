"""Pipeline stages end to end on a tiny in-memory dataset, on 4 fake devices:
teacher cache equality across device counts, refusal of a mismatched cache,
and resume-equals-uninterrupted."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from g2d_jax import calibration
from g2d_jax.errors import CacheMismatchError
from g2d_jax.pipeline import evaluate
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import logs
from g2d_jax.pipeline import precompute
from g2d_jax.pipeline import student
from g2d_jax.pipeline import teachers
from g2d_jax.pipeline import trainer
from tests import pipeline_fixtures as fx

def mesh4():
  return mesh_lib.data_mesh(jax.devices()[:4])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Teachers trained once (4 devices) and their cache; shared by the tests."""
  workdir = str(tmp_path_factory.mktemp("run"))
  ds, cfg = fx.tiny_dataset(), fx.tiny_config()
  teachers.train_teachers(cfg, ds, workdir, mesh4())
  precompute.run(cfg, ds, workdir, mesh4())
  return workdir, ds, cfg


def copy_teachers(src, dst):
  shutil.copytree(os.path.join(src, "teachers"), os.path.join(dst, "teachers"))


def test_teacher_cache_on_four_devices_equals_one_device(trained, tmp_path):
  workdir, ds, cfg = trained
  assert len(jax.devices()) == 4
  one = str(tmp_path)
  copy_teachers(workdir, one)
  manifest = precompute.run(cfg, ds, one, mesh_lib.data_mesh(jax.devices()[:1]))
  assert manifest["devices"] == 1
  four = precompute.load_cache(workdir, ds, None)
  single = precompute.load_cache(one, ds, None)
  for split, n in (("train", 128), ("val", 64), ("test", 64)):
    for m, dim in (("audio", 8), ("image", 16)):
      assert four[split][m]["features"].shape == (n, dim)
      assert four[split][m]["logits"].shape == (n, 4)
      for key in ("features", "logits"):
        np.testing.assert_allclose(four[split][m][key], single[split][m][key],
                                   rtol=1e-6, atol=1e-6)


def test_cache_rows_are_the_teacher_outputs_by_index(trained):
  workdir, ds, cfg = trained
  cache = precompute.load_cache(workdir, ds, None)
  model, weights = teachers.load_teacher(cfg, ds, workdir, "audio", mesh4())
  idx = np.array([5, 0, 37, 63])
  x = ds.splits["val"].batch(idx)["audio"]
  out = model.apply({"params": weights["params"],
                     "batch_stats": weights["batch_stats"]},
                    {"audio": x}, train=False)
  np.testing.assert_allclose(cache["val"]["audio"]["logits"][idx],
                             out.logits, rtol=1e-5, atol=1e-5)


def test_mismatched_cache_is_refused(trained, tmp_path):
  workdir, ds, cfg = trained
  other_data = fx.tiny_dataset(label_offset=1)
  with pytest.raises(CacheMismatchError, match="'data' differs"):
    precompute.load_cache(workdir, other_data, None)
  digests = teachers.teacher_digests(cfg, ds, workdir)
  with pytest.raises(CacheMismatchError, match="'teachers' differs"):
    precompute.load_cache(workdir, ds, dict(digests, audio="0" * 64))
  precompute.load_cache(workdir, ds, digests)  # the right one loads
  # A cache directory without a manifest (e.g. half written) is not a cache.
  empty = tmp_path / "w"
  (empty / "teacher_cache").mkdir(parents=True)
  with pytest.raises(CacheMismatchError, match="run --mode=precompute"):
    precompute.load_cache(str(empty), ds, None)


def params_of(workdir, cfg, ds):
  _, weights, meta = student.load_student(cfg, ds, workdir, mesh4())
  return jax.device_get(weights), meta


def test_interrupted_and_resumed_training_equals_uninterrupted(trained,
                                                               tmp_path):
  workdir, ds, cfg = trained
  cfg = fx.tiny_config(**{"student.checkpoint_every_steps": 3})
  straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
  for w in (straight, resumed):
    copy_teachers(workdir, w)
    shutil.copytree(precompute.cache_dir(workdir), precompute.cache_dir(w))
  student.train_student(cfg, ds, straight, mesh4())
  # 4 steps per epoch, 12 in all; checkpoints at the end of every epoch
  # (steps 4, 8, 12) and mid-epoch after 3 steps (steps 3, 7, 11). The first
  # run stops at step 5 (resumes from the epoch boundary at 4); the second
  # runs steps 5..8 and stops before epoch 1's end (resumes mid-epoch at 7).
  with pytest.raises(trainer.Interrupted):
    student.train_student(cfg, ds, resumed, mesh4(), stop_after_steps=5)
  with pytest.raises(trainer.Interrupted):
    student.train_student(cfg, ds, resumed, mesh4(), stop_after_steps=4)
  student.train_student(cfg, ds, resumed, mesh4())
  (wa, ma), (wb, mb) = params_of(straight, cfg, ds), params_of(resumed, cfg, ds)
  assert ma == mb
  for a, b in zip(jax.tree.leaves(wa), jax.tree.leaves(wb)):
    np.testing.assert_array_equal(a, b)
  # The metrics files tell the same story (no duplicated or lost records).
  for name in ("metrics.jsonl", "steps.jsonl"):
    ra = logs.JsonlWriter(os.path.join(straight, "student", name)).read()
    rb = logs.JsonlWriter(os.path.join(resumed, "student", name)).read()
    assert ra == rb and len(ra) == (3 if name == "metrics.jsonl" else 12)


def test_rerun_skips_finished_stages_and_summary(trained, tmp_path):
  workdir, ds, cfg = trained
  w = str(tmp_path)
  copy_teachers(workdir, w)
  shutil.copytree(precompute.cache_dir(workdir), precompute.cache_dir(w))
  first = student.train_student(cfg, ds, w, mesh4())
  mtime = os.path.getmtime(os.path.join(w, "student", "done.json"))
  again = student.train_student(cfg, ds, w, mesh4())
  assert again == first
  assert os.path.getmtime(os.path.join(w, "student", "done.json")) == mtime
  summary = evaluate.run(cfg, ds, w, mesh4())
  on_disk = json.load(open(os.path.join(w, "summary.json")))
  assert on_disk["student"]["test_accuracy"] == summary["student"][
      "test_accuracy"]
  assert set(on_disk["teachers"]) == {"audio", "image"}
  assert set(on_disk["student"]["modality_test_accuracy"]) == {"audio",
                                                               "image"}
  for v in [on_disk["student"]["test_accuracy"],
            *on_disk["student"]["modality_test_accuracy"].values(),
            *(t["test_accuracy"] for t in on_disk["teachers"].values())]:
    assert 0.0 <= v <= 1.0 and v * 64 == pytest.approx(round(v * 64))
  assert on_disk["versions"]["jax"] == jax.__version__
  assert os.path.exists(os.path.join(w, "student", "curves.png"))
  # Temperature scaling: the saved T is the NLL minimiser of the student's
  # own validation logits, recomputed here by a second path (a NumPy grid).
  saved = json.load(open(os.path.join(w, "student", "temperature.json")))
  st = on_disk["student"]
  assert saved["temperature"]["fused"] == st["temperature"]
  s, weights, _ = student.load_student(cfg, ds, w, mesh4())
  logits = np.asarray(s.model.apply(
      {"params": weights["params"], "batch_stats": weights["batch_stats"]},
      ds.splits["val"].batch(np.arange(len(ds.splits["val"]))),
      train=False).logits, np.float64)
  grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
  nll = [calibration.nll_at_temperature(logits, ds.splits["val"].labels, t)
         for t in grid]
  assert st["temperature"] == pytest.approx(grid[int(np.argmin(nll))],
                                            rel=2e-3)
  assert saved["val_nll_calibrated"]["fused"] <= saved["val_nll"]["fused"]
  assert set(st["modality_test_ece_calibrated"]) == {"audio", "image"}
  assert 0.0 <= st["test_ece_calibrated"] <= 1.0
  ens = on_disk["teacher_ensemble"]
  assert ens["temperature"] > 0 and 0.0 <= ens["test_ece_calibrated"] <= 1.0
  assert on_disk["schedule"]["smp"]["taus"] == [1]


@pytest.mark.parametrize("split", ["train", "val"])
def test_concat_epoch_hook_hands_finish_every_row_in_order(split):
  """`EpochHook(reduce="concat")` on 4 devices: `finish` gets the rows of
  the visited batches concatenated in loader order (the val split's last
  batch padded, its padding rows masked), features equal to a plain
  inference pass."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from g2d_jax import methods  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import loader  # pylint: disable=g-import-not-at-top
  from g2d_jax.pipeline import steps  # pylint: disable=g-import-not-at-top
  ds = fx.tiny_dataset(n_val=72)   # val: 3 batches of 32, the last padded
  mesh = mesh4()
  cfg = fx.tiny_config(method="pmr")
  s = student.build_student(cfg, ds, mesh)

  def accumulate(out, batch):
    return {"index": batch["index"], "mask": batch["mask"],
            "audio": out.features["audio"]}

  hook = methods.EpochHook(1.0 if split == "val" else 0.5, accumulate,
                           lambda state, rows, epoch: rows, split=split,
                           reduce="concat")
  s = dataclasses.replace(s, method=dataclasses.replace(s.method,
                                                        epoch_hook=hook))
  run = student.make_epoch_hook(s, ds.splits["train"], 32, cfg.seed, mesh,
                                val=ds.splits["val"])
  rows = jax.device_get(run(s.state, 1).method_state)
  if split == "val":
    want = list(loader.eval_batches(ds.splits["val"], 32))
  else:  # 4 batches per epoch, half of them
    want = [b for _, b in zip(range(2), loader.train_batches(
        ds.splits["train"], 32, seed=cfg.seed, epoch=1))]
  assert rows["audio"].shape == (32 * len(want), 8)
  state = jax.device_get(s.state)
  for j, b in enumerate(want):
    got = slice(32 * j, 32 * (j + 1))
    np.testing.assert_array_equal(rows["index"][got], b["index"])
    np.testing.assert_array_equal(rows["mask"][got], b.get(
        "mask", np.ones(32, bool)))
    out, _ = steps.apply_model(s.model, state.params, state.batch_stats,
                               b["inputs"], train=False)
    np.testing.assert_allclose(rows["audio"][got],
                               np.asarray(out.features["audio"]), rtol=1e-5,
                               atol=1e-6)
  if split == "val":
    assert int(rows["mask"].sum()) == 72
