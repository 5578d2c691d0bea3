"""AGM, Adaptive Gradient Modulation (Li, Li, Hu, Lei, Li and Zhou, ICCV 2023,
"Boosting Multi-modal Model Performance with Adaptive Gradient Modulation").

Released code read: the authors' lihong2303/AGM (`model/AVMNIST_net.py` and
`model/CREMAD_net.py`: `GradMod`, `Modality_Audio`, `Modality_Visual`, the
backward hooks; `run/CREMAD_main.py` and `run/AVMNIST_main.py`: `train`;
`utils/config.py`, `README.md`), and two re-implementations:
GeWu-Lab/BalanceBenchmark (`balancemm/trainer/AGM_trainer.py`: `newGrad`,
`AGMTrainer.training_step`; `configs/trainer_config.yaml`) and kkontras/MLB
(`agents/general_agent/helpers/Bias_Infusion.py`: `Bias_Infusion_AGM`,
`Bias_Infusion_AGM_3mod`; `models/MLB_Models.py`: `AGM_Model`,
`AGM_3D_Model`).

Per training batch, with N the k >= 2 modalities and f(T) the fused logits
[B, C] of a forward pass in which the inputs of every modality outside the
coalition T are replaced by zeros (f(N) is the ordinary forward pass):

1. Mono-modal outputs, Shapley style (SHAPE): for every modality m,

       o_m = sum_{T : m in T} w(|T| - 1) f(T) - sum_{T != {} : m not in T}
             w(|T|) f(T),         w(s) = s! (k - s - 1)! / k!

   i.e. the Shapley value of m in the game f plus f({})/k (f({}) cancels, so
   2^k - 1 passes are needed), and sum_m o_m = f(N). For k = 2 this is the
   release's `o_a = (f(N) - f(v only) + f(a only)) / 2`.
2. Scores (mono-modal cross-entropies, detached):
   s_m = mean_i -log(max(softmax(o_m)_i[y_i], 1e-8)).
3. Ratio and its target from the running means sbar_m (all previous steps):

       r_m   = exp(k/(k-1) * (mean_j s_j - s_m))        (k=2: exp(s_v - s_a))
       eta_m = exp(k/(k-1) * (mean_j sbar_j - sbar_m))
       k_m   = exp(alpha * min(eta_m - r_m, cap))

   then sbar_m <- sbar_m (t - 1)/t + s_m / t (t: the 1-indexed global step;
   sbar starts at 0, so the first step's target is eta = 1).
4. The loss is CE(sum_m o_m) (= CE(f(N)) in value); the gradient that flows
   back into o_m is multiplied by k_m (the release's backward hooks on o_m;
   here `scale_grad`), and from there through every pass f(T) into all the
   parameters. For additive fusions (late, sum, concat) this multiplies
   modality m's gradient along its real-input path (encoder, head, its
   slice of the fusion) by k_m, that of a bias every pass contains
   (concat's, the heads') by mean_j k_j, and that of m's zero-input
   contribution (its encoder and head applied to zeros) by
   (mean_j k_j - k_m) (tests/test_methods_agm.py checks this).
5. If any element of the fusion layer's weight gradient leaves
   [-clip, clip], the gradient of every parameter is clipped to global norm
   `clip` (torch's `clip_grad_norm_`: times min(1, clip/(norm + 1e-6))).
6. One optimizer update (weight decay and momentum act on the result).

Outside the epoch window (`config.agm.window`; default the whole run) the
scores and running means are still updated every step (as in the release)
but the hooks keep their last coefficients (`outside_window="hold"`, the
release: `update_scale` is only called inside the window, the hooks keep
the scale they had, 1.0 before the window) or use k = 1 ("one").

Where we follow the released code (the authors' lihong2303/AGM) rather than
the paper or the re-implementations:
- The hooks act on the mono-modal outputs o_m and the padded passes keep
  their gradients (GradMod computes them without `no_grad`), so k_m reaches
  the parameters through every pass. BalanceBenchmark instead computes the
  padded passes under `no_grad` and multiplies the gradients of modality m's
  encoder parameters (not 1-D ones) by k_m; MLB's three-modality model runs
  them under `no_grad` too (its hooks then scale everything by mean k).
- o_m keeps f({})/k (the release's `Modality_*` modules, and MLB's); the
  BalanceBenchmark `newGrad` subtracts f({}) (the exact Shapley value).
- The ratio's sign: r_m grows with m's lead (exp(s_v - s_a) for audio, as
  the authors and MLB write it); BalanceBenchmark's k-modality formula
  `exp(k/(k-1) (s_m - mean))` has the opposite sign with these loss-valued
  scores, which would speed up the currently dominant modality.
- The running means are the plain mean over all previous steps, updated
  after the coefficient is computed (CREMA-D/AV-MNIST mains; MLB's
  three-modality class updates them first).
- `cap = 10` (CREMA-D main and MLB's two-modality class; the AV-MNIST main
  has no cap: set a large cap; BalanceBenchmark and MLB's three-modality
  class use 7) and `clip = 1` (threshold and max norm of the authors' mains;
  BalanceBenchmark uses 5).
- The padded passes zero the modality's *input* (as all three releases do;
  the zeroed encoder still runs) and run in inference mode, as the release
  does (`net.eval()`: BatchNorm running statistics, no dropout;
  `ctx.forward(params, inputs, train=False)`), with their gradients kept;
  the full pass's BatchNorm statistics are the ones kept.
- Any fusion works (the passes only zero inputs). The clipping test reads
  the fusion layer's weight gradient: `fusion/fc_out/kernel` (concat, FiLM,
  gated, cross-attention; the release's `fusion_module.fc_out.weight`),
  or, for late and sum fusion, every modality's head kernel (together the
  release's `head.fc.weight` of its concatenated late-fusion head).

k >= 3 modalities: the general Shapley weights above, as the releases'
three-modality modules (`Modality_Audio/Visual/Text` of BalanceBenchmark and
MLB) and BalanceBenchmark's k-modality `newGrad` compute them, with the
ratio's factor k/(k-1) (MLB's 3/2). Cost: 2^k - 1 forward (and backward)
passes per batch (3 for two modalities, 7 for three).

With SMP (`config.smp=True`) both act: k_m and the clipping shape the
gradient, then the SMP-gated optimizer multiplies each modality's update by
its kappa (the clipping norm counts a frozen branch's gradient too, as the
release's `clip_grad_norm_` counts every parameter). The method rewrites
gradients, so frozen-branch skipping is off (`skip_frozen_exact=False`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import losses
from g2d_jax import schedule
from g2d_jax import smp
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import StepResult

Array = jax.Array
Coalition = tuple[str, ...]
OUTSIDE_WINDOW = ("hold", "one")
# The release's floor on the true-class probability of a mono-modal output.
PROB_FLOOR = 1e-8


# The leaderboard's tuning grid: the authors' argparse default (1.0),
# BalanceBenchmark's trainer_config.yaml (0.1) and the authors' README
# AV-MNIST command (--alpha 2.5).
TUNING_GRID = {"alpha": (1.0, 0.1, 2.5)}

# The released optimizer (lihong2303/AGM tasks/*_task.py, README command):
# SGD momentum 0.9, wd 1e-4, lr 1e-4, StepLR(70, 0.1) of 100 epochs.
RELEASED_OPTIMIZER = dict(name="sgd", lr=1e-4, momentum=0.9, weight_decay=1e-4,
                          decay_fractions=(0.7,), decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # utils/config.py: --alpha default 1.0 (README AV-MNIST: 2.5;
      # BalanceBenchmark: 0.1; MLB CREMA-D AGM.json: 1.5).
      alpha=1.0,
      # run/CREMAD_main.py: exp(alpha * min(eta - r, 10)).
      cap=10.0,
      # run/*_main.py: clip_grad_norm_(max_norm=1.0) when the fusion
      # layer's weight gradient leaves [-1, 1]; 0 turns the clipping off.
      clip=1.0,
      # BalanceBenchmark modulation_starts 0, modulation_ends 80 of 70
      # epochs; MLB starting_epoch 0, ending_epoch 1500; the authors'
      # argparse 0..20 of its default 10 epochs: always on.
      window=schedule.window_config(0.0, 1.0),
      # Outside the window: "hold" the last coefficients (the release's
      # hooks keep their scale) or use "one".
      outside_window="hold",
  ))


def shapley_weight(size: int, k: int) -> float:
  """w(s) = s! (k - s - 1)! / k!, the Shapley weight of a coalition of
  `size` other players in a game of k."""
  return (math.factorial(size) * math.factorial(k - size - 1)
          / math.factorial(k))


def coalitions(modalities: Sequence[str]) -> list[Coalition]:
  """Every non-empty coalition, in `modalities` order, the full one first."""
  order = tuple(modalities)
  out = [order]
  for size in range(len(order) - 1, 0, -1):
    out.extend(itertools.combinations(order, size))
  return out


def shapley_coefficients(modalities: Sequence[str]
                         ) -> dict[str, dict[Coalition, float]]:
  """{m: {T: c_m(T)}} with o_m = sum_T c_m(T) f(T) (step 1)."""
  order = tuple(modalities)
  k = len(order)
  if k < 2:
    raise ConfigError(f"AGM needs at least two modalities, got {order}.")
  out: dict[str, dict[Coalition, float]] = {}
  for m in order:
    out[m] = {t: (shapley_weight(len(t) - 1, k) if m in t
                  else -shapley_weight(len(t), k))
              for t in coalitions(order)}
  return out


def shapley_outputs(coalition_logits: Mapping[Coalition, Array],
                    modalities: Sequence[str]) -> dict[str, Array]:
  """o_m, the mono-modal outputs, from the logits of every coalition."""
  coeffs = shapley_coefficients(modalities)
  return {m: functools.reduce(jnp.add, [
      c * coalition_logits[t].astype(jnp.float32) for t, c in cm.items()])
          for m, cm in coeffs.items()}


def agm_scores(mono_logits: Mapping[str, Array],
               labels: Array) -> dict[str, Array]:
  """s_m: batch mean of -log(max(p_m(y), 1e-8)), detached (step 2)."""
  ceiling = -math.log(PROB_FLOOR)
  out = {}
  for m, l in mono_logits.items():
    nll = losses.per_sample_cross_entropy(jax.lax.stop_gradient(l), labels)
    out[m] = jnp.mean(jnp.minimum(nll, ceiling))
  return out


def agm_ratios(scores: Mapping[str, Array]) -> dict[str, Array]:
  """r_m = exp(k/(k-1) (mean_j s_j - s_m)) (step 3; also eta from the
  running means)."""
  names = list(scores)
  k = len(names)
  s = jnp.stack([jnp.asarray(scores[m], jnp.float32) for m in names])
  r = jnp.exp(k / (k - 1) * (jnp.mean(s) - s))
  return {m: r[i] for i, m in enumerate(names)}


def agm_coefficients(scores: Mapping[str, Array],
                     averages: Mapping[str, Array], alpha: float,
                     cap: float) -> dict[str, Array]:
  """k_m = exp(alpha min(eta_m - r_m, cap)) (step 3)."""
  r, eta = agm_ratios(scores), agm_ratios({m: averages[m] for m in scores})
  return {m: jnp.exp(alpha * jnp.minimum(eta[m] - r[m], cap)) for m in scores}


def update_averages(averages: Mapping[str, Array],
                    scores: Mapping[str, Array],
                    iteration: Array) -> dict[str, Array]:
  """sbar <- sbar (t - 1)/t + s/t with t the 1-indexed global step."""
  t = jnp.asarray(iteration, jnp.float32)
  return {m: averages[m] * (t - 1.0) / t + scores[m] / t for m in averages}


def hooked_coefficients(fresh: Mapping[str, Array],
                        held: Mapping[str, Array], active: Array, *,
                        hold: bool) -> dict[str, Array]:
  """The coefficients the hooks apply: this step's inside the window;
  outside, the last ones set (`hold`, the release) or 1."""
  return {m: jnp.where(active, fresh[m],
                       held[m] if hold else jnp.float32(1.0))
          for m in fresh}


@jax.custom_vjp
def scale_grad(x: Array, k: Array) -> Array:
  """The identity, whose backward pass multiplies the cotangent by k (the
  release's backward hook on a mono-modal output); k gets no gradient."""
  del k
  return x


def _scale_grad_fwd(x, k):
  return x, k


def _scale_grad_bwd(k, g):
  return g * k.astype(g.dtype), jnp.zeros_like(k)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def fusion_kernels(grads: Any, modalities: Sequence[str]) -> list[Array]:
  """The fusion layer's weight (gradient) the clipping test reads:
  `fusion/fc_out/kernel` if the fusion has one, else every modality's
  head kernel (late, sum)."""
  fusion = grads.get("fusion", {}) if isinstance(grads, Mapping) else {}
  if isinstance(fusion, Mapping) and "fc_out" in fusion:
    return [fusion["fc_out"]["kernel"]]
  encoders = grads.get("encoders", {}) if isinstance(grads, Mapping) else {}
  heads = [encoders[m]["head"]["kernel"] for m in modalities
           if m in encoders and "head" in encoders[m]]
  if not heads:
    raise ConfigError(
        "AGM clips by the fusion layer's weight gradient and found neither "
        "params['fusion']['fc_out'] nor per-modality heads; set "
        "--config.agm.clip=0 to train without the clipping.")
  return heads


def clip_on_fusion_range(grads: Any, clip: float,
                         modalities: Sequence[str]) -> tuple[Any, Array]:
  """Step 5: `clip_grad_norm_(all, clip)` if a fusion weight gradient
  element leaves [-clip, clip]; returns (grads, whether it clipped)."""
  if clip <= 0:
    return grads, jnp.zeros((), jnp.float32)
  peak = functools.reduce(jnp.maximum, [
      jnp.max(jnp.abs(g.astype(jnp.float32)))
      for g in fusion_kernels(grads, modalities)])
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                      for g in jax.tree.leaves(grads)))
  # torch: clip_coef = max_norm / (total_norm + 1e-6), clamped at 1.
  scale = jnp.minimum(clip / (norm + 1e-6), 1.0)
  hit = peak > clip
  scale = jnp.where(hit, scale, 1.0)
  return (jax.tree.map(lambda g: g * scale.astype(g.dtype), grads),
          hit.astype(jnp.float32))


def zeroed_inputs(inputs: Mapping[str, Array], keep: Coalition,
                  modalities: Sequence[str]) -> dict[str, Array]:
  """The batch's inputs with every modality outside `keep` set to zeros."""
  return {name: (jnp.zeros_like(x) if name in modalities and name not in keep
                 else x) for name, x in inputs.items()}


def init_state(params: Any, outputs: Any) -> dict[str, dict[str, Array]]:
  """Running mean scores (0) and the hooks' current coefficients (1)."""
  del params
  names = list(outputs.features)
  return {"score_avg": {m: jnp.zeros((), jnp.float32) for m in names},
          "coeff": {m: jnp.ones((), jnp.float32) for m in names}}


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.agm
  common.require_classification(task, "agm")
  if c.outside_window not in OUTSIDE_WINDOW:
    raise ConfigError(f"config.agm.outside_window={c.outside_window!r} must "
                      f"be one of {OUTSIDE_WINDOW}.")
  if c.clip < 0:
    raise ConfigError(f"config.agm.clip={c.clip} must be >= 0 (0: off).")
  window = schedule.method_window(config, "agm")
  alpha, cap, clip = float(c.alpha), float(c.cap), float(c.clip)
  hold = c.outside_window == "hold"

  def update(ctx):
    labels = ctx.labels
    inputs = ctx.batch["inputs"]
    state = ctx.method_state
    order = smp.modality_order(state["score_avg"], modalities)
    active = window.contains(ctx.epoch)

    def fn(params):
      full, batch_stats = ctx.forward(params)
      logits = {order: full.logits}
      for t in coalitions(order)[1:]:
        # The release runs the padded passes in inference mode (net.eval()).
        out, _ = ctx.forward(params, zeroed_inputs(inputs, t, order),
                             train=False)
        logits[t] = out.logits
      mono = shapley_outputs(logits, order)
      scores = agm_scores(mono, labels)
      fresh = agm_coefficients(scores, state["score_avg"], alpha, cap)
      coeffs = jax.lax.stop_gradient(hooked_coefficients(
          fresh, state["coeff"], active, hold=hold))
      fused = functools.reduce(jnp.add, [scale_grad(mono[m], coeffs[m])
                                         for m in order])
      value = losses.cross_entropy(fused, labels)
      return value, (full, batch_stats, scores, fresh, coeffs)

    (value, aux), grads = jax.value_and_grad(fn, has_aux=True)(ctx.params)
    full, batch_stats, scores, fresh, coeffs = aux
    grads, clipped = clip_on_fusion_range(grads, clip, order)
    params, opt_state = ctx.apply(grads)
    new_state = {
        "score_avg": update_averages(
            {m: state["score_avg"][m] for m in order}, scores, ctx.step + 1),
        "coeff": {m: jnp.where(active, fresh[m], state["coeff"][m])
                  for m in order}}
    metrics = {"student": value, "agm/clipped": clipped}
    metrics.update({f"agm/coeff/{m}": coeffs[m] for m in order})
    metrics.update({f"agm/score/{m}": scores[m] for m in order})
    return StepResult(params, opt_state, batch_stats, value, metrics, full,
                      new_state)

  return Method("agm", update, init_state=init_state)
