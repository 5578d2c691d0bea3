r"""G2D's loss, SMP schedule and gated optimizer inside a plain JAX/optax loop.

Nothing here uses g2d_jax's models, data or pipeline: only the four core
functions `g2d_loss`, `teacher_confidence`, `smp_kappa` and `smp_optimizer`
(plus `modality_labels`). The data are SYNTHETIC (two Gaussian views of 4
classes: view "strong" is easy, view "weak" is hard), made up on the spot.

Run:
  python examples/g2d_in_your_loop.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import g2d_jax

MODALITIES = ("strong", "weak")
NUM_CLASSES = 4


def make_data(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Synthetic two-view data: class means plus noise, one view much noisier."""
  rng = np.random.default_rng(seed)
  means = np.random.default_rng(0).normal(size=(2, NUM_CLASSES, 8))
  y = rng.integers(0, NUM_CLASSES, size=n)
  x = {"strong": means[0][y] + 0.5 * rng.normal(size=(n, 8)),
       "weak": means[1][y] + 1.5 * rng.normal(size=(n, 8))}
  return {m: v.astype(np.float32) for m, v in x.items()}, y.astype(np.int32)


class Encoder(nn.Module):
  """A two-layer MLP encoder."""

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(16)(nn.relu(nn.Dense(32)(x))))


class Branch(nn.Module):
  """One modality: encoder + its own linear head."""

  @nn.compact
  def __call__(self, x):
    f = Encoder()(x)
    return nn.Dense(NUM_CLASSES)(f), f


class Branches(nn.Module):
  """Holds one Branch per modality, named by the modality."""

  @nn.compact
  def __call__(self, x):
    return {m: Branch(name=m)(x[m]) for m in MODALITIES}


class Student(nn.Module):
  """Late fusion: the fused logits are the mean of the per-modality heads.

  Parameters end up params per modality (params['encoders'][m]), which is all
  `g2d_jax.modality_labels` needs to find each branch by name.
  """

  @nn.compact
  def __call__(self, x):
    out = Branches(name="encoders")(x)
    fused = jnp.mean(jnp.stack([out[m][0] for m in MODALITIES]), axis=0)
    return fused, {m: out[m][1] for m in MODALITIES}


Teacher = Branch  # a unimodal teacher is one branch, trained alone


def train_teacher(m, x, y, steps=300, seed=0):
  model = Teacher()
  params = model.init(jax.random.key(seed), x[m][:1])
  tx = optax.adam(1e-2)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      logits, _ = model.apply(p, x[m])
      return g2d_jax.cross_entropy(logits, y)
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return model, params


def main(student_epochs: int = 30, taus: tuple[int, ...] = (10,),
         batch_size: int = 64, verbose: bool = True) -> dict[str, float]:
  x, y = make_data(2048, seed=1)
  x_test, y_test = make_data(1024, seed=2)

  # 1. Unimodal teachers, then their outputs once for the whole training set
  #    (precomputed, as the paper's appendix A.6.3 does).
  teacher_logits, teacher_feats, teacher_acc = {}, {}, {}
  for m in MODALITIES:
    model, params = train_teacher(m, x, y)
    teacher_logits[m], teacher_feats[m] = model.apply(params, x[m])
    logits_test, _ = model.apply(params, x_test[m])
    teacher_acc[m] = float(jnp.mean(jnp.argmax(logits_test, -1) == y_test))

  # 2. The student, with the gated optimizer over per-modality subtrees.
  student = Student()
  params = student.init(jax.random.key(1),
                        {m: v[:1] for m, v in x.items()})["params"]
  labels = g2d_jax.modality_labels(params, MODALITIES)
  tx = g2d_jax.smp_optimizer(
      optax.chain(optax.add_decayed_weights(1e-4),
                  optax.sgd(0.01, momentum=0.9)), labels)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch, epoch):
    # kappa from the (precomputed) teacher logits of this batch: Eq. 5-7.
    rho = g2d_jax.teacher_confidence(batch["teacher_logits"], batch["y"])
    kappa = g2d_jax.smp_kappa(rho, epoch, taus)

    def loss_fn(params):
      logits, feats = student.apply({"params": params}, batch["x"])
      return g2d_jax.g2d_loss(logits, feats, batch["teacher_logits"],
                              batch["teacher_feats"], batch["y"])

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, kappa=kappa)
    return optax.apply_updates(params, updates), opt_state, loss, kappa

  rng = np.random.default_rng(0)
  for epoch in range(student_epochs):
    perm = rng.permutation(len(y))
    for start in range(0, len(y) - batch_size + 1, batch_size):
      i = perm[start:start + batch_size]
      batch = {"x": {m: v[i] for m, v in x.items()}, "y": y[i],
               "teacher_logits": {m: v[i] for m, v in teacher_logits.items()},
               "teacher_feats": {m: v[i] for m, v in teacher_feats.items()}}
      params, opt_state, loss, kappa = train_step(params, opt_state, batch,
                                                  jnp.int32(epoch))
    if verbose and epoch % 5 == 0:
      print(f"epoch {epoch:3d} loss {float(loss):.3f} kappa "
            f"{ {m: float(k) for m, k in kappa.items()} }")

  logits, _ = student.apply({"params": params}, x_test)
  result = {f"teacher_{m}": a for m, a in teacher_acc.items()}
  result["student"] = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  if verbose:
    print({k: round(v, 4) for k, v in result.items()})
  return result


if __name__ == "__main__":
  main()
