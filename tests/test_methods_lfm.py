"""LFM: the alignment and the training loss against NumPy transcriptions of
BalanceBenchmark's LFM_trainer.py, the weight's update rule (step size,
clipping, the Hessian-vector product) and, through the pipeline, the
epoch-start update of the weight and SMP."""

import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.methods import lfm
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student as student_lib
from tests import pipeline_fixtures as fx

softmax = fx.softmax


def torch_kl_div_batchmean(log_input, target):
  """torch F.kl_div(input, target, 'batchmean'): sum t (log t - input) / B."""
  return np.sum(target * (np.log(target) - log_input)) / log_input.shape[0]


def released_alignment(p, q):
  """LFM_trainer.py `Alignment`, transcribed."""
  p, q = softmax(p), softmax(q)
  m = 0.5 * p + 0.5 * q
  kl_p_m = torch_kl_div_batchmean(np.log(p), m)
  kl_q_m = torch_kl_div_batchmean(np.log(q), m)
  return 0.5 * (kl_p_m + kl_q_m)


def ce(logits, y):
  return -np.mean(np.log(softmax(logits))[np.arange(len(y)), y])


def released_training_loss(out, unimodal, label, alpha):
  """LFMTrainer.training_step, transcribed (alpha = {0: CE, 1: align})."""
  names = list(unimodal)
  combinations = [(i, j) for i in range(len(names) - 1)
                  for j in range(i + 1, len(names))]
  loss_alignment = sum(released_alignment(unimodal[names[i]],
                                          unimodal[names[j]])
                       for i, j in combinations)
  return 2 * (alpha[0] * ce(out, label)
              + alpha[1] * loss_alignment / len(combinations))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_alignment_matches_the_released_formula(seed):
  rng = np.random.default_rng(seed)
  p = rng.normal(size=(6, 5)) * 2
  q = rng.normal(size=(6, 5))
  got = float(lfm.alignment(jnp.float32(p), jnp.float32(q)))
  assert got == pytest.approx(released_alignment(p, q), rel=1e-4)
  # KL(m || p) as torch's argument order gives, not the JS divergence
  # KL(p || m) the name suggests.
  pp, qq = softmax(p), softmax(q)
  m = 0.5 * (pp + qq)
  js = 0.5 * (np.sum(pp * np.log(pp / m)) + np.sum(qq * np.log(qq / m))) / 6
  assert abs(got - js) > 1e-4


def test_alignment_is_zero_for_equal_predictions_and_symmetric():
  rng = np.random.default_rng(0)
  p = jnp.float32(rng.normal(size=(4, 3)))
  q = jnp.float32(rng.normal(size=(4, 3)))
  assert float(lfm.alignment(p, p + 3.0)) == pytest.approx(0.0, abs=1e-6)
  assert float(lfm.alignment(p, q)) == pytest.approx(
      float(lfm.alignment(q, p)), rel=1e-6)
  # Far apart predictions stay finite (log-softmax), and the gradient too.
  far = jnp.float32([[200.0, -200.0, 0.0]])
  assert np.isfinite(float(lfm.alignment(far, -far)))
  g = jax.grad(lambda x: lfm.alignment(x, -far))(far)
  assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_alignment_loss_averages_every_pair(k):
  rng = np.random.default_rng(k)
  names = ("audio", "image", "text", "depth")[:k]
  logits = {m: rng.normal(size=(5, 4)) * (i + 1)
            for i, m in enumerate(names)}
  want = np.mean([released_alignment(logits[a], logits[b])
                  for a, b in itertools.combinations(names, 2)])
  got = lfm.alignment_loss({m: jnp.float32(v) for m, v in logits.items()},
                           names)
  assert float(got) == pytest.approx(want, rel=1e-4)
  assert lfm.alignment_pairs(names) == list(itertools.combinations(names, 2))


def test_alignment_loss_refuses_a_single_modality():
  with pytest.raises(ConfigError, match="at least two modalities"):
    lfm.alignment_loss({"audio": jnp.zeros((2, 3))}, ("audio",))


@pytest.mark.parametrize("seed,alpha", [(0, 0.05), (1, 0.3), (2, 0.95)])
def test_training_loss_matches_the_released_step(seed, alpha):
  rng = np.random.default_rng(seed)
  out = rng.normal(size=(8, 4))
  uni = {"audio": rng.normal(size=(8, 4)), "image": rng.normal(size=(8, 4)),
         "text": rng.normal(size=(8, 4)) * 3}
  y = rng.integers(0, 4, 8)
  ce_j = float(ce(out, y))
  align = lfm.alignment_loss({m: jnp.float32(v) for m, v in uni.items()},
                             tuple(uni))
  got = lfm.lfm_objective(jnp.float32(ce_j), align, alpha, 2.0)
  want = released_training_loss(out, uni, y, {0: 1 - alpha, 1: alpha})
  assert float(got) == pytest.approx(want, rel=1e-4)


def test_the_weight_is_a_constant_of_the_training_gradient():
  g = jax.grad(lambda a: lfm.lfm_objective(jnp.float32(1.0),
                                           jnp.float32(3.0), a, 2.0))(0.3)
  assert float(g) == 0.0


def test_the_step_size_halves_and_compounds_as_the_release():
  lr, want = 1e-4, []
  for epoch in range(75):            # getAlpha_Learnable, called per epoch
    if epoch % 20 == 0 and epoch != 0:
      lr = lr / 2
    want.append(lr)
  got = [float(lfm.alpha_learning_rate(e, 1e-4, 20)) for e in range(75)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[19] == pytest.approx(1e-4) and got[60] == pytest.approx(1.25e-5)


def test_the_halving_period_is_a_fraction_of_the_run():
  cfg = fx.tiny_config(**{"method": "lfm", "student.epochs": 30})
  assert lfm.halving_period(cfg) == 20          # the release's 20 of 30
  cfg = fx.tiny_config(**{"method": "lfm", "student.epochs": 8})
  assert lfm.halving_period(cfg) == 5
  cfg = fx.tiny_config(**{"method": "lfm", "lfm.lr_alpha_halve_every": 0.0})
  with pytest.raises(ConfigError, match="lr_alpha_halve_every"):
    lfm.halving_period(cfg)


@pytest.mark.parametrize("alpha,grad,lr", [
    (0.05, 3.0, 1e-4),      # pushed below the floor: stays at 0.05
    (0.05, -30.0, 1e-2),    # moves up
    (0.5, 0.0, 1.0),        # zero gradient: unchanged
    (0.9, -10.0, 0.1),      # capped at 0.95
    (0.4, 2.5, 0.02)])
def test_next_alpha_is_the_clipped_step(alpha, grad, lr):
  want = max(0.05, min(0.95, alpha - lr * grad))
  got = lfm.next_alpha(jnp.float32(alpha), jnp.float32(grad),
                       jnp.float32(lr), 0.05, 0.95)
  assert float(got) == pytest.approx(want, rel=1e-6)


def tiny_params(seed):
  rng = np.random.default_rng(seed)
  return {"encoders": {
      "audio": {"backbone": {"bn0": {"scale": jnp.float32(
          rng.normal(size=3) + 1)}, "conv0": {"kernel": jnp.float32(
              rng.normal(size=(3, 4)))}}, "head": {"kernel": jnp.float32(
                  rng.normal(size=(4, 3)))}},
      "image": {"backbone": {"dense0": {"kernel": jnp.float32(
          rng.normal(size=(2, 3)))}}}}}


def tiny_losses(seed):
  rng = np.random.default_rng(seed + 10)
  xa = jnp.float32(rng.normal(size=(6, 3)))
  xi = jnp.float32(rng.normal(size=(6, 2)))
  y = rng.integers(0, 3, 6)

  def logits(p):
    a = p["encoders"]["audio"]
    ha = jnp.tanh(xa * a["backbone"]["bn0"]["scale"]) @ a[
        "backbone"]["conv0"]["kernel"]
    la = jnp.tanh(ha) @ a["head"]["kernel"]
    li = jnp.tanh(xi @ p["encoders"]["image"]["backbone"]["dense0"]["kernel"])
    return 0.5 * (la + li), {"audio": la, "image": li}

  def cls(p):
    return jnp.mean(jax.nn.logsumexp(logits(p)[0], -1)
                    - logits(p)[0][jnp.arange(6), y])

  def total(p, alpha=0.3):
    return (1 - alpha) * cls(p) + alpha * lfm.alignment(
        logits(p)[1]["audio"], logits(p)[1]["image"])

  return cls, total


@pytest.mark.parametrize("seed", [0, 1])
def test_hessian_vector_product_is_the_full_hessian_times_the_ce_gradient(
    seed):
  params = tiny_params(seed)
  cls, total = tiny_losses(seed)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  hessian = jax.hessian(lambda f: total(unravel(f)))(flat)
  v = jax.grad(lambda f: cls(unravel(f)))(flat)
  want = np.asarray(hessian) @ np.asarray(v)
  got = jax.flatten_util.ravel_pytree(
      lfm.hessian_vector_product(total, cls, params))[0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=1e-5)


def test_alpha_gradient_reads_the_first_kernel_or_everything():
  params = tiny_params(0)
  path = lfm.first_kernel_path(params, "audio")
  assert path == ("encoders", "audio", "backbone", "conv0", "kernel")
  assert lfm.first_kernel_path(params, "image")[-2:] == ("dense0", "kernel")
  h = jax.tree.map(lambda x: jnp.arange(x.size, dtype=jnp.float32).reshape(
      x.shape), params)
  assert float(lfm.alpha_gradient(h, "first_kernel", path)) == 5.5  # 0..11
  leaves = [np.arange(x.size) for x in jax.tree.leaves(params)]
  want = np.concatenate(leaves).mean()
  assert float(lfm.alpha_gradient(h, "all")) == pytest.approx(want)
  with pytest.raises(ConfigError, match="hvp_leaves=all"):
    lfm.first_kernel_path({"encoders": {"audio": {"backbone": {
        "ln": {"scale": jnp.ones(2)}}}}}, "audio")


def test_probe_size_is_a_quarter_at_least_one():
  assert lfm.probe_size(32, 0.25) == 8
  assert lfm.probe_size(30, 0.25) == 7       # size(0) // 4
  assert lfm.probe_size(3, 0.25) == 1


def lfm_config(**overrides):
  base = {"method": "lfm", "lfm.alpha_init": 0.5, "lfm.lr_alpha": 2.0}
  base.update(overrides)
  return fx.tiny_config(**base)


def test_steps_update_the_weight_from_the_probe_at_epoch_starts_only():
  """Epoch 0's first step: alpha from the Hessian-vector product on the
  first quarter of the batch (reverse over reverse here, as torch's
  `autograd.grad(theta_grads, params, grad_outputs=cls_grads)`), and the
  step's loss uses that alpha; later steps of the epoch keep it, epoch 1's
  first step moves it once more."""
  ds = fx.tiny_dataset()
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  s = student_lib.build_student(lfm_config(), ds, mesh)
  init = jax.device_get(s.state.method_state)
  assert float(init["alpha"]) == 0.5 and int(init["epoch"]) == -1
  p0, bs0 = jax.device_get(s.state.params), jax.device_get(
      s.state.batch_stats)
  batch = fx.first_batch(ds)
  n = 8                                       # 32 // 4

  @jax.jit
  def transcription(p, inputs, labels):
    def terms(p, inputs, labels):
      out, _ = steps.apply_model(s.model, p, bs0, inputs, train=True)
      logp = jax.nn.log_softmax(out.logits)
      c = -jnp.mean(logp[jnp.arange(labels.shape[0]), labels])
      return c, lfm.alignment(out.modality_logits["audio"],
                              out.modality_logits["image"])

    probe = {m: x[:n] for m, x in inputs.items()}

    def total(q):
      c, a = terms(q, probe, labels[:n])
      return 0.5 * c + 0.5 * a

    cls_grads = jax.grad(lambda q: terms(q, probe, labels[:n])[0])(p)
    hvp = jax.grad(lambda q: sum(
        jnp.vdot(t, v) for t, v in zip(jax.tree.leaves(jax.grad(total)(q)),
                                       jax.tree.leaves(cls_grads))))(p)
    g = jnp.mean(hvp["encoders"]["audio"]["backbone"]["conv0"]["kernel"])
    return g, terms(p, inputs, labels)

  g, (c, a) = jax.device_get(transcription(
      p0, {m: jnp.asarray(x) for m, x in batch["inputs"].items()},
      jnp.asarray(batch["label"])))
  want = 0.5 - 2.0 * float(g)
  assert 0.05 < want < 0.95 and abs(want - 0.5) > 1e-3

  state, seen = s.state, []
  for i, epoch in enumerate([0, 0, 0, 1, 1]):
    batch = fx.first_batch(ds)
    batch["gate"] = s.gate.for_batch(batch, epoch)
    state, metrics = s.step(state, mesh_lib.shard_batch(batch, mesh),
                            np.int32(epoch), jax.random.key(i))
    metrics = {k: float(v) for k, v in metrics["scalars"].items()}
    ms = jax.device_get(state.method_state)
    assert int(ms["epoch"]) == epoch
    assert metrics["lfm/alpha"] == float(ms["alpha"])
    seen.append(float(ms["alpha"]))
    if i == 0:
      assert metrics["lfm/alpha"] == pytest.approx(want, rel=1e-4)
      assert metrics["lfm/alpha_grad"] == pytest.approx(float(g), rel=1e-3)
      assert metrics["lfm/lr_alpha"] == pytest.approx(2.0)
      # 2 [(1 - alpha) CE + alpha L_align] with the new alpha.
      alpha = metrics["lfm/alpha"]
      assert metrics["loss"] == pytest.approx(
          2 * ((1 - alpha) * float(c) + alpha * float(a)), rel=1e-4)
      assert metrics["loss/align"] == pytest.approx(float(a), rel=1e-4)
      p1 = jax.device_get(state.params)
      for m in ("audio", "image"):
        assert any(not np.array_equal(x, z) for x, z in zip(
            jax.tree.leaves(p1["encoders"][m]),
            jax.tree.leaves(p0["encoders"][m])))
  assert seen[1] == seen[0] and seen[2] == seen[0]   # same epoch: kept
  assert seen[3] != seen[2] and seen[4] == seen[3]   # epoch 1: updated once


@pytest.mark.parametrize("override,match", [
    ({"lfm.hvp_leaves": "last"}, "hvp_leaves"),
    ({"lfm.alpha_init": 0.01}, "alpha_min <= alpha_init"),
    ({"lfm.probe_fraction": 0.0}, "probe_fraction")])
def test_bad_settings_are_refused(override, match):
  with pytest.raises(ConfigError, match=match):
    lfm.build(fx.tiny_config(method="lfm", **override), "classification")


def test_regression_and_one_modality_are_refused():
  cfg = fx.tiny_config(method="lfm")
  with pytest.raises(ConfigError, match="classification only"):
    lfm.build(cfg, "regression")
  with pytest.raises(ConfigError, match="at least two modalities"):
    lfm.build(cfg, "classification", modalities=("audio",))
