"""Tests for g2d_jax.gating: the SMP-gated optax optimizer (paper Eq. 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import g2d_jax

LR, MOMENTUM, WD = 0.1, 0.9, 1e-4


def tiny_params(seed=0):
  """A student-shaped tree: two modality branches and a shared fusion layer."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  branch = lambda: {
      "backbone": {"conv": {"kernel": f(3, 3, 1, 2)},
                   "bn": {"scale": f(2), "bias": f(2)}},
      "head": {"kernel": f(2, 3), "bias": f(3)},
  }
  return {"encoders": {"audio": branch(), "image": branch()},
          "fusion": {"kernel": f(4, 3)}}


def grads_for(params, step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def sgd():
  # torch.optim.SGD(lr, momentum, weight_decay) == decay then momentum SGD.
  return optax.chain(optax.add_decayed_weights(WD),
                     optax.sgd(LR, momentum=MOMENTUM))


def test_modality_labels():
  labels = g2d_jax.modality_labels(tiny_params(), ("audio", "image"))
  assert labels["encoders"]["audio"]["backbone"]["conv"]["kernel"] == "audio"
  assert labels["encoders"]["audio"]["head"]["bias"] == "audio"
  assert labels["encoders"]["image"]["backbone"]["bn"]["scale"] == "image"
  assert labels["fusion"]["kernel"] == "shared"
  assert sorted(jax.tree.leaves(labels)).count("audio") == 5
  with pytest.raises(ValueError, match=r"\['video'\]"):
    g2d_jax.modality_labels(tiny_params(), ("audio", "video"))
  with pytest.raises(ValueError, match="may not be called"):
    g2d_jax.modality_labels(tiny_params(), ("audio", "shared"))


def run(tx, params, kappas):
  state = tx.init(params)
  step = jax.jit(lambda p, s, g, k: _apply(tx, p, s, g, k))
  for i, kappa in enumerate(kappas):
    params, state = step(params, state, grads_for(params, i), kappa)
  return params, state


def _apply(tx, params, state, grads, kappa):
  updates, state = tx.update(grads, state, params, kappa=kappa)
  return optax.apply_updates(params, updates), state


def _apply_plain(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def momentum_of(state, group):
  """The momentum buffers of one partition group (an optax.TraceState)."""
  inner = state.inner_states[group].inner_state
  traces = [s for s in jax.tree.leaves(
      inner, is_leaf=lambda x: isinstance(x, optax.TraceState))
            if isinstance(s, optax.TraceState)]
  assert len(traces) == 1
  return traces[0].trace


def test_freeze_leaves_gated_branch_and_momentum_bit_identical():
  params0 = tiny_params()
  labels = g2d_jax.modality_labels(params0, ("audio", "image"))
  tx = g2d_jax.smp_optimizer(sgd(), labels, semantics="freeze")
  gate = {"audio": jnp.float32(0.0), "image": jnp.float32(1.0)}
  # Warm the momentum up with everything training, then freeze audio.
  ones = {"audio": jnp.float32(1.0), "image": jnp.float32(1.0)}
  params1, state1 = run(tx, params0, [ones] * 2)
  state = state1
  params = params1
  step = jax.jit(lambda p, s, g, k: _apply(tx, p, s, g, k))
  for i in range(2, 6):
    params, state = step(params, state, grads_for(params, i), gate)
  # Audio: params and momentum exactly as before the frozen steps.
  for a, b in zip(jax.tree.leaves(params1["encoders"]["audio"]),
                  jax.tree.leaves(params["encoders"]["audio"])):
    np.testing.assert_array_equal(a, b)
  mom1 = momentum_of(state1, "audio")
  mom = momentum_of(state, "audio")
  for a, b in zip(jax.tree.leaves(mom1), jax.tree.leaves(mom)):
    np.testing.assert_array_equal(a, b)
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(mom))
  # Image and shared moved, and exactly as an ungated optimizer moves them.
  plain = sgd()
  pstate = plain.init(params0)
  pparams = params0
  pstep = jax.jit(lambda p, s, g: _apply_plain(plain, p, s, g))
  for i in range(6):
    pparams, pstate = pstep(pparams, pstate, grads_for(pparams, i))
  for a, b in zip(jax.tree.leaves(pparams["encoders"]["image"]),
                  jax.tree.leaves(params["encoders"]["image"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pparams["fusion"]["kernel"],
                             params["fusion"]["kernel"], rtol=1e-6, atol=1e-7)
  assert not np.allclose(params1["fusion"]["kernel"],
                         params["fusion"]["kernel"])


def test_freeze_keeps_schedule_counter_on_the_global_step():
  schedule = optax.piecewise_constant_schedule(1.0, {3: 0.1})
  params = tiny_params()
  labels = g2d_jax.modality_labels(params, ("audio", "image"))
  tx = g2d_jax.smp_optimizer(optax.sgd(schedule), labels)
  frozen = {"audio": jnp.float32(0.0), "image": jnp.float32(1.0)}
  ones = {"audio": jnp.float32(1.0), "image": jnp.float32(1.0)}
  params3, state3 = run(tx, params, [frozen] * 3)
  np.testing.assert_array_equal(params3["encoders"]["audio"]["head"]["bias"],
                                params["encoders"]["audio"]["head"]["bias"])
  counts = [int(x) for x in jax.tree.leaves(state3.inner_states["audio"])
            if jnp.issubdtype(x.dtype, jnp.integer)]
  assert counts == [3]
  # Step 4 (count 3) uses lr 0.1 for audio too, not lr 1.0.
  g = grads_for(params3, 3)
  updates, _ = tx.update(g, state3, params3, kappa=ones)
  np.testing.assert_allclose(updates["encoders"]["audio"]["head"]["bias"],
                             -0.1 * g["encoders"]["audio"]["head"]["bias"],
                             rtol=1e-6)


def test_freeze_fractional_kappa_scales_the_update():
  params = tiny_params()
  labels = g2d_jax.modality_labels(params, ("audio", "image"))
  tx = g2d_jax.smp_optimizer(sgd(), labels)
  g = grads_for(params, 0)
  updates, _ = tx.update(g, tx.init(params), params,
                         kappa={"audio": 0.25, "image": 1.0})
  plain, _ = sgd().update(g, sgd().init(params), params)
  audio_head = lambda t: t["encoders"]["audio"]["head"]["kernel"]
  np.testing.assert_allclose(audio_head(updates), 0.25 * audio_head(plain),
                             rtol=1e-6)
  np.testing.assert_allclose(updates["encoders"]["image"]["head"]["kernel"],
                             plain["encoders"]["image"]["head"]["kernel"],
                             rtol=1e-6)


def numpy_torch_sgd(params, grads_seq, kappas, lr, momentum, wd):
  """PyTorch SGD (dampening 0, no nesterov) after the official gating.

  Before each step, the official code multiplies the .grad of every 4-D
  parameter of the gated encoder by its coefficient; SGD then adds wd * p to
  the gradient and applies the momentum buffer (buf = d_p on the first step).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  p = {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in flat}
  buf = {}
  for grads, kappa in zip(grads_seq, kappas):
    gflat = {jax.tree_util.keystr(k): np.asarray(v, np.float64)
             for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for name in p:
      d_p = gflat[name].copy()
      for m in ("audio", "image"):
        if f"['{m}']" in name and d_p.ndim == 4:
          d_p = d_p * kappa[m]
      d_p = d_p + wd * p[name]
      buf[name] = d_p if name not in buf else momentum * buf[name] + d_p
      p[name] = p[name] - lr * buf[name]
  return jax.tree_util.tree_unflatten(
      treedef, [p[jax.tree_util.keystr(k)] for k, _ in flat])


def test_reference_semantics_matches_pytorch_sgd_with_zeroed_conv_grads():
  params0 = tiny_params()
  labels = g2d_jax.modality_labels(params0, ("audio", "image"))
  tx = g2d_jax.smp_optimizer(sgd(), labels, semantics="reference")
  kappas = [{"audio": 0.0, "image": 1.0}] * 3 + [{"audio": 1.0,
                                                  "image": 0.0}] * 2
  state = tx.init(params0)
  params = params0
  grads_seq = []
  for i, kappa in enumerate(kappas):
    g = grads_for(params, i)
    grads_seq.append(g)
    updates, state = tx.update(
        g, state, params, kappa={m: jnp.float32(v) for m, v in kappa.items()})
    params = optax.apply_updates(params, updates)
  want = numpy_torch_sgd(params0, grads_seq, kappas, LR, MOMENTUM, WD)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params)):
    np.testing.assert_allclose(b, a, rtol=2e-6, atol=1e-6)
  # The gated conv kernel still moved (weight decay + momentum), unlike freeze.
  k0 = params0["encoders"]["audio"]["backbone"]["conv"]["kernel"]
  k = params["encoders"]["audio"]["backbone"]["conv"]["kernel"]
  assert not np.allclose(k0, k)


def test_one_compilation_serves_every_kappa_pattern():
  params = tiny_params()
  labels = g2d_jax.modality_labels(params, ("audio", "image"))
  tx = g2d_jax.smp_optimizer(sgd(), labels)
  traces = []

  def step(p, s, g, k):
    traces.append(1)
    return _apply(tx, p, s, g, k)

  jstep = jax.jit(step, donate_argnums=(0, 1))
  state = tx.init(params)
  params = jax.tree.map(jnp.array, params)
  patterns = [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 1.0), (1.0, 1.0)]
  for i, (ka, ki) in enumerate(patterns):
    kappa = {"audio": jnp.float32(ka), "image": jnp.float32(ki)}
    params, state = jstep(params, state, grads_for(params, i), kappa)
  assert len(traces) == 1
  assert jstep._cache_size() == 1


def test_missing_kappa_is_a_clear_error():
  params = tiny_params()
  labels = g2d_jax.modality_labels(params, ("audio", "image"))
  tx = g2d_jax.smp_optimizer(sgd(), labels)
  with pytest.raises(TypeError, match="kappa="):
    tx.update(params, tx.init(params), params)
  with pytest.raises(KeyError, match="image"):
    tx.update(params, tx.init(params), params, kappa={"audio": 1.0})
  with pytest.raises(ValueError, match="semantics"):
    g2d_jax.smp_optimizer(sgd(), labels, semantics="soft")


def test_label_function_equals_label_tree():
  params = tiny_params()
  fn = lambda p: g2d_jax.modality_labels(p, ("audio", "image"))
  kappa = {"audio": jnp.float32(0.0), "image": jnp.float32(1.0)}
  a, _ = run(g2d_jax.smp_optimizer(sgd(), fn), params, [kappa] * 2)
  b, _ = run(g2d_jax.smp_optimizer(sgd(), fn(params)), params, [kappa] * 2)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_reference_semantics_refuses_a_branch_without_conv_kernels():
  """An MLP branch has no 4-D leaves: `reference` would never gate it."""
  params = {"encoders": {"audio": {"conv": {"kernel": jnp.ones((3, 3, 1, 2))}},
                         "image": {"dense": {"kernel": jnp.ones((4, 2))}}}}
  labels = g2d_jax.modality_labels(params, ("audio", "image"))
  tx = g2d_jax.smp_optimizer(optax.sgd(0.1), labels, semantics="reference")
  with pytest.raises(ValueError, match="modality 'image' has none"):
    tx.init(params)
  g2d_jax.smp_optimizer(optax.sgd(0.1), labels, semantics="freeze").init(params)


def test_encoder_scope_labels_only_the_encoder_with_the_modality():
  params = tiny_params()
  params["aux"] = {"audio": {"kernel": jnp.ones((2, 3))}}
  labels = g2d_jax.modality_labels(params, ("audio", "image"),
                                   scope="encoder")
  assert labels["encoders"]["audio"]["backbone"]["conv"]["kernel"] == "audio"
  assert labels["encoders"]["audio"]["backbone"]["bn"]["scale"] == "audio"
  assert labels["encoders"]["audio"]["head"]["bias"] == "audio:rest"
  assert labels["aux"]["audio"]["kernel"] == "audio:rest"
  assert labels["fusion"]["kernel"] == "shared"
  assert sorted(jax.tree.leaves(labels)).count("audio") == 3
  with pytest.raises(ValueError, match="scope='head' is not one of"):
    g2d_jax.modality_labels(params, ("audio", "image"), scope="head")


def test_group_gates_mask_the_rest_but_never_apply_kappa_to_it():
  got = g2d_jax.gating.group_gates(
      {"audio": jnp.float32(0.0), "image": jnp.float32(1.0)},
      {"audio": jnp.float32(1.0), "image": jnp.float32(0.0)})
  assert {k: float(v) for k, v in got.items()} == {
      "audio": 0.0, "audio:rest": 1.0, "image": 0.0, "image:rest": 0.0}


def test_encoder_scope_freezes_the_encoder_and_trains_its_head():
  params0 = tiny_params()
  frozen = {"audio": jnp.float32(0.0), "image": jnp.float32(1.0)}
  out = {}
  for scope in ("branch", "encoder"):
    labels = g2d_jax.modality_labels(params0, ("audio", "image"),
                                     scope=scope)
    tx = g2d_jax.smp_optimizer(sgd(), labels)
    out[scope], _ = run(tx, params0, [frozen])   # no ":rest" key: ungated
  g = grads_for(params0, 0)
  for params in out.values():
    np.testing.assert_array_equal(
        params["encoders"]["audio"]["backbone"]["conv"]["kernel"],
        params0["encoders"]["audio"]["backbone"]["conv"]["kernel"])
  np.testing.assert_array_equal(out["branch"]["encoders"]["audio"]["head"]
                                ["kernel"],
                                params0["encoders"]["audio"]["head"]["kernel"])
  # First SGD step: p - lr * (g + wd p) (momentum's trace is g + wd p).
  p = params0["encoders"]["audio"]["head"]["kernel"]
  want = p - LR * (g["encoders"]["audio"]["head"]["kernel"] + WD * p)
  np.testing.assert_allclose(out["encoder"]["encoders"]["audio"]["head"]
                             ["kernel"], want, rtol=1e-6)
