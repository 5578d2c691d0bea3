"""InfoReg, Information Acquisition Regulation (Huang, Wei, Yang and Hu,
CVPR 2025, "Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition").

Released code read: GeWu-Lab/InfoReg_CVPR2025, `main.py` (`train_epoch`,
`main`; two stored versions, ea7b9d55 and 41d887f) and
`models/basic_model.py` (`AVClassifier`). GeWu-Lab/BalanceBenchmark has no
InfoReg trainer. Of the paper only the abstract and third-party summaries
could be read here, so the equations below are the released code's; the
summaries agree with it (a Fisher-information measure of the prime
learning window, a per-batch regulation term on the information-sufficient
modality with a coefficient that grows with the performance gap, unimodal
plus multimodal losses), but paper-vs-code differences in detail could not
be checked.

The method slows down the information-sufficient (dominant) modality while
the network is in its "prime learning window", the early phase in which
the amount of information it acquires, measured by the trace of the Fisher
information of the encoders' weights, still grows. Per training batch:

1. The objective is `L = CE(fused) + sum_m CE(z_m)`, with z_m modality m's
   logits: the fusion's own per-modality output (for concat its slice of
   the fused layer with bias/k, the release's `out_a`; for late fusion its
   head), or a separate linear head (`unimodal_heads="separate"`).
2. Scores, detached: `s_m = sum_i softmax(z_m(x_i))[y_i]` (a batch sum,
   as in the release).
3. Information amount of epoch e, accumulated over its steps:
   `T_m(e) = sum_steps sum_W mean(g_W^2)` over every kernel W (conv and
   dense weights, not biases or BatchNorm) of modality m's encoder, with g
   the regulated gradient of step 5 (the release's `fim_audio`: per layer
   the mean of the summed squared gradients, summed over layers).
4. The prime learning window, fixed for a whole epoch: with H the history
   length, T(j) = 0 for j < 0 (the release's ten leading zeros), and the
   moving means `M1 = mean_{j=e-H}^{e-1} T(j)`, `M0 = mean_{j=e-H-1}^{e-2}
   T(j)`,

       c(e) = (M1 - M0) / M1          (c(0) = 1; 0 when M1 = 0)

   and modality m may be regulated in epoch e iff `c(e) > threshold`
   (and e lies in `config.inforeg.window`, the whole run by default). Which
   T sets c: `trace_source`, see below.
5. Regulation of every modality whose score leads the mean of the others,
   `gap_m = s_m - mean_{j != m} s_j > 0`, inside its window:

       beta_m = alpha_m * exp(tanh(gap_m))          (else beta_m = 0)
       g_theta <- g_theta + beta_m * (theta - theta_ref)

   for every parameter theta of m's encoder (convs, dense layers, BatchNorm
   scale and bias), with theta_ref the parameters at the start of the
   epoch: the gradient of the proximal term `beta_m/2 ||theta -
   theta_ref||^2`, which holds the dominant encoder near where the epoch
   began.
6. One optimizer update (SGD with weight decay and momentum in the
   release) of the regulated gradient.

Everything runs inside the jitted step: the method state carries each
modality's running trace of the current epoch, the last H + 1 epoch traces,
the epoch they belong to and theta_ref; at the first step of an epoch the
step pushes the finished epoch's trace into the history and takes the
current parameters as theta_ref. There is no epoch hook, and a run resumed
mid-epoch continues from the checkpointed state (exact resume).

Where we follow the released code:
- Version: `main.py` at ea7b9d55, in our reading the later of the two
  stored versions (it adds the confidence plots and fixes the earlier one's
  `elif(score_v < score_a)`, a copy of the first condition that made the
  visual branch unreachable): threshold 0.05, 50 epochs, lr x0.1 at epoch
  30, scores and unimodal losses from the fusion head's slices (`out_a =
  a W[:, :512]^T + b/2`). The earlier version (41d887f: threshold 0.04,
  80 epochs, decay at 40) scores and trains separate unimodal heads
  (`head_audio`, `head_video`): `unimodal_heads="separate"`.
- The unimodal cross-entropies are trained (the release backpropagates
  `loss_out_v`, `loss_out_a` and `loss` into the same gradient).
- The trace is the Fisher trace's empirical estimate from the training
  gradients of the summed objective plus the proximal term (the release
  reads `weight.grad` after the regulation is added), per epoch, with the
  release's smoothing: means of the last H = 10 epochs against the H
  before, over a history padded with zeros, so c = 1 in epochs 0 and 1
  and about 1/e while the history fills. H is a fraction of the run
  (`history_fraction`: 10 of the release's 50 epochs = 0.2; at least 1),
  or `history_epochs` when set.
- The release reads the window from the *audio* encoder's trace for both
  branches (CREMA-D's audio is the modality it expects to dominate);
  `trace_source="own"` (default) reads each modality's window from its own
  encoder's trace, which is the release for its main branch (audio
  regulated); a modality name (`"audio"` on CREMA-D) reproduces the
  release literally, and `"all"` sums every encoder's trace.
- The release's coefficients differ per modality: 0.95 for audio, 0.1 for
  visual (the branch it does not expect). We use one `alpha` = 0.95 for
  every modality (the dominant one is data-dependent: on AV-MNIST it is the
  image); `alphas` (one per modality, in the dataset's order) gives the
  release's asymmetric pair, e.g. (0.95, 0.1) for (audio, visual).
- The score gap is of batch sums (not means), so tanh mostly saturates and
  beta is about alpha * e whenever a modality leads by a few samples'
  worth of probability; ties regulate no one (the release's `else`).
- theta_ref is the whole model at the epoch's start (`global_model =
  deepcopy(model)` in `train_epoch`); only encoder parameters are pulled
  toward it (`audio_net`, `visual_net`), not the heads or the fusion.
- The release's `--modulation_starts/ends` (0, 50 of 50) are unused by its
  loop: `window` defaults to the whole run and only narrows the detected
  window further.
- Fusions: late and concat give the release's per-modality logits (as for
  OGM); others are refused under `unimodal_heads="fusion"` (their
  per-modality logits are not a linear split of the fused output) and
  accepted with "separate" heads.

k >= 3 modalities: the rule generalises as written above (for k = 2 it is
exactly the release's): every modality whose score exceeds the mean score
of the others is regulated, with the gap to that mean, so with two strong
modalities and one weak both strong ones are slowed down.

With SMP (`config.smp=True`) both act: the proximal term is added to the
gradient, then the SMP-gated optimizer multiplies each modality's update by
its kappa. The method reads and rewrites gradients (the trace), so
frozen-branch skipping is off (`skip_frozen_exact=False`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import gating
from g2d_jax import schedule
from g2d_jax import smp
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods import heads
from g2d_jax.methods import ogm
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import StepResult

Array = jax.Array
TRACE_SOURCES = ("own", "all")   # or a modality name
# Fusions whose per-modality logits are the release's (as for OGM).
FUSIONS = ("late", "concat")


# The leaderboard's tuning grid: the release's two coefficients (0.95 for
# the expected dominant modality, 0.1 for the other) and its commented-out
# constant `beta = 2.5`; the thresholds of the two stored versions of
# main.py (0.05: ea7b9d55, 0.04: 41d887f).
TUNING_GRID = {"alpha": (0.95, 0.1, 2.5), "threshold": (0.05, 0.04)}

# The released optimizer (main.py ea7b9d55): SGD lr 0.002, momentum 0.9,
# wd 1e-4, StepLR(30, 0.1) of 50 epochs.
RELEASED_OPTIMIZER = dict(name="sgd", lr=0.002, momentum=0.9,
                          weight_decay=1e-4, decay_fractions=(0.6,),
                          decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # main.py train_epoch: `beta = 0.95 * torch.exp(gap)` (audio); the
      # visual branch has 0.1 (`alphas` gives both).
      alpha=0.95,
      # One coefficient per modality in the dataset's order; () = `alpha`
      # for all. The release on CREMA-D: (0.95, 0.1) for (audio, visual).
      alphas=(),
      # main.py train_epoch: `k > 0.05` (41d887f: 0.04).
      threshold=0.05,
      # main.py: means of the last 10 epoch traces (`audio_trace_list[-10:]`)
      # against the 10 before, of a 50-epoch run: 0.2 of the run.
      history_fraction=0.2,
      # An absolute history length in epochs (overrides the fraction).
      history_epochs=ml_collections.FieldReference(None, field_type=int),
      # Whose trace opens a modality's window: "own", "all" or a modality
      # name (the release: "audio", for both branches).
      trace_source="own",
      # "fusion" (ea7b9d55: the fusion's per-modality logits) | "separate"
      # (41d887f: a linear head per modality, head_audio / head_video).
      unimodal_heads="fusion",
      # main.py --modulation_starts 0 --modulation_ends 50 of 50 (unused by
      # its loop): the whole run.
      window=schedule.window_config(0.0, 1.0),
  ))


def inforeg_scores(modality_logits: Mapping[str, Array],
                   labels: Array) -> dict[str, Array]:
  """s_m: batch sum of each modality's true-class probability (detached)."""
  return ogm.ogm_scores(modality_logits, labels)


def score_gaps(scores: Mapping[str, Array]) -> dict[str, Array]:
  """gap_m = s_m - mean_{j != m} s_j (step 5; for two modalities the
  release's `score_a - score_v`)."""
  names = list(scores)
  if len(names) < 2:
    raise ConfigError(f"InfoReg needs at least two modalities, got {names}.")
  s = jnp.stack([jnp.asarray(scores[m], jnp.float32) for m in names])
  others = (jnp.sum(s) - s) / (len(names) - 1)
  return {m: s[i] - others[i] for i, m in enumerate(names)}


def inforeg_coefficients(scores: Mapping[str, Array],
                         alphas: Mapping[str, float],
                         active: Mapping[str, Array]) -> dict[str, Array]:
  """beta_m = alpha_m exp(tanh(gap_m)) where m leads and its window is
  open, else 0 (step 5)."""
  gaps = score_gaps(scores)
  return {m: jnp.where((g > 0) & active[m],
                       alphas[m] * jnp.exp(jnp.tanh(g)), 0.0)
          for m, g in gaps.items()}


def information_change(history: Array, recorded: Array) -> Array:
  """c(e) of step 4 (the release's `k`) from the last H + 1 epoch traces
  (oldest first, zeros before the run) and the number of finished epochs:
  `(M1 - M0) / M1`, 1 before any epoch has finished, 0 when M1 = 0."""
  h = jnp.asarray(history, jnp.float32)
  m1 = jnp.mean(h[1:])
  m0 = jnp.mean(h[:-1])
  change = jnp.where(m1 > 0, (m1 - m0) / jnp.where(m1 > 0, m1, 1.0), 0.0)
  return jnp.where(jnp.asarray(recorded) == 0, 1.0, change)


def window_changes(history: Mapping[str, Array], recorded: Array,
                   source: str) -> dict[str, Array]:
  """c(e) for every modality from the traces `source` names: each
  modality's own ("own"), their sum ("all", one window for all) or one
  modality's (the release: "audio", for both branches)."""
  if source == "own":
    return {m: information_change(h, recorded) for m, h in history.items()}
  total = (functools.reduce(jnp.add, history.values()) if source == "all"
           else history[source])
  shared = information_change(total, recorded)
  return {m: shared for m in history}


def information_amount(grads: Any, modalities: Sequence[str]
                       ) -> dict[str, Array]:
  """One step's share of T_m (step 3): the sum over modality m's encoder
  kernels of the mean squared gradient."""
  total = {m: jnp.zeros((), jnp.float32) for m in modalities}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    m = gating.leaf_modality(path, modalities)
    if m is None or not _is_encoder_kernel(path, m):
      continue
    total[m] = total[m] + jnp.mean(jnp.square(g.astype(jnp.float32)))
  return total


def regulate(grads: Any, params: Any, reference: Any,
             betas: Mapping[str, Array], modalities: Sequence[str]) -> Any:
  """g + beta_m (theta - theta_ref) on every encoder parameter of m (the
  gradient of the proximal term, step 5); other leaves unchanged."""
  def visit(path, g, p, r):
    m = gating.leaf_modality(path, modalities)
    if m is None or not gating.is_encoder_leaf(path, m):
      return g
    beta = jnp.asarray(betas[m], g.dtype)
    return g + beta * (p - r).astype(g.dtype)
  return jax.tree_util.tree_map_with_path(visit, grads, params, reference)


def _is_encoder_kernel(path: tuple[Any, ...], modality: str) -> bool:
  """Conv and dense weights of the encoder (the release's Conv2d/Linear
  `weight`s), not biases or BatchNorm parameters."""
  return (gating.is_encoder_leaf(path, modality)
          and gating.path_keys(path)[-1] == "kernel")


def history_length(c: ml_collections.ConfigDict, epochs: int) -> int:
  """H in epochs: `history_epochs`, else `history_fraction` of the run
  (round half up, at least 1)."""
  if c.history_epochs is not None:
    if int(c.history_epochs) < 1:
      raise ConfigError(f"config.inforeg.history_epochs={c.history_epochs} "
                        "must be >= 1.")
    return int(c.history_epochs)
  if not 0.0 < float(c.history_fraction) <= 1.0:
    raise ConfigError(
        f"config.inforeg.history_fraction={c.history_fraction} is a fraction "
        "of the student's epochs and must be in (0, 1]; for an absolute "
        "length set --config.inforeg.history_epochs instead.")
  return max(1, schedule.boundary(c.history_fraction, epochs))


def _modality_alphas(c: ml_collections.ConfigDict,
                     order: Sequence[str]) -> dict[str, float]:
  if not c.alphas:
    return {m: float(c.alpha) for m in order}
  if len(c.alphas) != len(order):
    raise ConfigError(
        f"config.inforeg.alphas={tuple(c.alphas)} needs one coefficient per "
        f"modality {tuple(order)} (in that order), or () to use "
        f"config.inforeg.alpha for every modality.")
  return {m: float(a) for m, a in zip(order, c.alphas)}


def _check_trace_source(source: str, order: Sequence[str]) -> None:
  if source not in TRACE_SOURCES and source not in order:
    raise ConfigError(
        f"config.inforeg.trace_source={source!r} must be one of "
        f"{TRACE_SOURCES} or a modality name {tuple(order)}.")


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.inforeg
  common.require_classification(task, "inforeg")
  spec = heads.multi_loss_heads("inforeg", c.unimodal_heads)
  fusion = config.get("model", {}).get("fusion", "late")
  heads.require_fusion_logits("inforeg", c.unimodal_heads, fusion, FUSIONS)
  if modalities is not None:
    _check_trace_source(c.trace_source, modalities)
    _modality_alphas(c, modalities)
  window = schedule.method_window(config, "inforeg")
  history = history_length(c, int(config.student.epochs))
  threshold = float(c.threshold)
  source = c.trace_source

  def init_state(params, outputs):
    order = smp.modality_order(outputs.features, modalities)
    _check_trace_source(source, order)
    for m in order:
      kernels = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                 if _is_encoder_kernel(p, m)]
      if not kernels:
        raise ConfigError(
            f"InfoReg measures information by the gradients of the encoder "
            f"kernels and the {m!r} encoder has none (no conv or dense "
            "weights); pick an encoder with weights or another method.")
    return {
        # The epoch the running traces belong to (-1: none yet).
        "epoch": jnp.full((), -1, jnp.int32),
        "finished": jnp.zeros((), jnp.int32),
        "trace": {m: jnp.zeros((), jnp.float32) for m in order},
        "history": {m: jnp.zeros((history + 1,), jnp.float32) for m in order},
        "reference": jax.tree.map(jnp.copy, params),
    }

  def update(ctx):
    state = ctx.method_state
    order = smp.modality_order(state["trace"], modalities)
    alphas = _modality_alphas(c, order)
    # The first step of an epoch closes the previous one.
    new_epoch = ctx.epoch != state["epoch"]
    close = new_epoch & (state["epoch"] >= 0)
    hist = {m: jnp.where(close, jnp.concatenate(
        [state["history"][m][1:], state["trace"][m][None]]),
                         state["history"][m]) for m in order}
    finished = state["finished"] + close.astype(jnp.int32)
    reference = jax.tree.map(lambda p, r: jnp.where(new_epoch, p, r),
                             ctx.params, state["reference"])
    change = window_changes(hist, finished, source)
    in_run = window.contains(ctx.epoch)
    active = {m: in_run & (change[m] > threshold) for m in order}

    def loss(outputs, ctx):
      return heads.multi_loss(outputs, ctx.labels, c.unimodal_heads)

    g = ctx.value_and_grad(loss)
    uni = heads.unimodal_logits(g.outputs, c.unimodal_heads)
    scores = inforeg_scores({m: uni[m] for m in order}, ctx.labels)
    betas = inforeg_coefficients(scores, alphas, active)
    grads = regulate(g.grads, ctx.params, reference, betas, order)
    amount = information_amount(grads, order)
    trace = {m: jnp.where(new_epoch, 0.0, state["trace"][m]) + amount[m]
             for m in order}
    params, opt_state = ctx.apply(grads)
    new_state = {"epoch": jnp.asarray(ctx.epoch, jnp.int32),
                 "finished": finished, "trace": trace, "history": hist,
                 "reference": reference}
    metrics = dict(g.metrics)
    for m in order:
      metrics[f"inforeg/beta/{m}"] = betas[m]
      metrics[f"inforeg/change/{m}"] = change[m]
      metrics[f"inforeg/score/{m}"] = scores[m]
    return StepResult(params, opt_state, g.batch_stats, g.loss, metrics,
                      g.outputs, new_state)

  return Method("inforeg", update, MethodSpec(heads=spec),
                init_state=init_state)
