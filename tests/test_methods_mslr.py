"""MSLR: the epoch-start ratio rule against a transcription of the released
`on_epoch_begin`, the validation-split hook, the encoder-only scaling, and
exact resume."""

import jax
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods import mslr
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

MODS = ("audio", "image")


def released_ratios(accs, keep):
  """kkontras/MLB Bias_Infusion_MSLR.on_epoch_begin, transcribed: the ratio
  in force during each epoch, given the validation accuracy seen at its
  start (accs[e] is read at the start of epoch e)."""
  memory, ratio, out = [], [1.0] * accs.shape[1], []
  for epoch, acc in enumerate(accs):
    if epoch >= 1:
      if epoch > keep:
        ratio = [acc[i] / np.mean(memory[-keep:], axis=0)[i]
                 for i in range(len(acc))]
      else:
        ratio = [1.0] * len(acc)
      memory.append(acc)
    out.append(ratio)
  return np.array(out)


def init(keep, m=2):
  return {"ratio": np.ones(m, np.float32),
          "memory": np.zeros((keep, m), np.float32),
          "count": np.int32(0), "acc": np.zeros(m, np.float32)}


@pytest.mark.parametrize("keep,seed", [(5, 0), (3, 1), (1, 2)])
def test_ratios_match_the_released_rule(keep, seed):
  accs = np.random.default_rng(seed).uniform(0.2, 0.9, (14, 2)).astype(
      np.float32)
  state, got = init(keep), []
  for epoch, acc in enumerate(accs):
    state = mslr.mslr_state_update(state, acc, np.int32(epoch), keep)
    got.append(np.asarray(state["ratio"]))
  want = released_ratios(accs, keep)
  np.testing.assert_allclose(np.array(got), want, rtol=1e-5)
  # The rule starts after K + 1 epochs and then moves.
  assert np.all(want[:keep + 1] == 1.0) and np.any(want[keep + 1:] != 1.0)
  assert int(state["count"]) == len(accs) - 1


def test_epoch_zero_measures_nothing_and_a_zero_memory_gives_one():
  state = mslr.mslr_state_update(init(2), np.float32([0.5, 0.5]),
                                 np.int32(0), 2)
  assert int(state["count"]) == 0 and not np.any(state["memory"])
  # Two epochs at 0% for audio, then 40%: the release divides by zero.
  for epoch, acc in enumerate([[0.0, 0.3], [0.0, 0.6], [0.4, 0.9]], start=1):
    state = mslr.mslr_state_update(state, np.float32(acc), np.int32(epoch), 2)
  np.testing.assert_allclose(state["ratio"], [1.0, 0.9 / 0.45], rtol=1e-6)


def test_only_encoder_leaves_are_scaled():
  one = lambda *shape: np.ones(shape, np.float32)
  grads = {"encoders": {"audio": {"backbone": {"w": one(2, 2)},
                                  "head": {"kernel": one(2, 3)}},
                        "image": {"backbone": {"w": one(3)}}},
           "fusion": {"b": one(3)}}
  out = common.scale_by_modality(grads, {"audio": 2.0, "image": 0.5}, MODS,
                                 encoders_only=True)
  assert float(out["encoders"]["audio"]["backbone"]["w"][0, 0]) == 2.0
  assert float(out["encoders"]["image"]["backbone"]["w"][0]) == 0.5
  # The late fusion's per-modality head and shared leaves are not encoders.
  assert float(out["encoders"]["audio"]["head"]["kernel"][0, 0]) == 1.0
  assert float(out["fusion"]["b"][0]) == 1.0


def test_hook_reads_the_validation_accuracy_of_each_modality():
  ds = fx.tiny_dataset(n_val=40)  # 40 = one full batch of 32 + 8 padded
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="mslr", **{"mslr.keep_memory": 1})
  s = student_lib.build_student(cfg, ds, mesh)
  with pytest.raises(ValueError, match="validation split"):
    student_lib.make_epoch_hook(s, ds.splits["train"], 32, cfg.seed, mesh)
  hook = student_lib.make_epoch_hook(s, ds.splits["train"], 32, cfg.seed,
                                     mesh, val=ds.splits["val"])
  state = hook(s.state, 0)
  assert int(state.method_state["count"]) == 0
  state = hook(state, 1)
  val = ds.splits["val"].batch(np.arange(40))
  out, _ = steps.apply_model(s.model, state.params, state.batch_stats,
                             {m: val[m] for m in MODS}, train=False)
  labels = val["label"]
  want = [np.mean(np.argmax(np.asarray(out.modality_logits[m]), -1) == labels)
          for m in MODS]
  np.testing.assert_allclose(state.method_state["acc"], want, rtol=1e-6)
  assert int(state.method_state["count"]) == 1
  np.testing.assert_array_equal(state.method_state["ratio"], [1.0, 1.0])


def test_a_step_scales_each_encoder_update_by_its_coefficient():
  """Plain SGD (no momentum, no decay): the encoder's update under k is k
  times the update under 1; the fusion's update does not change."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="mslr", **{
      "student.optimizer.momentum": 0.0,
      "student.optimizer.weight_decay": 0.0})
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  moved = {}
  for ratio in ([1.0, 1.0], [2.0, 0.25]):
    s = student_lib.build_student(cfg, ds, mesh)
    state = s.state.replace(method_state=dict(
        s.state.method_state, ratio=np.float32(ratio)))
    before = jax.device_get(state.params)
    b = dict(batch)
    b["gate"] = s.gate.for_batch(b, 0)
    new, metrics = s.step(state, mesh_lib.shard_batch(b, mesh),
                          np.int32(0), jax.random.key(0))
    after = jax.device_get(new.params)
    moved[ratio[0]] = jax.tree.map(lambda a, b: a - b, after, before)
    assert float(metrics["scalars"]["mslr/coeff/image"]) == ratio[1]
  base, scaled = moved[1.0], moved[2.0]
  for m, k in (("audio", 2.0), ("image", 0.25)):
    enc_b = base["encoders"][m]
    enc_s = scaled["encoders"][m]
    for path, leaf in jax.tree_util.tree_leaves_with_path(enc_b):
      other = np.asarray(_get(enc_s, path))
      want = k * np.asarray(leaf) if "head" not in str(path) else leaf
      np.testing.assert_allclose(other, want, rtol=1e-4, atol=1e-7)
    assert np.any(np.asarray(jax.tree.leaves(enc_b)[0]) != 0)


def _get(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_bad_settings_name_the_field():
  for override, match in (({"mslr.keep_memory": 0}, "keep_memory"),
                          ({"mslr.init_scales": (1.0,)}, "init_scales")):
    cfg = fx.tiny_config(method="mslr", **override)
    with pytest.raises(ConfigError, match=match):
      mslr.build(cfg, "classification", modalities=MODS)


def test_resumed_training_equals_uninterrupted(tmp_path):
  cfg = fx.tiny_config(**{"method": "mslr", "mslr.keep_memory": 1,
                          "student.epochs": 3,
                          "student.checkpoint_every_steps": 3})
  # Killed mid-epoch 2 (the ratio of epoch 2 is in the checkpoint) and at
  # the end of epoch 1 (the hook of epoch 2 reruns).
  fx.assert_resume_exact(cfg, fx.tiny_dataset(), tmp_path, stops=(9, 1))
