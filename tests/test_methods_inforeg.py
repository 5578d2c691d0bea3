"""InfoReg: the coefficient, the prime-learning-window statistic and the
Fisher trace against NumPy transcriptions of the released code
(GeWu-Lab/InfoReg_CVPR2025 main.py), the proximal gradient, and training
steps through the pipeline (first step, state carried across steps and
epochs, SMP, exact resume)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import heads
from g2d_jax.methods import inforeg
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx
from tests.test_pipeline_steps import AUDIO_WEAK
from tests.test_pipeline_steps import batch_with_teacher

MODS = ("audio", "image")
softmax = fx.softmax


def released_betas(out_a, out_v, label, k, thr=0.05):
  """main.py (ea7b9d55) train_epoch, transcribed: batch sums of the
  true-class probability, then the two branches (0.95 audio, 0.1 visual)."""
  score_v = sum(softmax(out_v)[i][label[i]] for i in range(len(label)))
  score_a = sum(softmax(out_a)[i][label[i]] for i in range(len(label)))
  if score_a > score_v and k > thr:
    return 0.95 * np.exp(np.tanh(score_a - score_v)), 0.0
  if score_a < score_v and k > thr:
    return 0.0, 0.1 * np.exp(np.tanh(score_v - score_a))
  return 0.0, 0.0


def released_k(traces, epoch):
  """main.py: `audio_trace_list` starts as ten zeros and gets each finished
  epoch's trace; k at the start of `epoch`."""
  trace_list = [0] * 10 + list(traces[:epoch])
  if epoch == 0:
    return 1
  tr1 = sum(trace_list[-10:]) / 10
  tr2 = sum(trace_list[-11:-1]) / 10
  return (tr1 - tr2) / tr1


def released_trace(step_grads, kernels):
  """main.py: fim_audio[name] += grad * grad per step over the encoder's
  Conv2d/Linear weights; then each layer's mean, summed over layers."""
  fim = {name: 0 for name in kernels}
  for grads in step_grads:
    for name in kernels:
      fim[name] = fim[name] + grads[name] ** 2
  return sum(float(np.mean(fim[name])) for name in kernels)


def state_history(traces, epoch, length=11):
  """What the method state holds at `epoch`: the last `length` epoch
  traces, zeros before the run."""
  return np.asarray(([0.0] * length + list(traces[:epoch]))[-length:],
                    np.float32)


def logits_pair(seed, image_leads):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 5, 8)
  strong = rng.normal(size=(8, 5)) + 4.0 * np.eye(5)[label]
  weak = rng.normal(size=(8, 5))
  a, v = (weak, strong) if image_leads else (strong, weak)
  return a.astype(np.float32), v.astype(np.float32), label


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("image_leads", [False, True])
@pytest.mark.parametrize("k", [1.0, 0.06, 0.04])
def test_coefficients_match_the_released_rule(seed, image_leads, k):
  out_a, out_v, label = logits_pair(seed, image_leads)
  scores = inforeg.inforeg_scores({"audio": out_a, "image": out_v}, label)
  # The release reads the window from the audio trace for both branches.
  active = {m: jnp.bool_(k > 0.05) for m in MODS}
  betas = inforeg.inforeg_coefficients(scores, {"audio": 0.95, "image": 0.1},
                                       active)
  want_a, want_v = released_betas(out_a, out_v, label, k)
  assert float(betas["audio"]) == pytest.approx(want_a, rel=1e-5)
  assert float(betas["image"]) == pytest.approx(want_v, rel=1e-5)
  if k > 0.05:
    assert (want_v if image_leads else want_a) > 0


def test_a_tie_or_a_closed_window_regulates_no_one():
  s = {"audio": jnp.float32(3.0), "image": jnp.float32(3.0)}
  on = {m: jnp.bool_(True) for m in MODS}
  betas = inforeg.inforeg_coefficients(s, {"audio": 0.95, "image": 0.95}, on)
  assert [float(betas[m]) for m in MODS] == [0.0, 0.0]
  s["audio"] = jnp.float32(3.5)
  off = {"audio": jnp.bool_(False), "image": jnp.bool_(True)}
  betas = inforeg.inforeg_coefficients(s, {"audio": 0.95, "image": 0.95}, off)
  assert [float(betas[m]) for m in MODS] == [0.0, 0.0]
  betas = inforeg.inforeg_coefficients(s, {"audio": 0.95, "image": 0.95}, on)
  assert float(betas["audio"]) == pytest.approx(0.95 * np.exp(np.tanh(0.5)))


def test_three_modalities_regulate_every_leader_against_the_others_mean():
  s = {"a": jnp.float32(10.0), "b": jnp.float32(9.0), "c": jnp.float32(1.0)}
  gaps = inforeg.score_gaps(s)
  np.testing.assert_allclose([float(gaps[m]) for m in "abc"],
                             [10 - 5.0, 9 - 5.5, 1 - 9.5])
  on = {m: jnp.bool_(True) for m in "abc"}
  betas = inforeg.inforeg_coefficients(s, {m: 1.0 for m in "abc"}, on)
  np.testing.assert_allclose(
      [float(betas[m]) for m in "abc"],
      [np.exp(np.tanh(5.0)), np.exp(np.tanh(3.5)), 0.0], rtol=1e-6)
  with pytest.raises(ConfigError, match="at least two"):
    inforeg.score_gaps({"a": jnp.float32(1.0)})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_statistic_matches_the_released_smoothing(seed):
  rng = np.random.default_rng(seed)
  # Growing, then flat and noisy traces, as in a run.
  traces = np.concatenate([np.linspace(1.0, 5.0, 8),
                           5.0 + 0.1 * rng.normal(size=16)])
  for epoch in range(len(traces)):
    got = inforeg.information_change(state_history(traces, epoch),
                                     jnp.int32(min(epoch, 10)))
    assert float(got) == pytest.approx(released_k(traces, epoch), rel=1e-5,
                                       abs=1e-6)
  # Epochs 0 and 1 always open the window; a flat history closes it.
  assert released_k(traces, 1) == 1.0
  assert float(inforeg.information_change(jnp.full((11,), 2.0), 12)) == 0.0


def test_the_trace_source_picks_whose_window_opens():
  hist = {"audio": jnp.asarray([1.0, 1.0, 1.0]),   # flat: closed
          "image": jnp.asarray([1.0, 1.0, 3.0])}   # growing: open
  own = inforeg.window_changes(hist, 2, "own")
  assert [float(own[m]) for m in MODS] == [0.0, 0.5]
  audio = inforeg.window_changes(hist, 2, "audio")
  assert [float(audio[m]) for m in MODS] == [0.0, 0.0]
  both = inforeg.window_changes(hist, 2, "all")   # [2, 2, 4]
  np.testing.assert_allclose([float(both[m]) for m in MODS], [1 / 3, 1 / 3],
                             rtol=1e-6)


def test_window_statistic_of_zero_information_is_zero_not_nan():
  zero = inforeg.information_change(jnp.zeros((11,)), jnp.int32(3))
  assert float(zero) == 0.0
  first = inforeg.information_change(jnp.zeros((11,)), jnp.int32(0))
  assert float(first) == 1.0


def grads_tree(seed=0):
  rng = np.random.default_rng(seed)
  g = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {"encoders": {
      "audio": {"backbone": {"conv": {"kernel": g(3, 3, 2, 4),
                                      "bias": g(4)},
                             "bn": {"scale": g(4), "bias": g(4)},
                             "dense": {"kernel": g(4, 6)}},
                "head": {"kernel": g(6, 3), "bias": g(3)}},
      "image": {"backbone": {"dense": {"kernel": g(5, 6), "bias": g(6)}},
                "head": {"kernel": g(6, 3), "bias": g(3)}}},
          "fusion": {"w": g(3, 3)}}


def test_information_amount_is_the_released_fisher_trace():
  trees = [grads_tree(s) for s in range(3)]
  got = {m: sum(float(inforeg.information_amount(t, MODS)[m]) for t in trees)
         for m in MODS}
  audio = [{"conv": np.asarray(t["encoders"]["audio"]["backbone"]["conv"]
                               ["kernel"]),
            "dense": np.asarray(t["encoders"]["audio"]["backbone"]["dense"]
                                ["kernel"])} for t in trees]
  image = [{"dense": np.asarray(t["encoders"]["image"]["backbone"]["dense"]
                                ["kernel"])} for t in trees]
  # Biases, BatchNorm, heads and the fusion are not counted.
  assert got["audio"] == pytest.approx(
      released_trace(audio, ["conv", "dense"]), rel=1e-5)
  assert got["image"] == pytest.approx(released_trace(image, ["dense"]),
                                       rel=1e-5)
  zero = jax.tree.map(jnp.zeros_like, trees[0])
  assert [float(v) for v in inforeg.information_amount(zero, MODS).values()
          ] == [0.0, 0.0]


def test_regulation_pulls_only_the_regulated_encoder_to_the_reference():
  g, p, r = grads_tree(0), grads_tree(1), grads_tree(2)
  betas = {"audio": jnp.float32(2.0), "image": jnp.float32(0.0)}
  out = inforeg.regulate(g, p, r, betas, MODS)
  for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
    keys = [k.key for k in path]
    if keys[:3] == ["encoders", "audio", "backbone"]:  # BatchNorm too
      want = _at(g, keys) + 2.0 * (_at(p, keys) - _at(r, keys))
    else:                                              # heads, fusion, image
      want = _at(g, keys)
    np.testing.assert_allclose(leaf, want, rtol=1e-6)
  # On the first step of an epoch theta == theta_ref: nothing changes.
  same = inforeg.regulate(g, p, p, betas, MODS)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(g)):
    np.testing.assert_array_equal(a, b)


def _at(tree, keys):
  for k in keys:
    tree = tree[k]
  return np.asarray(tree)


def _plain_sgd(**overrides):
  return fx.tiny_config(**{"method": "inforeg",
                           "student.optimizer.momentum": 0.0,
                           "student.optimizer.weight_decay": 0.0,
                           **overrides})


def _multi_loss_grads(model, params, batch_stats, batch):
  def fn(p):
    out, _ = steps.apply_model(model, p, batch_stats, batch["inputs"],
                               train=True, rng=jax.random.key(0))
    value, _ = heads.multi_loss(out, batch["label"], "fusion")
    return value, out
  (_, out), grads = jax.value_and_grad(fn, has_aux=True)(params)
  return out, grads


def test_first_step_trains_the_multi_loss_and_reports_the_released_beta():
  """theta == theta_ref on the first step: plain SGD on CE(fused) + sum_m
  CE(z_m); beta (a metric) is the release's for this batch."""
  ds = fx.tiny_dataset()
  cfg = _plain_sgd(**{"inforeg.alphas": (0.95, 0.1)})
  model, p0, bs0, batch, p1, metrics = fx.one_step(cfg, ds, 0)
  out, grads = _multi_loss_grads(model, p0, bs0, batch)
  want = released_betas(np.asarray(out.modality_logits["audio"]),
                        np.asarray(out.modality_logits["image"]),
                        batch["label"], k=1)
  assert metrics["inforeg/beta/audio"] == pytest.approx(want[0], rel=1e-5)
  assert metrics["inforeg/beta/image"] == pytest.approx(want[1], rel=1e-5)
  assert max(want) > 0
  assert metrics["inforeg/change/audio"] == 1.0
  fused = float(losses.cross_entropy(out.logits, batch["label"]))
  assert metrics["loss/student"] == pytest.approx(fused, rel=1e-5)
  for a, b, g in zip(jax.tree.leaves(p1), jax.tree.leaves(p0),
                     jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b - 0.05 * np.asarray(g), rtol=1e-5,
                               atol=1e-6)


def test_state_carries_the_reference_and_the_epoch_traces():
  """Steps at epochs 0, 0, 1, 2: the second step adds beta (theta -
  theta_ref) to the dominant encoder's gradient; each new epoch pushes the
  finished epoch's trace and resets theta_ref; the change c is the
  release's k."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = _plain_sgd(**{"inforeg.history_epochs": 10})
  s = student_lib.build_student(cfg, ds, mesh)
  batches = loader.train_batches(ds.splits["train"], 32, seed=0, epoch=0)
  state, traces, history = s.state, [], []
  for i, epoch in enumerate((0, 0, 1, 2)):
    batch = next(batches)
    batch["gate"] = s.gate.for_batch(batch, epoch)
    before = jax.device_get(state)
    state, metrics = s.step(state, mesh_lib.shard_batch(batch, mesh),
                            np.int32(epoch), jax.random.key(0))
    metrics = {k: float(v) for k, v in metrics["scalars"].items()}
    after = jax.device_get(state.method_state)
    if i == 1:
      # theta_ref = the parameters of the epoch's first step.
      _, grads = _multi_loss_grads(s.model, before.params,
                                     before.batch_stats, batch)
      ref = after["reference"]
      beta = {m: metrics[f"inforeg/beta/{m}"] for m in MODS}
      assert max(beta.values()) > 0
      for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        keys = [k.key for k in path]
        m = keys[1] if keys[:1] == ["encoders"] else None
        pull = (beta[m] * (_at(before.params, keys) - _at(ref, keys))
                if m and keys[2] == "backbone" else 0.0)
        np.testing.assert_allclose(
            _at(state.params, keys),
            _at(before.params, keys) - 0.05 * (np.asarray(g) + pull),
            rtol=1e-5, atol=1e-6)
    if i in (2, 3):
      # A new epoch: the last epoch's trace is pushed, theta_ref reset.
      traces.append(history[-1])
      for m in MODS:
        np.testing.assert_allclose(
            after["history"][m][-1], traces[-1][m], rtol=1e-6)
        want = released_k([t[m] for t in traces], len(traces))
        assert metrics[f"inforeg/change/{m}"] == pytest.approx(want, rel=1e-5)
        assert (metrics[f"inforeg/beta/{m}"] == 0.0) or want > 0.05
      for a, b in zip(jax.tree.leaves(after["reference"]),
                      jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(a, b)
      assert int(after["finished"]) == len(traces)
    history.append({m: float(after["trace"][m]) for m in MODS})
  assert history[1]["audio"] > history[0]["audio"] > 0   # accumulates
  assert history[2]["audio"] < history[1]["audio"]        # reset at epoch 1


def test_smp_composes_and_the_frozen_branch_does_not_move():
  """SMP trains audio alone: the image branch does not move although
  InfoReg regulates it; the step is the plain (unspecialised) one."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(method="inforeg", smp=True)
  s = student_lib.build_student(cfg, ds, mesh)
  p0 = jax.device_get(s.state.params)
  batch = batch_with_teacher(ds, *AUDIO_WEAK)
  batch["gate"] = s.gate.for_batch(batch, 0)
  new, metrics = s.step(s.state, mesh_lib.shard_batch(batch, mesh),
                        np.int32(0), jax.random.key(0))
  p1 = jax.device_get(new.params)
  assert float(metrics["scalars"]["kappa/image"]) == 0.0
  for a, b in zip(jax.tree.leaves(p1["encoders"]["image"]),
                  jax.tree.leaves(p0["encoders"]["image"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(p1["encoders"]["audio"]),
      jax.tree.leaves(p0["encoders"]["audio"])))
  assert s.step.compiled_patterns() == {loader.ALL: 1}


def test_separate_heads_train_and_score_their_own_heads():
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(method="inforeg", **{"model.fusion": "film",
                                            "inforeg.unimodal_heads":
                                            "separate"})
  _, p0, _, _, p1, metrics = fx.one_step(cfg, ds, 0)
  assert np.isfinite(metrics["loss"])
  for m in MODS:
    assert not np.array_equal(p1["aux"][m]["kernel"], p0["aux"][m]["kernel"])


def test_resumed_training_equals_uninterrupted(tmp_path):
  cfg = fx.tiny_config(**{"method": "inforeg", "student.epochs": 2,
                          "student.checkpoint_every_steps": 3})
  # Stop at step 6 (mid-epoch 1, resumed from the step-6 checkpoint with
  # epoch 0's trace in the history), then 3 steps later.
  fx.assert_resume_exact(cfg, fx.tiny_dataset(), tmp_path, stops=(6, 3))


@pytest.mark.parametrize("overrides,match", [
    ({"model.fusion": "film"}, "unimodal_heads=separate"),
    ({"inforeg.alphas": (0.95,)}, "one coefficient per modality"),
    ({"inforeg.trace_source": "video"}, "trace_source"),
    ({"inforeg.history_fraction": 0.0}, "history_epochs"),
    ({"inforeg.unimodal_heads": "both"}, "unimodal_heads"),
])
def test_bad_configs_name_the_fix(overrides, match):
  cfg = fx.tiny_config(method="inforeg", **overrides)
  with pytest.raises(ConfigError, match=match):
    inforeg.build(cfg, "classification", modalities=MODS)


def test_history_is_a_fraction_of_the_run():
  c = inforeg.default_config()
  assert inforeg.history_length(c, 50) == 10   # the release's 10 of 50
  assert inforeg.history_length(c, 2) == 1
  c.history_epochs = 4
  assert inforeg.history_length(c, 50) == 4
