"""Sample-level modality valuation and re-sampling (Wei, Feng, Wang and Hu,
CVPR 2024, "Enhancing Multimodal Cooperation via Sample-level Modality
Valuation"; arXiv 2309.06255).

Released code read: the authors' GeWu-Lab/Valuate-and-Enhance-Multimodal-
Cooperation (`code/sample_level.py`: `execute_modulation`, `train_epoch`,
`warmup_epoch`, `get_arguments`; `code/datasets/dataloader.py`:
`AV_KS_Dataset_sample_level`; `code/models/models.py`: `AVClassifier`,
`exec_drop`; `code/modality_level.py`), and the re-implementation in
GeWu-Lab/BalanceBenchmark (`balancemm/trainer/Sample_trainer.py`,
`balancemm/evaluation/modalitys.py`: `Calculate_Shapley_Sample`,
`balancemm/datasets/__init__.py`: `create_dataset_sample_level`,
`SampleDataset`; `balancemm/models/avclassify_model.py`: `validation_step`
with `limit_modality`). The stored BalanceBenchmark
`configs/trainer_config.yaml` versions have no `Sample` entry, so no
BalanceBenchmark default is taken from there.

The rule, for a sample x with label y and modalities M (k = |M| >= 2):

1. Valuation, in inference mode: for every non-empty coalition S of M, the
   fused prediction f(S) of the model with the modalities outside S
   removed (their pooled features zeroed before the heads and the fusion,
   the release's `exec_drop`), and the value

       v(S) = |S| * [argmax f(S)(x) = y]          (`value="cardinality"`)

   (the authors' `value_all = 2.0`, `value_a = value_v = 1.0`; an empty
   coalition is worth v({}) = 0).
2. Each modality's Shapley value, per sample:

       phi_m = sum_{S in M - {m}} w(|S|) [v(S + {m}) - v(S)],
       w(s) = s! (k - s - 1)! / k!

   for two modalities phi_a = (v(a) + v(av) - v(v)) / 2, the release's
   `contrib_a = (value_a + value_all - value_v) / 2`, so phi is one of
   -0.5, 0, 0.5, 1, 1.5, and sum_m phi_m = v(M).
3. Re-sampling frequency, the release's bands (`dataloader.py`):

       c(phi) = 1 if 0.4 < phi < 0.9,  2 if -0.1 < phi < 0.4,
                3 if phi < -0.1,        0 otherwise

   (`thresholds=(0.9, 0.4, -0.1)`, `copies=(1, 2, 3)`; the borders
   themselves get no copy, as the release's strict inequalities).
4. Training: the release adds, for every sample i and modality m, c(phi_m)
   copies of the sample in which only m is present (the other modalities'
   features zeroed, the `drop` flag), to the N originals, and trains one
   epoch on the shuffled union with the fused cross-entropy. Here the data
   order belongs to the pipeline, so each sample's copies join the step
   that trains the sample, as per-sample loss weights on the passes with
   one modality kept:

       L = 1/B sum_i [ CE(f(M)(x_i), y_i)
                       + sum_m c(phi_m(x_i)) CE(f({m})(x_i), y_i) ]

   This gives every item of the release's re-sampled epoch (an original or
   a copy) the same total weight per epoch, lr / B: the sum of an epoch's
   SGD updates is the release's to first order. What differs: an epoch has
   N / B steps instead of (N + copies) / B (fewer, larger steps; Adam's
   per-step normalisation makes the loss scale moot); a sample's copies sit
   in its own batch rather than being shuffled into others; and the
   BatchNorm statistics kept are those of the full pass (the release's
   batches mix copies into the statistics; with the default feature drop
   the copies' encoder inputs are the sample's own, so only the batch
   composition differs).

Outside the epoch window (`config.valuation.window`, default the
release's `--warmup 5` of `--epochs 60`: epochs 5.. of 60, (5/60, 1)) every
c is 0 and the loss is the fused cross-entropy (the release's
`warmup_epoch`); the valuation passes still run (multiplied by zero: no
forward sits in a conditional).

Where we follow the released code (and which one):
- When the valuation runs. Both releases value every training sample once
  per epoch, before the epoch trains, with the model the previous epoch
  left (`execute_modulation` after epoch e - 1, `Calculate_Shapley_Sample`
  at the start of epoch e), then rebuild the training set. Here each
  sample is valued in the step that trains it, with that step's parameters
  and running BatchNorm statistics (inference mode, as the releases'
  `model.eval()`): the values are fresher by up to one epoch. Valuing with
  the epoch-start model would need either an epoch hook that can run the
  model with modalities removed (`EpochHook.accumulate` sees only the full
  pass's outputs, not the parameters) or the initial BatchNorm statistics
  in `init_state` (to keep an epoch-start copy of parameters and
  statistics in the method state); the contract has neither.
- The value function is the authors' (and the paper's) v(S) = |S| 1[correct]
  (`value="cardinality"`); BalanceBenchmark's `Calculate_Shapley_Sample`
  uses v(S) = 1[correct] (`value="correct"`), which halves phi for two
  modalities, so its bands then give a sample every modality predicts
  correctly (phi = 0.5 each) one copy per modality, where the authors' give
  none (phi = 1).
- The bands: the authors' (0.9, 0.4, -0.1); BalanceBenchmark's upper border
  is 1 (`0.4 < shapley_value < 1`): `thresholds=(1.0, 0.4, -0.1)`.
- Removing a modality: the authors zero its pooled features after the
  encoder (`exec_drop` for the valuation, `drop` in `AVClassifier.forward`
  for the copies; `drop="features"`, via `feature_scale`); BalanceBenchmark
  zeroes its input and runs the encoder on zeros (`padding` in
  `validation_step`, `SampleDataset` for the copies; `drop="inputs"`). With
  input zeros the copies' train-mode BatchNorm statistics are not kept.
- Re-sampling is the sample-level method (the authors' `sample_level.py`,
  BalanceBenchmark's `method='Sample-level'`). The coarser modality-level
  method (`modality_level.py`: one copy, keeping the modality with the
  larger gap 1 - mean phi, for |gap_a - gap_v| 2/3 alpha N samples drawn
  with replacement) is not implemented.
- BalanceBenchmark re-samples only the first N - N mod 64 samples (its
  loop bound) and hard-codes batch 64 for the re-sampled loader; neither
  is reproduced. The authors' `modulation_ends` has no counterpart (both
  re-sample to the end of the run).

k >= 3 modalities: the Shapley value of step 2 with its general weights
(BalanceBenchmark's `Calculate_Shapley_Sample`, which sums over every
coalition without m), and a copy keeps m alone (BalanceBenchmark's
`SampleDataset` zeroes every other modality). Under "cardinality"
sum_m phi_m = k when the fused prediction is right, so phi = 1 remains a
modality's fair share and the bands keep their meaning for any k; under
"correct" the share is 1/k. Cost per step: 2^k - 1 inference passes
(forward only) for the valuation and k + 1 train-mode passes with their
backward (the full one and one per kept modality): 3 + 3 for two
modalities, 7 + 4 for three. Above `max_modalities` (4: 15 + 5 passes) the
method is refused with an error naming the fix.

With SMP (`config.smp=True`) the loss is trained through the SMP-gated
optimizer like any loss (the method rewrites no gradient, so a step that
skips the frozen branches' backward is exact).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax import losses
from g2d_jax import schedule
from g2d_jax.errors import ConfigError
from g2d_jax.methods import agm
from g2d_jax.methods import common
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import StepResult

Array = jax.Array
Coalition = tuple[str, ...]
VALUES = ("cardinality", "correct")
DROPS = ("features", "inputs")


# The leaderboard's tuning grid: the warm-up before the valuation starts
# (the authors' "key parameter" --warmup: 5 of 60 epochs; none; and
# BalanceBenchmark's usual modulation_starts 10 of max_epochs 70), and the
# value function (the authors' |S| 1[correct], BalanceBenchmark's
# 1[correct]).
TUNING_GRID = {"valuation.window.start": (5 / 60, 0.0, 10 / 70),
               "value": ("cardinality", "correct")}

# The released optimizer (code/sample_level.py argparse defaults): Adam,
# lr 5e-5, betas (0.9, 0.999), coupled L2 weight decay 1e-4, StepLR(30,
# 0.1) of 60 epochs. (modality_level.py uses SGD 1e-3 instead.)
RELEASED_OPTIMIZER = dict(name="adam", lr=5e-5, momentum=0.9,
                          weight_decay=1e-4, decay_fractions=(0.5,),
                          decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # sample_level.py: value_all = 2.0, value_a = value_v = 1.0, i.e.
      # v(S) = |S| 1[correct]; BalanceBenchmark: "correct", 1[correct].
      value="cardinality",
      # dataloader.py, AV_KS_Dataset_sample_level: 0.4 < c < 0.9 -> 1 copy,
      # -0.1 < c < 0.4 -> 2, c < -0.1 -> 3 (BalanceBenchmark: 1.0, 0.4,
      # -0.1). Band j is thresholds[j + 1] < phi < thresholds[j].
      thresholds=(0.9, 0.4, -0.1),
      copies=(1, 2, 3),
      # models.py: the removed modality's pooled features are zeroed
      # (exec_drop, drop); BalanceBenchmark zeroes the inputs ("inputs").
      drop="features",
      # sample_level.py: --warmup 5 of --epochs 60 (plain training in
      # epochs 0..4, re-sampled data from epoch 5 to the end): (5/60, 1).
      window=schedule.window_config(5 / 60, 1.0),
      # The valuation costs 2^k - 1 inference passes per step: refuse more
      # modalities than this (4: 15 passes) unless raised.
      max_modalities=4,
  ))


def coalition_values(correct: Mapping[Coalition, Array],
                     value: str = "cardinality") -> dict[Coalition, Array]:
  """v(S) per sample from whether f(S) predicts the label ([B] bools):
  |S| 1[correct] ("cardinality", the authors') or 1[correct] ("correct",
  BalanceBenchmark's)."""
  if value not in VALUES:
    raise ConfigError(f"value={value!r} must be one of {VALUES}.")
  return {t: c.astype(jnp.float32) * (len(t) if value == "cardinality"
                                      else 1.0)
          for t, c in correct.items()}


def shapley_contributions(values: Mapping[Coalition, Array],
                          modalities: Sequence[str]) -> dict[str, Array]:
  """phi_m = sum_{S without m} w(|S|) [v(S + m) - v(S)] per sample, with
  v({}) = 0 and `values` keyed by coalitions in `modalities` order."""
  order = tuple(modalities)
  k = len(order)
  if k < 2:
    raise ConfigError(f"modality valuation needs at least two modalities, "
                      f"got {order}.")
  out = {}
  for m in order:
    terms = []
    for t in agm.coalitions(order):
      if m not in t:
        continue
      rest = tuple(n for n in t if n != m)
      without = values[rest] if rest else jnp.zeros_like(values[t])
      terms.append(agm.shapley_weight(len(rest), k) * (values[t] - without))
    out[m] = functools.reduce(jnp.add, terms)
  return out


def resample_copies(phi: Array, thresholds: Sequence[float] = (0.9, 0.4, -0.1),
                    copies: Sequence[int] = (1, 2, 3)) -> Array:
  """c(phi): copies[j] where thresholds[j + 1] < phi < thresholds[j] (the
  last band is open below), 0 elsewhere and on the borders (float32)."""
  check_bands(thresholds, copies)
  out = jnp.zeros(jnp.shape(phi), jnp.float32)
  for j, (upper, n) in enumerate(zip(thresholds, copies, strict=True)):
    inside = phi < upper
    if j + 1 < len(thresholds):
      inside = inside & (phi > thresholds[j + 1])
    out = out + jnp.where(inside, jnp.float32(n), 0.0)
  return out


def check_bands(thresholds: Sequence[float], copies: Sequence[int]) -> None:
  """ConfigError unless the thresholds decrease strictly and every band has
  a whole, non-negative number of copies."""
  t, c = tuple(float(x) for x in thresholds), tuple(copies)
  if not t or len(t) != len(c):
    raise ConfigError(f"config.valuation.thresholds={t} and copies={c} must "
                      "be non-empty and of the same length (one number of "
                      "copies per band).")
  if any(a <= b for a, b in zip(t, t[1:])):
    raise ConfigError(f"config.valuation.thresholds={t} must decrease "
                      "strictly (band j is thresholds[j+1] < phi < "
                      "thresholds[j]).")
  if any(int(n) != n or n < 0 for n in c):
    raise ConfigError(f"config.valuation.copies={c} must be whole numbers "
                      ">= 0.")


def valuation_loss(full_logits: Array, kept_logits: Mapping[str, Array],
                   copies: Mapping[str, Array], labels: Array
                   ) -> tuple[Array, Array, Array]:
  """(L, mean CE of the full pass, mean copies term): L = 1/B sum_i
  [CE(full_i) + sum_m copies_m,i CE(kept_m,i)] (step 4)."""
  full = losses.per_sample_cross_entropy(full_logits, labels)
  extra = functools.reduce(jnp.add, [
      jax.lax.stop_gradient(copies[m]) * losses.per_sample_cross_entropy(
          kept_logits[m], labels) for m in kept_logits])
  return jnp.mean(full + extra), jnp.mean(full), jnp.mean(extra)


def removal(keep: Coalition, modalities: Sequence[str], drop: str,
            inputs: Mapping[str, Array]) -> dict[str, Any]:
  """`ctx.forward` keyword arguments that remove every modality outside
  `keep`: their pooled features times 0 ("features") or zero inputs
  ("inputs"); {} for the full coalition."""
  gone = [m for m in modalities if m not in keep]
  if not gone:
    return {}
  if drop == "features":
    return {"feature_scale": {m: jnp.zeros((), jnp.float32) for m in gone}}
  if drop == "inputs":
    return {"inputs": agm.zeroed_inputs(inputs, keep, modalities)}
  raise ConfigError(f"config.valuation.drop={drop!r} must be one of "
                    f"{DROPS}.")


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.valuation
  common.require_classification(task, "valuation")
  if c.value not in VALUES:
    raise ConfigError(f"config.valuation.value={c.value!r} must be one of "
                      f"{VALUES}.")
  if c.drop not in DROPS:
    raise ConfigError(f"config.valuation.drop={c.drop!r} must be one of "
                      f"{DROPS}.")
  thresholds = tuple(float(x) for x in c.thresholds)
  copies_per_band = tuple(int(n) for n in c.copies)
  check_bands(thresholds, tuple(c.copies))
  if not modalities:
    raise ConfigError("config.method='valuation' needs the dataset's "
                      "modality order (build(..., modalities=...)).")
  order = tuple(modalities)
  k = len(order)
  if k < 2:
    raise ConfigError(f"config.method='valuation' values modalities against "
                      f"each other and needs at least two; got {order}.")
  if k > int(c.max_modalities):
    raise ConfigError(
        f"config.method='valuation' computes exact Shapley values over "
        f"2^k - 1 = {2 ** k - 1} coalitions per step for the {k} modalities "
        f"{order} (and {k + 1} passes with a backward); it is capped at "
        f"config.valuation.max_modalities={c.max_modalities}. Train on "
        f"fewer modalities (e.g. --config.data.views for mfeat) or raise "
        f"--config.valuation.max_modalities={k}.")
  window = schedule.method_window(config, "valuation")
  value, drop = str(c.value), str(c.drop)

  def update(ctx):
    labels = ctx.labels
    inputs = ctx.batch["inputs"]
    active = window.contains(ctx.epoch)
    # Steps 1-3 with this step's parameters, in inference mode (the
    # releases' model.eval()); no gradient flows from them.
    correct = {}
    for t in agm.coalitions(order):
      out, _ = ctx.forward(ctx.params, train=False,
                           **removal(t, order, drop, inputs))
      correct[t] = jnp.argmax(out.logits, axis=-1) == labels
    phi = jax.lax.stop_gradient(shapley_contributions(
        coalition_values(correct, value), order))
    copies = {m: jnp.where(active, resample_copies(
        phi[m], thresholds, copies_per_band), 0.0) for m in order}

    def fn(params):
      full, batch_stats = ctx.forward(params)
      kept = {m: ctx.forward(params, **removal((m,), order, drop,
                                               inputs))[0].logits
              for m in order}
      total, ce_full, extra = valuation_loss(full.logits, kept, copies,
                                             labels)
      return total, (full, batch_stats, ce_full, extra)

    (total, aux), grads = jax.value_and_grad(fn, has_aux=True)(ctx.params)
    full, batch_stats, ce_full, extra = aux
    params, opt_state = ctx.apply(grads)
    metrics = {"student": ce_full, "valuation/extra": extra,
               "valuation/active": active.astype(jnp.float32)}
    for m in order:
      # The release prints each modality's mean contribution (cona, conv).
      metrics[f"valuation/phi/{m}"] = jnp.mean(phi[m])
      metrics[f"valuation/copies/{m}"] = jnp.mean(copies[m])
    return StepResult(params, opt_state, batch_stats, total, metrics, full,
                      ctx.method_state)

  return Method("valuation", update, MethodSpec(skip_frozen_exact=True))
