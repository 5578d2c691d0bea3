"""OGM and OGM-GE: on-the-fly gradient modulation (Peng et al., CVPR 2022,
"Balanced Multimodal Learning via On-the-fly Gradient Modulation").

Per training batch, with the fused objective CE(fused logits) only:

1. Scores s_m = sum_i softmax(l_m(x_i))[y_i] from the student's per-modality
   logits (the fusion's own per-modality outputs: for late fusion each
   modality's head, for concat its slice of the fused layer with bias/2).
   Other fusions are refused: the released code scores sum fusion with the
   full bias (our sum fusion reports G2D's bias/k) and has no per-modality
   score for FiLM, gated or cross-attention.
2. The dominant modality (largest score; ties: the first modality, as the
   code's `else` branch) gets k = 1 - tanh(alpha * rho), rho = its score over
   the mean score of the others; every other modality gets k = 1.
3. Inside the epoch window (`config.<ogm|ogm_ge>.window`, a fraction of the
   run: the release's epochs 0..50 of 100 are (0, 0.51)), each modality's
   encoder conv-kernel gradients (4-D leaves) are multiplied by its k;
   OGM-GE then adds Gaussian noise N(0, (std(g) + 1e-8)^2) per element to
   every such gradient of *every* modality (also where k = 1), with std(g)
   the unbiased std of the unmodulated tensor.
4. The optimizer (weight decay, momentum) runs on the modulated gradient.

Where we follow the released code (GeWu-Lab/OGM-GE_CVPR2022, main.py): the
coefficient is `1 - tanh(alpha * rho)` as the code computes it (argument
`alpha * rho`, not `alpha * (rho - 1)`), so k drops to about
`1 - tanh(alpha)` as soon as rho exceeds 1 rather than starting at 1; only
4-D conv kernels are modulated (BatchNorm, heads and the fusion train
unmodulated); the GE noise std is taken from the unmodulated gradient and the
noise is added to both encoders, inside the window only. The released code
is for two modalities; for k > 2 we suppress the single most confident
modality against the mean of the others (exactly the code for k = 2).
Encoders without conv kernels (MLP, Transformer) have nothing to modulate
under the released rule (an error names the fix); `scope="encoder"`
modulates every encoder parameter instead (the MLB repository's OGM variant
does this).

With SMP (`config.smp=True`) both act: OGM's k multiplies the gradient, then
the SMP gate multiplies the modality's update by kappa.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

import g2d_jax
from g2d_jax import confidence
from g2d_jax import gating
from g2d_jax import schedule
from g2d_jax import smp
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods import joint
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import standard_update

Array = jax.Array
SCOPES = ("conv_kernels", "encoder")


# The leaderboard's tuning grid (ogm and ogm_ge): the README's alpha for
# CREMA-D (0.8) and VGGSound (0.1), and one between.
TUNING_GRID = {"alpha": (0.8, 0.4, 0.1)}

# The released optimizer (main.py, CREMA-D): SGD 1e-3, StepLR(70) of 100.
RELEASED_OPTIMIZER = dict(name="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4,
                          decay_fractions=(0.7,), decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # README: alpha 0.8 for CREMA-D (0.1 for VGGSound); the code requires it.
      alpha=0.8,
      # main.py: --modulation_starts 0 --modulation_ends 50, inclusive, of
      # 100 epochs: the first 51% of the run (g2d_jax.schedule).
      window=schedule.window_config(0.0, 0.51),
      # "conv_kernels": the released rule (4-D gradients of the encoders);
      # "encoder": every encoder parameter (for encoders without convs).
      scope="conv_kernels",
  ))


def ogm_scores(modality_logits: Mapping[str, Array],
               labels: Array) -> dict[str, Array]:
  """s_m: the batch sum of the true-class probability of each modality."""
  return {m: jnp.sum(confidence.true_class_probability(
      jax.lax.stop_gradient(l), labels)) for m, l in modality_logits.items()}


def ogm_coefficients(scores: Mapping[str, Array], alpha: float,
                     modalities: Sequence[str] | None = None
                     ) -> dict[str, Array]:
  """k_m: `1 - tanh(alpha * rho)` on the dominant modality, 1 elsewhere.

  The same rule as G2D's partial suppression (`g2d_jax.partial_kappa`, paper
  Table 6), which borrows it from OGM-GE.
  """
  return g2d_jax.partial_kappa(scores, alpha, modalities)


def modulate(grads, coeffs: Mapping[str, Array], *, active: Array,
             modalities: Sequence[str], scope: str = "conv_kernels",
             noise_rng: Array | None = None):
  """Applies OGM (and, with `noise_rng`, OGM-GE's noise) to a gradient tree.

  Args:
    grads: the gradient pytree (student parameter layout).
    coeffs: {modality: k}.
    active: traced bool, whether the epoch is inside the window.
    modalities: modality names.
    scope: "conv_kernels" or "encoder" (see the module docstring).
    noise_rng: a PRNG key for OGM-GE; None for OGM.

  Returns:
    The modulated gradients.
  """
  if scope not in SCOPES:
    raise ConfigError(f"OGM scope={scope!r} is not one of {SCOPES}.")
  selected: list[str] = []

  def visit(path, g):
    m = gating.leaf_modality(path, modalities)
    if m is None or not gating.is_encoder_leaf(path, m):
      return g
    if scope == "conv_kernels" and g.ndim != 4:
      return g
    index = len(selected)
    selected.append(m)
    new = g * jnp.asarray(coeffs[m], g.dtype)
    if noise_rng is not None:
      # torch's Tensor.std() is the unbiased (n - 1) estimate.
      # (nan for a single element, where torch gives nan too: use 0).
      std = (jnp.std(g.astype(jnp.float32), ddof=1) if g.size > 1
             else jnp.float32(0.0)) + 1e-8
      noise = std * jax.random.normal(jax.random.fold_in(noise_rng, index),
                                      g.shape, jnp.float32)
      new = new + noise.astype(g.dtype)
    return jnp.where(active, new, g)

  out = jax.tree_util.tree_map_with_path(visit, grads)
  missing = [m for m in modalities if m not in selected]
  if missing:
    raise ConfigError(
        f"OGM found nothing to modulate in the encoders of {missing}: the "
        "released rule modulates conv kernels (4-D leaves) and these "
        "encoders have none; set --config.<ogm|ogm_ge>.scope=encoder to "
        "modulate every encoder parameter.")
  return out


# Fusions whose per-modality logits are the released code's OGM scores.
OGM_FUSIONS = ("late", "concat")


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  name = config.method if config.method in ("ogm", "ogm_ge") else "ogm"
  c = config[name]
  common.require_classification(task, name)
  if c.scope not in SCOPES:
    raise ConfigError(f"config.{name}.scope={c.scope!r} must be one of "
                      f"{SCOPES}.")
  ge = name == "ogm_ge"
  window = schedule.method_window(config, name)
  fusion = config.get("model", {}).get("fusion", "late")
  if fusion not in OGM_FUSIONS:
    # The released code scores fc_x(a) with the full bias for sum fusion
    # (our sum fusion reports bias/k, G2D's convention) and has no
    # per-modality score for FiLM, gated or cross-attention fusion.
    raise ConfigError(
        f"config.method={name!r} scores each modality with its own head, "
        f"which fusion {fusion!r} does not provide in the released form; "
        f"use --config.model.fusion= one of {OGM_FUSIONS}.")

  def modulate_grads(grads, outputs, ctx):
    order = smp.modality_order(outputs.modality_logits, modalities)
    scores = ogm_scores(outputs.modality_logits, ctx.labels)
    coeffs = ogm_coefficients(scores, c.alpha, order)
    active = window.contains(ctx.epoch)
    grads = modulate(
        grads, coeffs, active=active, modalities=order, scope=c.scope,
        noise_rng=jax.random.fold_in(ctx.rng, 0x06E) if ge else None)
    metrics = {f"{name}/coeff/{m}": jnp.where(active, coeffs[m], 1.0)
               for m in order}
    return grads, metrics

  return Method(name, standard_update(joint.make_loss(config, task),
                                      modulate_grads))
