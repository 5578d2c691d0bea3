"""MMCosine: multi-modal cosine loss (Xu, Feng, Zhang & Hu, ICASSP 2023,
"MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual
Fine-Grained Learning").

Released code read: GeWu-Lab/MMCosine_ICASSP23 (`main_CD.py`, train_epoch
and valid; `models/fusion_modules.py`) and GeWu-Lab/BalanceBenchmark
(`balancemm/trainer/MMCosine_trainer.py`, `configs/trainer_config.yaml`,
`balancemm/models/avclassify_model.py` for the evaluation).

Per training batch, inside the epoch window, with f_m the pooled features of
modality m and W_m its linear weights in the fusion (one column w_{m,c} per
class c, no bias):

    cos_{m,c}(x) = <f_m / |f_m|, w_{m,c} / |w_{m,c}|>
    z_c(x) = sum_m s * cos_{m,c}(x)                 (s: `scaling`)
    L = CE(z, y)

so every modality's logit lies in [-s, s] whatever its feature and weight
norms, which removes the norm imbalance the paper measures between the
modalities. Outside the window the loss is CE of the fused output (the
fusion's own logits, with its bias). The release normalises with
`F.normalize` (x / max(|x|, 1e-12)), here `l2_normalize`.

W_m in our layouts (the release's is concat fusion, `fc_out.weight[:, m's
columns]` of [C, sum_m D_m]):
- concat: the rows of m in `params["fusion"]["fc_out"]["kernel"]`
  ([sum_m D_m, C], modalities in the dataset's order, as the release slices
  by the features' widths in `model.modalitys` order);
- late and sum (the default is late): m's own head,
  `params["encoders"][m]["head"]["kernel"]` ([D_m, C]). Late fusion's fused
  output is the mean of the heads, but MMCosine's logits are their *sum*
  (the release's `out_a + out_v`), s per modality as released.
FiLM, gated and cross-attention fusion have no per-modality linear map of
the raw features onto the classes, so they are refused (an error names the
fix). The weights are read from the parameters being differentiated (a
loss `with_params`, `standard_update(loss, with_params=True)`), so the loss
trains the encoders and those weights; the bias gets no gradient inside the
window (only weight decay moves it).

What the student predicts at evaluation: the fusion's ordinary output (for
concat `W [f_1; ...; f_k] + b`, for late the mean of the heads), not the
cosine logits. Both releases do this: `main_CD.py`'s `valid` takes
`prediction = softmax(out)` with `out` the fusion module's output (the cosine
`out_a + out_v` replaces `out` in `train_epoch` only), and BalanceBenchmark's
`validation_step` scores `encoder_res['output']`, the fusion output. So the
evaluation needs no model change. The per-modality accuracies we report are
the fusion's `modality_logits` (for concat m's slice with bias / k), where
`main_CD.py` reports the scaled cosines s cos_m under `--mmcosine`; the
training metrics `mmcosine/logit/<m>` give the release's diagnostic (the mean
true-class logit s cos_{m,y}, its tensorboard `data/logit_a`), and the
training accuracy of a step is that of the ordinary output too.

Where we follow the released code:
- s: the authors' release (argparse `--scaling 10`, README `--scaling 10`);
  BalanceBenchmark's config has `scaling: 15` (a tuning-grid alternative).
- The window: the authors' code applies the cosine loss on every epoch;
  BalanceBenchmark's `modulation_starts 0`, `modulation_ends 80` of
  `max_epochs 70` is also the whole run: (0, 1).
- The release's optional NCE term (`--lam`, default 0, "used in the
  supplementary") is not part of MMCosine and is not implemented.
- Per-modality logits are summed, not averaged, for any k (the release's
  `out_a + out_v`, BalanceBenchmark's `sum(Uni_res[m])` for 2 and 3
  modalities); k >= 2 modalities work unchanged.

With SMP (`config.smp=True`), `ctx.apply` is the SMP-gated optimizer: a gated
branch's encoder and head do not move; concat's `fc_out` is shared and trains.
The method is a loss alone, so skipping a frozen branch's backward gives the
same update (`skip_frozen_exact`).
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
from g2d_jax.methods import common
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import standard_update

Array = jax.Array

# Fusions with a linear map of each modality's raw features onto the classes.
MMCOSINE_FUSIONS = ("late", "sum", "concat")

# The leaderboard's tuning grid: the authors' s = 10, BalanceBenchmark's 15,
# and a softer 5.
TUNING_GRID = {"scaling": (10.0, 15.0, 5.0)}

# The authors' release (main_CD.py): SGD lr 1e-3, momentum 0.9, wd 1e-4,
# StepLR(--lr_decay_step 100, 0.1) of --epochs 200.
RELEASED_OPTIMIZER = dict(name="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4,
                          decay_fractions=(0.5,), decay_factor=0.1)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # main_CD.py: --scaling default 10 (README: --scaling 10);
      # BalanceBenchmark trainer_config.yaml MMCosine.scaling: 15.
      scaling=10.0,
      # main_CD.py: every epoch; BalanceBenchmark: modulation_starts 0,
      # modulation_ends 80 (inclusive) of max_epochs 70: the whole run.
      window=schedule.window_config(0.0, 1.0),
  ))


def l2_normalize(x: Array, axis: int, eps: float = 1e-12) -> Array:
  """`torch.nn.functional.normalize`: x / max(|x|_2, eps) along `axis`.

  Written as sqrt(max(|x|^2, eps^2)), the same value, so that a zero vector
  has a finite gradient (torch's norm has gradient 0 there; sqrt at 0 has
  none).
  """
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq, eps * eps))


def modality_weights(params: Mapping[str, Any],
                     features: Mapping[str, Array], fusion: str,
                     modalities: Sequence[str]) -> dict[str, Array]:
  """W_m [D_m, C]: modality m's linear weights in the fusion (no bias).

  Args:
    params: the student's parameters (the tree being differentiated).
    features: {m: [B, D_m]} pooled features (their widths slice concat).
    fusion: "late", "sum" or "concat".
    modalities: the model's modality order (concat's row order).
  """
  if fusion in ("late", "sum"):
    return {m: params["encoders"][m]["head"]["kernel"] for m in modalities}
  if fusion != "concat":
    raise ConfigError(f"MMCosine needs one of the fusions {MMCOSINE_FUSIONS}, "
                      f"got {fusion!r}.")
  kernel = params["fusion"]["fc_out"]["kernel"]
  out, start = {}, 0
  for m in modalities:
    stop = start + features[m].shape[-1]
    out[m] = kernel[start:stop]
    start = stop
  if start != kernel.shape[0]:
    raise ValueError(f"concat fc_out has {kernel.shape[0]} input rows, the "
                     f"features {start}.")
  return out


def cosine_logits(features: Mapping[str, Array],
                  weights: Mapping[str, Array], scaling: float
                  ) -> tuple[Array, dict[str, Array]]:
  """(z [B, C], {m: s cos_m [B, C]}): the MMCosine logits.

  cos_m = normalize(f_m, features) @ normalize(W_m, per class column), and
  z = sum_m s cos_m, summed in `weights`' order.
  """
  per = {m: scaling * (l2_normalize(features[m].astype(jnp.float32), 1)
                       @ l2_normalize(w.astype(jnp.float32), 0))
         for m, w in weights.items()}
  return functools.reduce(jnp.add, per.values()), per


def mmcosine_loss(features: Mapping[str, Array],
                  weights: Mapping[str, Array], labels: Array,
                  scaling: float) -> tuple[Array, dict[str, Array]]:
  """(CE of the cosine logits, {m: s cos_m}): the loss inside the window."""
  fused, per = cosine_logits(features, weights, scaling)
  return losses.cross_entropy(fused, labels), per


def true_class_logit(logits: Array, labels: Array) -> Array:
  """Batch mean of the true class's logit (the release's `data/logit_m`)."""
  return jnp.mean(jnp.take_along_axis(
      logits, labels[:, None].astype(jnp.int32), axis=-1))


def build(config: ml_collections.ConfigDict, task: str, *,
          modalities: Sequence[str] | None = None, **unused) -> Method:
  del unused
  c = config.mmcosine
  common.require_classification(task, "mmcosine")
  if not c.scaling > 0:
    raise ConfigError(f"config.mmcosine.scaling={c.scaling} must be > 0 (the "
                      "release's s, 10).")
  fusion = config.get("model", {}).get("fusion", "late")
  if fusion not in MMCOSINE_FUSIONS:
    raise ConfigError(
        f"config.method='mmcosine' normalises each modality's linear weights "
        f"in the fusion, which fusion {fusion!r} does not have; use "
        f"--config.model.fusion= one of {MMCOSINE_FUSIONS}.")
  window = schedule.method_window(config, "mmcosine")
  scaling = float(c.scaling)

  def loss(outputs, ctx, p):
    # Reads the class weights from the parameters being differentiated.
    labels = ctx.labels
    active = window.contains(ctx.epoch)
    order = tuple(modalities) if modalities else tuple(outputs.features)
    weights = modality_weights(p, outputs.features, fusion, order)
    cos_value, per = mmcosine_loss(outputs.features, weights, labels,
                                   scaling)
    plain = losses.cross_entropy(outputs.logits, labels)
    value = jnp.where(active, cos_value, plain)
    metrics = {"student": value,
               "mmcosine/active": active.astype(jnp.float32)}
    for m in order:
      metrics[f"mmcosine/logit/{m}"] = jax.lax.stop_gradient(
          true_class_logit(per[m], labels))
      metrics[f"mmcosine/weight_norm/{m}"] = jax.lax.stop_gradient(
          jnp.mean(jnp.linalg.norm(weights[m].astype(jnp.float32), axis=0)))
    return value, metrics

  return Method("mmcosine", standard_update(loss, with_params=True),
                MethodSpec(skip_frozen_exact=True))
