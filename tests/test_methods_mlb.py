"""MLB: the coefficient of Eq. 5-7 against hand-computed numbers, the
multi-loss objective, and the per-modality gradient scaling of one step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.methods import mlb
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")


def test_coefficients_by_hand():
  # s = (0.4, 0.8): r_audio = 2 (> 1: beta_max), r_image = 0.5 (beta 2).
  k = mlb.mlb_coefficients({"audio": 0.4, "image": 0.8}, alpha=0.5,
                           beta_max=10.0)
  assert float(k["audio"]) == pytest.approx(1 + 9 * np.tanh(0.5),
                                            rel=1e-6)  # 5.1606...
  assert float(k["image"]) == pytest.approx(1 + np.tanh(-0.25), rel=1e-6)
  # beta_max = 2 is the code's default mode, 1 + tanh(alpha (r - 1)).
  k2 = mlb.mlb_coefficients({"audio": 0.4, "image": 0.8}, 0.5, 2.0)
  assert float(k2["audio"]) == pytest.approx(1 + np.tanh(0.5), rel=1e-6)
  # Three modalities: r_i = mean(others) / own.
  k3 = mlb.mlb_coefficients({"a": 0.2, "b": 0.4, "c": 0.6}, 1.0, 3.0)
  assert float(k3["a"]) == pytest.approx(1 + 2 * np.tanh(1.5), rel=1e-6)
  assert float(k3["b"]) == pytest.approx(1.0, abs=1e-6)  # r = 1 (float32)
  assert float(k3["c"]) == pytest.approx(1 + np.tanh(0.3 / 0.6 - 1),
                                         rel=1e-6)
  # Equal scores: no balancing.
  eq = mlb.mlb_coefficients({"audio": 0.7, "image": 0.7}, 0.5, 10.0)
  assert float(eq["audio"]) == float(eq["image"]) == 1.0


def test_scores_are_batch_means_of_true_class_probability():
  logits = {"audio": np.log(np.array([[0.5, 0.5], [0.9, 0.1]], np.float32)),
            "image": np.log(np.array([[0.2, 0.8], [0.3, 0.7]], np.float32))}
  s = mlb.mlb_scores(logits, np.array([0, 1]))
  assert float(s["audio"]) == pytest.approx((0.5 + 0.1) / 2, rel=1e-5)
  assert float(s["image"]) == pytest.approx((0.2 + 0.7) / 2, rel=1e-5)


def test_scaling_covers_every_parameter_of_the_modality_not_shared_ones():
  g = {"encoders": {"audio": {"backbone": {"k": jnp.ones((2, 2))},
                              "head": {"bias": jnp.ones(3)}},
                    "image": {"backbone": {"k": jnp.ones((2,))}}},
       "aux": {"audio": {"kernel": jnp.ones((2, 3))},
               "image": {"kernel": jnp.ones((2, 3))}},
       "fusion": {"fc_out": {"kernel": jnp.ones((4, 3))}}}
  out = mlb.scale_by_modality(g, {"audio": 2.0, "image": 0.5}, MODS)
  np.testing.assert_array_equal(out["encoders"]["audio"]["backbone"]["k"], 2)
  np.testing.assert_array_equal(out["encoders"]["audio"]["head"]["bias"], 2)
  np.testing.assert_array_equal(out["aux"]["audio"]["kernel"], 2)
  np.testing.assert_array_equal(out["encoders"]["image"]["backbone"]["k"], .5)
  np.testing.assert_array_equal(out["aux"]["image"]["kernel"], 0.5)
  np.testing.assert_array_equal(out["fusion"]["fc_out"]["kernel"], 1)


@pytest.mark.parametrize("heads", ["separate", "fusion"])
def test_training_step_is_sgd_on_the_scaled_multi_loss_gradient(heads):
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  cfg = fx.tiny_config(**{"method": "mlb", "mlb.unimodal_heads": heads,
                          "student.optimizer.momentum": 0.0,
                          "student.optimizer.weight_decay": 0.0})
  s = student_lib.build_student(cfg, ds, mesh)
  model, gate, step, state = s.model, s.gate, s.step, s.state
  params0 = jax.device_get(state.params)
  assert ("aux" in params0) == (heads == "separate")
  batch = next(loader.train_batches(ds.splits["train"], 32, seed=0, epoch=0))
  batch["gate"] = gate.for_batch(batch, 0)
  y = batch["label"]

  def loss(p):
    out, _ = steps.apply_model(model, p, state.batch_stats, batch["inputs"],
                               train=True)
    uni = out.head_logits if heads == "separate" else out.modality_logits
    ce = lambda l: -jnp.mean(jax.nn.log_softmax(l)[jnp.arange(32), y])
    return ce(out.logits) + sum(ce(uni[m]) for m in MODS), uni
  (_, uni), grads = jax.value_and_grad(loss, has_aux=True)(params0)
  # Eq. 4-7 in NumPy, two modalities.
  p = {m: np.exp(np.asarray(jax.nn.log_softmax(uni[m]))) for m in MODS}
  s = {m: p[m][np.arange(32), y].mean() for m in MODS}
  k = {}
  for m, o in (("audio", "image"), ("image", "audio")):
    r = s[o] / s[m]
    beta = 10.0 if r > 1 else 2.0
    k[m] = 1 + (beta - 1) * np.tanh(0.5 * (r - 1))
  new, metrics = step(state, mesh_lib.shard_batch(batch, mesh), np.int32(0),
                      jax.random.key(0))
  new = jax.device_get(new.params)
  for m in MODS:
    assert float(metrics["scalars"][f"mlb/coeff/{m}"]) == pytest.approx(
        k[m], rel=1e-4)

  def expect(path, p0, g):
    keys = [q.key for q in path]
    scale = next((k[m] for m in keys if m in k), 1.0)
    return p0 - 0.05 * scale * g
  want = jax.tree_util.tree_map_with_path(expect, params0, grads)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
