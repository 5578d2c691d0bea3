"""MLA, Multimodal Learning with Alternating Unimodal Adaptation (Zhang et
al., CVPR 2024).

Model: the modality encoders and one linear head shared by every modality
(`HeadsSpec("shared")`, which replaces the model's fusion; see
`methods.heads`). Per batch, after one forward pass of every encoder:

  for each modality m in order (audio first in the released code):
    L_m = CE(head(h_m)) with the head as updated by the previous sub-step
    and h_m from the single forward pass;
    gradient of L_m (m's encoder and the head);
    gradient-space projection (GS) of the head's weight gradient:
      r = batch mean of h_m, k = P r^T,
      P <- P - k k^T / (alpha_t + r k),  P <- P / |P|_F,
      grad_W <- grad_W P^T,
      alpha_t = 0.1 ** (1 + batch_index / batches_per_epoch),
      skipped on the very first sub-step of training;
    one optimizer update (the momentum buffer is shared by the sub-updates).

At inference the fused logits are `sum_m w_m head(h_m)` with fixed weights
(`fusion_weights`, default equal: the code's `av_alpha = 0.5`). The reported
training loss is `sum_m w_m L_m`.

Where we follow the released code
(Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation,
main.py with `--gs_flag`): the order, the single forward pass, the head
update between sub-steps, alpha_t, the first-sub-step skip, and which
parameters each sub-update moves. The code runs torch 1.8.1, whose
`zero_grad()` leaves zero tensors: in a later sub-step the earlier
modalities' parameters have zero gradients and still receive weight decay
and momentum, while later modalities' gradients were deleted at the end of
the previous batch and are skipped. `released_zero_grads=True` (default)
reproduces this (in sub-step j the modalities up to j are stepped, the later
ones are frozen by the gated optimizer); False steps only modality j and the
shared head.

The released GS projection never runs: it is guarded by a parameter-name
check for "module.weight", but it receives the bare `nn.Linear`, whose
weight is named "weight". The paper describes the projection as part of the
method, so `gs_projection=True` (default) implements it with the OWM
formula's scalar denominator `alpha_t + r k` (the code writes
`torch.mm(k, r)`, an outer product, which would divide element-wise if it
ran); `gs_projection=False` reproduces the released behaviour (no
projection). The projection matrix P is method state (checkpointed).

Implementation: one forward and one backward pass per batch, as in the
released code. The head's trajectory over the sub-steps is computed first
(each sub-step's head gradient needs only the head and h_m; running the
element-wise optimizer on a head-only gradient gives the head's exact
update), then one backward pass gives every encoder's gradient (the branches
are disjoint), then the sub-updates run with their real gradients. Measured
cost: about one joint step (experiments/README.md).

With SMP, each sub-update's gate is the SMP kappa times the sub-step's
modality mask; the shared head is never gated. The per-epoch learning-rate
schedule counts optimizer updates, so the pipeline builds it with
`updates_per_step` updates per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import gating
from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods import heads
from g2d_jax.methods.base import HeadsSpec
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import StepResult

Array = jax.Array


# The leaderboard's tuning grid: the Gram-Schmidt projection on or off,
# and the learning rate (MLA has no loss weight to tune).
TUNING_GRID = {"gs_projection": (True, False),
               "student.optimizer.lr_scale": (1.0, 0.5, 2.0)}

# The released optimizer: SGD 1e-3, StepLR(70) of 100 epochs.
RELEASED_OPTIMIZER = dict(name="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4,
                          decay_fractions=(0.7,), decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # True: the paper's GS projection; False: the released code, where a
      # parameter-name check keeps it from ever running.
      gs_projection=True,
      # Inference weights of the per-modality logits; () = equal (the code's
      # --av_alpha 0.5 for two modalities).
      fusion_weights=(),
      # torch 1.8.1 zero_grad() semantics of the released code (see above).
      released_zero_grads=True,
  ))


def gs_alpha(batch_index: Array, batches_per_epoch: int) -> Array:
  """alpha_t = 0.1 ** (1 + batch_index / batches_per_epoch)."""
  lam = 1.0 + jnp.asarray(batch_index, jnp.float32) / batches_per_epoch
  return jnp.power(jnp.float32(0.1), lam)


def gs_update(p_DxD: Array, h_BxD: Array, alpha: Array) -> Array:
  """One OWM update of the projection matrix from a batch of head inputs."""
  r_1xD = jnp.mean(h_BxD.astype(jnp.float32), axis=0, keepdims=True)
  k_Dx1 = p_DxD @ r_1xD.T
  p = p_DxD - (k_Dx1 @ k_Dx1.T) / (alpha + (r_1xD @ k_Dx1)[0, 0])
  return p / jnp.linalg.norm(p)


def project_kernel_grad(p_DxD: Array, g_kernel_DxC: Array) -> Array:
  """torch's `grad_W @ P^T` for a Flax kernel (the transpose of W): P g."""
  return p_DxD @ g_kernel_DxC


def sub_update_masks(modalities: Sequence[str],
                     released_zero_grads: bool) -> list[dict[str, float]]:
  """Which modalities each sub-update steps (1) or freezes (0)."""
  masks = []
  for j in range(len(modalities)):
    masks.append({m: 1.0 if (i == j or (released_zero_grads and i < j))
                  else 0.0 for i, m in enumerate(modalities)})
  return masks


def init_state(params, outputs) -> dict[str, Array]:
  del outputs
  width = params[heads.AUX][heads.SHARED_HEAD]["kernel"].shape[0]
  return {"P": jnp.eye(width, dtype=jnp.float32),
          "count": jnp.zeros((), jnp.int32)}


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None,
          steps_per_epoch: int | None = None, **unused) -> Method:
  del unused
  c = config.mla
  common.require_classification(task, "mla")
  if modalities is None:
    raise ConfigError("MLA needs the modality order (audio first in the "
                      "released code); build it with modalities=...")
  if config.gating.semantics != "freeze":
    raise ConfigError(
        "config.method='mla' keeps a sub-update off the other modalities "
        "through the gated optimizer, which needs "
        f"config.gating.semantics='freeze' (got {config.gating.semantics!r}).")
  modalities = tuple(modalities)
  spec = HeadsSpec("shared", tuple(c.fusion_weights) or None)
  weights = heads.fusion_weights(spec, modalities)
  masks = sub_update_masks(modalities, c.released_zero_grads)
  if not steps_per_epoch:
    raise ConfigError("MLA needs steps_per_epoch (its alpha_t counts the "
                      "batches of an epoch); build it with "
                      "steps_per_epoch=...")
  spe = int(steps_per_epoch)

  def update(ctx):
    labels = ctx.labels
    p, count = ctx.method_state["P"], ctx.method_state["count"]
    params = ctx.params
    out, vjp_fn, new_bs = jax.vjp(ctx.forward, params, has_aux=True)
    alpha_t = gs_alpha(ctx.step - ctx.epoch * spe, spe)
    masks_j = [{n: jnp.float32(v) for n, v in mask.items()} for mask in masks]
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def with_head(tree, g_head):
      tree = dict(tree)
      tree[heads.AUX] = dict(tree[heads.AUX])
      tree[heads.AUX][heads.SHARED_HEAD] = g_head
      return tree

    # 1. The head's trajectory over the sub-steps. Sub-step j's gradients
    # w.r.t. the head and w.r.t. h_j need only the head as updated by the
    # earlier sub-steps; the optimizer is element-wise, so running it on a
    # gradient that is zero outside the head gives the head's exact update
    # (the rest of that dry run is discarded).
    cur_params, cur_opt = params, ctx.opt_state
    uni, head_grads, input_grads = {}, [], {}
    for j, m in enumerate(modalities):
      head = cur_params[heads.AUX][heads.SHARED_HEAD]
      h = out.head_inputs[m]
      uni[m], (g_head, input_grads[m]) = jax.value_and_grad(
          lambda hp, x: losses.cross_entropy(heads.linear(hp, x), labels),
          argnums=(0, 1))(head, h)
      if c.gs_projection:
        first = count == 0
        p = jnp.where(first, p, gs_update(p, h, alpha_t))
        g_head = dict(g_head, kernel=jnp.where(
            first, g_head["kernel"],
            project_kernel_grad(p, g_head["kernel"])))
      count = count + 1
      head_grads.append(g_head)
      if j + 1 < len(modalities):
        cur_params, cur_opt = ctx.apply(with_head(zero_grads, g_head),
                                        masks_j[j], params=cur_params,
                                        opt_state=cur_opt)

    # 2. Every encoder's gradient from one backward pass: the branches are
    # disjoint, so modality m's leaves only see h_m's cotangent.
    zeros = heads.zeros_like_outputs(out)
    (enc_grads,) = vjp_fn(zeros._replace(
        head_inputs={**zeros.head_inputs, **input_grads}))

    # 3. The sub-updates with their real gradients.
    opt_state = ctx.opt_state
    for j, m in enumerate(modalities):
      own = jax.tree_util.tree_map_with_path(
          lambda path, g, z, m=m: (
              g if gating.leaf_modality(path, modalities) == m else z),
          enc_grads, zero_grads)
      params, opt_state = ctx.apply(with_head(own, head_grads[j]),
                                    masks_j[j], params=params,
                                    opt_state=opt_state)
    value = sum(w * uni[m] for m, w in zip(modalities, weights))
    metrics = {f"unimodal/{m}": v for m, v in uni.items()}
    return StepResult(params, opt_state, new_bs, value, metrics, out,
                      {"P": p, "count": count})

  return Method("mla", update, MethodSpec(
      heads=spec, updates_per_step=len(modalities), masked_updates=True),
                init_state=init_state)
