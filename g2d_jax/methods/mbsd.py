"""MBSD: unimodal losses plus a confidence-gap-weighted KL and
response-similarity term between the modalities' predictions, as
reimplemented in GeWu-Lab/BalanceBenchmark.

Paper: BalanceBenchmark (Xu, Cui, Huang, Wang & Hu, "BalanceBenchmark: A
Survey for Multimodal Imbalance Learning", arXiv 2502.10816, 2025) lists MBSD
among its "objective" methods and points to its Section 3 for a description.
Neither the release (no docstring, README, or comment names a source) nor
the stored pages gave the original MBSD paper, so it is not cited here. The
rule below is read from the code.

Released code read: GeWu-Lab/BalanceBenchmark
`balancemm/trainer/MBSD_trainer.py` (`MBSDTrainer.training_step`, the
versions at commits 39ed569, which has branches for 2 and 3 modalities, and
f053b02, which has only the 2-modality branch and is otherwise the same),
`balancemm/models/avclassify_model.py` (`unimodality_calculate`: the
unimodal logits), `configs/trainer_config.yaml` (`MBSD`),
`configs/global_config.yaml` (the optimizer) and `balancemm/__main__.py`
(`create_config`, how a trainer is chosen). `balancemm/trainer/
MSBD_trainer.py` (class `MSBDTrainer`) is an older copy written against a
two-modality model API (`model.AVCalculate(a, v, out)`) that the current
model no longer has. For k = 2 it computes the same loss. The registry
never selects it: `create_config` strips "Trainer" from
`Main_config.trainer` and looks the rest up in `trainer_para`, which has an
`MBSD` entry and no `MSBD` entry. `create_trainer` then finds the class
named `MBSDTrainer`. So `MBSD_trainer.py` is the code the benchmark runs,
and the code followed here.

The rule. Per training batch, with z_m [B, C] the unimodal logits of
modality m (the release's `unimodal_result[m]`: for concat fusion, m's slice
of the fused layer plus bias / k), p_m = softmax(z_m), y the labels and
p_m[y] the true-class probability, for each pair (i, j) of modalities:

    s = max(p_i[y], p_j[y]),  w = min(p_i[y], p_j[y])  (the stronger and the
        weaker modality's true-class probability, per sample)
    g = (s - w) * 1[argmax p_i = y or argmax p_j = y]   (weight per sample)
    KL_ij = mean_b g_b * w_b * (log w_b - s_b)          (F.kl_div(s, w))
    RS_ij = mean_b g_b * (1/C) sum_c (r_i - r_j)_{b,c}^2

where r is the logits z for k = 2 and the probabilities p for k = 3 (see
below). Inside the epoch window the loss is

    L = CE(fused) + sum_m CE(z_m) + RS + KL,   RS, KL: means over the pairs

and outside it `L = CE(fused)` alone. The unimodal CE terms are also only
inside the window. Gradients flow through every term, including g, s and w.
The release detaches nothing: its in-place writes into fresh buffers
(`w[i] = max(...) - min(...)` for g, `ps[i]`, `pw[i]` for s and w) keep the
graph (torch's CopySlices). We follow it.

Where we follow the released code:
- The "KL" is `F.kl_div(input=ps, target=pw, reduction='none')` on two
  scalars per sample: `pw * (log pw - ps)`, where torch expects a
  log-probability as `input` but gets the probability `ps`. It is not the
  KL divergence between the two modalities' class distributions, and it is
  never positive (log pw <= 0 <= ps): minimising it pushes it further below
  zero, not towards 0. There is no temperature. We compute exactly this,
  with log pw taken from log-softmax, which has the same value and stays
  finite where pw underflows.
- Ties: Python's `max(a, b)` and `min(a, b)` on tensors return `a`, the
  earlier modality, when a == b. Here the same. At a tie g = 0, so the pair
  contributes neither a value nor a gradient.
- The RS term compares logits in the 2-modality branch and softmax
  probabilities in the 3-modality branch. `similarity_on="released"` (the
  default) does the same: logits for k = 2, probabilities for k >= 3.
  "logits" and "probabilities" force one of them for every k.
- Loss weights: the release adds every term with weight 1. `rs_weight` and
  `kl_weight` (default 1) exist for the tuning grid. `trainer_config.yaml`'s
  `MBSD.alpha` (0.1) and `method` are read by one version and used by none.
- The window: `modulation_starts 0`, `modulation_ends 80` (inclusive, via
  `current_epoch`) of `max_epochs 70`, so the whole run: (0, 1).
- Unimodal logits: the release's are the fusion's per-modality logits
  (`unimodal_heads="fusion"`, `outputs.modality_logits`): concat's slice
  plus bias / k, exactly the release; late fusion's own heads; sum fusion's
  heads plus bias / k. The release computes them for concat only, and other
  fusions raise a KeyError there. FiLM, gated and cross-attention fusions
  have no linear per-modality logits and are refused (the error names the
  fix). `unimodal_heads="separate"` instead trains a separate linear head
  per modality (`heads.py`, as MLB and MMPareto) and works with any fusion.

k >= 3 modalities: every unordered pair (i, j), with the KL and RS terms
averaged over the pairs and the unimodal CE summed over all modalities.
For k = 3 this is the release's 3-modality branch term by term (pairs
(0,1), (0,2), (1,2), `/ 3`, RS on probabilities). For k > 3 the release
would silently use only the first three modalities. One modality is
refused (there is no pair).

With SMP (`config.smp=True`), `ctx.apply` is the SMP-gated optimizer: a
gated branch's encoder and its unimodal head do not move, and shared fusion
layers train. MBSD is a loss alone, so a step that skips a frozen branch's
backward gives the same update (`skip_frozen_exact`).

Metrics: `mbsd/active` (1 inside the window), `mbsd/kl`, `mbsd/rs` (the
terms before their weights), `mbsd/weight` (the mean per-sample weight g
over samples and pairs) and `loss/unimodal/<m>`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import losses
from g2d_jax import schedule
from g2d_jax import smp
from g2d_jax.errors import ConfigError
from g2d_jax.methods import common
from g2d_jax.methods import heads
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import standard_update

Array = jax.Array

# What RS compares: the release's per-k choice, or one of them for every k.
SIMILARITY_SPACES = ("released", "logits", "probabilities")
# Fusions whose per-modality logits are linear heads on the raw features.
MBSD_FUSIONS = ("late", "sum", "concat")


# The leaderboard's tuning grid. The release has no weights on its terms,
# so none comes from it. rs_weight spans a decade each way, because RS on
# logits is unbounded while the KL term stays below 1. The second field
# switches to separate unimodal heads, as MLB and MMPareto use.
TUNING_GRID = {"rs_weight": (1.0, 0.1, 10.0),
               "unimodal_heads": ("fusion", "separate")}

# The released optimizer (BalanceBenchmark configs/global_config.yaml, the
# benchmark table's setup): AdamW, weight decay 0.01, StepLR(10, 0.1) of 30
# epochs. `create_optimizer` passes no learning rate, so torch's AdamW
# default 1e-3 applies (AdamW has no momentum).
RELEASED_OPTIMIZER = dict(name="adamw", lr=1e-3, momentum=0.9,
                          weight_decay=0.01, decay_fractions=(1 / 3, 2 / 3),
                          decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # MBSD_trainer.py: every term has weight 1 (total_loss = sum).
      kl_weight=1.0,
      rs_weight=1.0,
      # MBSD_trainer.py: RS on unimodal_result (logits) for 2 modalities,
      # on softmax predictions for 3.
      similarity_on="released",
      # avclassify_model.py unimodality_calculate: the fusion's own
      # per-modality logits (concat slice + bias / k) | "separate" heads.
      unimodal_heads="fusion",
      # trainer_config.yaml MBSD: modulation_starts 0, modulation_ends 80
      # (inclusive) of base max_epochs 70: the whole run.
      window=schedule.window_config(0.0, 1.0),
  ))


class TrueClass(NamedTuple):
  """One modality's per-sample true-class statistics, each [B]."""
  prob: Array      # softmax(z)[y]
  log_prob: Array  # log_softmax(z)[y]
  correct: Array   # argmax softmax(z) == y


def true_class(logits_BxC: Array, labels_B: Array) -> TrueClass:
  """p[y], log p[y] and whether the prediction is right, per sample."""
  log_prob = -losses.per_sample_cross_entropy(logits_BxC, labels_B)
  # The release takes argmax of the softmax (first index on ties).
  pred = jnp.argmax(jax.nn.softmax(logits_BxC.astype(jnp.float32), -1), -1)
  return TrueClass(jnp.exp(log_prob), log_prob,
                   pred == labels_B.astype(pred.dtype))


def strong_and_weak(a: TrueClass, b: TrueClass
                    ) -> tuple[Array, Array, Array]:
  """(ps, pw, log pw): per sample the larger and the smaller true-class
  probability of the two modalities, with Python's `max`/`min` tie rule (the
  first argument, `a`, on ties)."""
  ps = jnp.where(b.prob > a.prob, b.prob, a.prob)
  b_weaker = b.prob < a.prob
  pw = jnp.where(b_weaker, b.prob, a.prob)
  log_pw = jnp.where(b_weaker, b.log_prob, a.log_prob)
  return ps, pw, log_pw


def confidence_gap_weight(a: TrueClass, b: TrueClass) -> Array:
  """g [B]: `max(p_a[y], p_b[y]) - min(...)` where either modality
  predicts the true class, 0 elsewhere (not detached, as released)."""
  ps, pw, _ = strong_and_weak(a, b)
  return jnp.where(a.correct | b.correct, ps - pw, 0.0)


def released_kl(ps: Array, pw: Array, log_pw: Array) -> Array:
  """`F.kl_div(ps, pw, reduction='none')` [B]: `pw * (log pw - ps)`, torch's
  pointwise KL term with the probability `ps` as its `input`."""
  return pw * (log_pw - ps)


def response_similarity(r_a: Array, r_b: Array) -> Array:
  """RS [B]: `(1/C) sum_c (r_a - r_b)^2` per sample."""
  d = r_a.astype(jnp.float32) - r_b.astype(jnp.float32)
  return jnp.mean(jnp.square(d), axis=-1)


class PairTerms(NamedTuple):
  """The weighted terms of one pair of modalities (batch means)."""
  kl: Array
  rs: Array
  weight: Array  # mean of g


def pair_terms(logits_a: Array, logits_b: Array, labels: Array,
               on_probabilities: bool) -> PairTerms:
  """KL_ab and RS_ab for one pair: `mean_b g * KL` and `mean_b g * RS`
  (the release's `torch.mm(w, loss) / B`)."""
  a, b = true_class(logits_a, labels), true_class(logits_b, labels)
  g = confidence_gap_weight(a, b)
  kl = released_kl(*strong_and_weak(a, b))
  if on_probabilities:
    r_a = jax.nn.softmax(logits_a.astype(jnp.float32), -1)
    r_b = jax.nn.softmax(logits_b.astype(jnp.float32), -1)
  else:
    r_a, r_b = logits_a, logits_b
  rs = response_similarity(r_a, r_b)
  return PairTerms(jnp.mean(g * kl), jnp.mean(g * rs), jnp.mean(g))


def similarity_on_probabilities(similarity_on: str, k: int) -> bool:
  """Whether RS compares probabilities (else logits) for k modalities."""
  if similarity_on not in SIMILARITY_SPACES:
    raise ConfigError(f"config.mbsd.similarity_on={similarity_on!r} must be "
                      f"one of {SIMILARITY_SPACES}.")
  if similarity_on == "released":
    return k >= 3
  return similarity_on == "probabilities"


def mbsd_regularizers(unimodal_logits: Mapping[str, Array], labels: Array,
                      order: Sequence[str], similarity_on: str = "released"
                      ) -> PairTerms:
  """The KL and RS terms averaged over every pair of `order` (the
  release's `(KL1 + KL2 + KL3) / 3` for 3 modalities, the one pair for 2),
  and the mean weight."""
  if len(order) < 2:
    raise ConfigError(f"MBSD compares pairs of modalities; got {tuple(order)}"
                      ". Use a dataset with at least two modalities.")
  probs = similarity_on_probabilities(similarity_on, len(order))
  terms = [pair_terms(unimodal_logits[i], unimodal_logits[j], labels, probs)
           for i, j in itertools.combinations(order, 2)]
  # Stacked, a PairTerms of [pairs] arrays; its mean over the pairs.
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *terms)
  return PairTerms(*(jnp.mean(v) for v in stacked))


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.mbsd
  common.require_classification(task, "mbsd")
  spec = heads.multi_loss_heads("mbsd", c.unimodal_heads)
  if c.similarity_on not in SIMILARITY_SPACES:
    raise ConfigError(f"config.mbsd.similarity_on={c.similarity_on!r} must "
                      f"be one of {SIMILARITY_SPACES}.")
  fusion = config.get("model", {}).get("fusion", "late")
  heads.require_fusion_logits("mbsd", c.unimodal_heads, fusion, MBSD_FUSIONS)
  if modalities is not None and len(modalities) < 2:
    raise ConfigError(f"config.method='mbsd' compares pairs of modalities; "
                      f"the dataset has {tuple(modalities)}.")
  window = schedule.method_window(config, "mbsd")
  kl_weight, rs_weight = float(c.kl_weight), float(c.rs_weight)

  def loss(outputs, ctx):
    labels = ctx.labels
    fused, uni_ce = heads.multi_loss_terms(outputs, labels, c.unimodal_heads)
    uni = heads.unimodal_logits(outputs, c.unimodal_heads)
    order = smp.modality_order(uni, modalities)
    terms = mbsd_regularizers(uni, labels, order, c.similarity_on)
    inside = (fused + sum(uni_ce[m] for m in order)
              + rs_weight * terms.rs + kl_weight * terms.kl)
    active = window.contains(ctx.epoch)
    value = jnp.where(active, inside, fused)
    metrics = {"student": fused,
               "mbsd/active": active.astype(jnp.float32),
               "mbsd/kl": jax.lax.stop_gradient(terms.kl),
               "mbsd/rs": jax.lax.stop_gradient(terms.rs),
               "mbsd/weight": jax.lax.stop_gradient(terms.weight)}
    metrics.update({f"unimodal/{m}": uni_ce[m] for m in order})
    return value, metrics

  return Method("mbsd", standard_update(loss),
                MethodSpec(heads=spec, skip_frozen_exact=True))
