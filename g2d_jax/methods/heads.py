"""Heads that some balancing methods add to the multimodal student.

- "unimodal" (MLB, MMPareto): a separate linear classifier per modality on its
  pooled encoder features, besides the model's own fusion. The released code
  of both methods has these (MLB: `enc_m`'s own `Linear(512, C)`;
  MMPareto: `head_audio`, `head_video`); their cross-entropies are extra loss
  terms and their predictions give the unimodal scores.
- "shared" (MLA): one linear head shared by every modality, applied to each
  modality's features in turn (`fc_out = Linear(512, C)` in the released
  code). It replaces the model's fusion: the fused logits are the weighted
  sum of the per-modality logits of the shared head. Modalities whose
  feature width differs from the first modality's get a linear projection to
  it (the released code has 512 everywhere and needs none).

The wrapper keeps the base model's parameter layout (`params["encoders"]`,
`params["fusion"]`, via `nn.share_scope`) and adds
`params["aux"][m]` (per-modality heads and projections, which SMP gating and
the optimizer labels count as modality m's) and `params["aux"]["shared_head"]`
(shared). Its outputs extend `MultimodalOutput` with `head_inputs`
({m: [B, D]}: what the method's heads see) and `head_logits` ({m: [B, C]}).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from g2d_jax import losses
from g2d_jax.errors import ConfigError
from g2d_jax.methods.base import HEAD_KINDS
from g2d_jax.methods.base import HeadsSpec
from g2d_jax.models import initializers as inits

Array = jax.Array
AUX = "aux"
SHARED_HEAD = "shared_head"


class MethodOutput(NamedTuple):
  """`MultimodalOutput` plus the method heads' inputs and logits.

  Attributes:
    logits: fused logits [B, C] (the base model's, or MLA's weighted sum).
    modality_logits: {m: [B, C]} per-modality logits for reporting (the base
      fusion's conventions, or the shared head's for "shared").
    features: {m: [B, D_m]} raw pooled encoder features.
    head_inputs: {m: [B, D]} inputs of the method's heads (features, or
      their projection for "shared").
    head_logits: {m: [B, C]} the method heads' logits.
  """
  logits: Array
  modality_logits: dict[str, Array]
  features: dict[str, Array]
  head_inputs: dict[str, Array]
  head_logits: dict[str, Array]


def linear(params: Mapping[str, Array], x_BxD: Array) -> Array:
  """A Dense layer's function from its params (used by MLA's sub-updates)."""
  return x_BxD @ params["kernel"] + params["bias"]


class _Aux(nn.Module):
  """The `aux` container: per-modality heads/projections, shared head."""

  kind: str
  num_outputs: int
  modalities: tuple[str, ...]

  @nn.compact
  def __call__(self, features: Mapping[str, Array]
               ) -> tuple[dict[str, Array], dict[str, Array]]:
    if self.kind == "unimodal":
      inputs = dict(features)
      logits = {m: inits.dense(self.num_outputs, name=m)(features[m])
                for m in self.modalities}
      return inputs, logits
    width = features[self.modalities[0]].shape[-1]
    inputs = {}
    for m in self.modalities:
      f = features[m]
      if f.shape[-1] != width:
        f = _Proj(width, name=m)(f)
      inputs[m] = f
    head = inits.dense(self.num_outputs, name=SHARED_HEAD)
    return inputs, {m: head(inputs[m]) for m in self.modalities}


class _Proj(nn.Module):
  """`aux/<m>/proj`: projection of modality m to the shared head's width."""

  width: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return inits.dense(self.width, name="proj")(x)


class WithMethodHeads(nn.Module):
  """The student with a method's extra heads (see the module docstring).

  Attributes:
    base: the `MultimodalModel`.
    spec: which heads.
    num_outputs: number of classes.
    modalities: modality order (the base model's).
  """

  base: nn.Module
  spec: HeadsSpec
  num_outputs: int
  modalities: tuple[str, ...]

  @property
  def compute_dtype(self) -> str:
    """The base model's activation dtype (`pipeline.steps.apply_model`)."""
    return getattr(self.base, "compute_dtype", "float32")

  def setup(self) -> None:
    if self.spec.kind not in HEAD_KINDS:
      raise ConfigError(f"heads kind {self.spec.kind!r} is not one of "
                        f"{HEAD_KINDS}.")
    nn.share_scope(self, self.base)
    self.aux = _Aux(self.spec.kind, self.num_outputs, self.modalities,
                    name=AUX)

  def __call__(self, inputs: Mapping[str, Array], *, train: bool,
               masks: Mapping[str, Array] | None = None,
               present: Mapping[str, Array] | None = None) -> MethodOutput:
    """`present` ({m: [B] 0/1}): missing modalities, as `MultimodalModel`;
    the shared head's fused logits then weigh only present modalities."""
    kwargs = {} if present is None else {"present": present}
    out = self.base(inputs, train=train, masks=masks, **kwargs)
    head_inputs, head_logits = self.aux(out.features)
    if self.spec.kind == "unimodal":
      return MethodOutput(out.logits, out.modality_logits, out.features,
                          head_inputs, head_logits)
    weights = fusion_weights(self.spec, self.modalities)
    if present is not None:
      w = {m: wm * present[m].astype(jnp.float32)[:, None]
           for m, wm in zip(self.modalities, weights)}
      fused = sum(w[m] * head_logits[m] for m in self.modalities) / (
          jnp.maximum(sum(w.values()), 1e-12))
      return MethodOutput(fused, dict(head_logits), out.features, head_inputs,
                          head_logits)
    fused = functools.reduce(operator.add, [
        w * head_logits[m] for m, w in zip(self.modalities, weights)])
    return MethodOutput(fused, dict(head_logits), out.features, head_inputs,
                        head_logits)


def fusion_weights(spec: HeadsSpec, modalities: Sequence[str]
                   ) -> tuple[float, ...]:
  """The inference weights of the "shared" head's per-modality logits."""
  if spec.fusion_weights is None:
    return tuple(1.0 / len(modalities) for _ in modalities)
  if len(spec.fusion_weights) != len(modalities):
    raise ConfigError(f"fusion_weights {spec.fusion_weights} needs one weight "
                      f"per modality {tuple(modalities)}.")
  return tuple(float(w) for w in spec.fusion_weights)


def wrap(base: nn.Module, spec: HeadsSpec | None, num_outputs: int,
         modalities: Sequence[str]) -> nn.Module:
  """`base` with the method's heads, or `base` itself when `spec` is None."""
  if spec is None:
    return base
  return WithMethodHeads(base=base, spec=spec, num_outputs=num_outputs,
                         modalities=tuple(modalities))


def unimodal_logits(outputs: Any, source: str) -> dict[str, Array]:
  """Per-modality logits a method scores and trains as its unimodal heads.

  Args:
    outputs: model outputs.
    source: "separate" (the method's own heads, `head_logits`) or "fusion"
      (the fusion's per-modality logits, e.g. late fusion's heads).
  """
  if source == "separate":
    if not hasattr(outputs, "head_logits"):
      raise ConfigError("unimodal_heads='separate' needs the method's heads "
                        "on the student (build it with methods.heads.wrap).")
    return outputs.head_logits
  if source == "fusion":
    return outputs.modality_logits
  raise ConfigError(f"unimodal_heads={source!r} must be 'separate' or "
                    "'fusion'.")


SOURCES = ("separate", "fusion")


def multi_loss_heads(method: str, source: str) -> HeadsSpec | None:
  """The extra heads of a multi-loss method whose unimodal logits come from
  `source` ("separate": its own heads; "fusion": the fusion's)."""
  if source not in SOURCES:
    raise ConfigError(f"config.{method}.unimodal_heads={source!r} must be one "
                      f"of {SOURCES}.")
  return HeadsSpec("unimodal") if source == "separate" else None


def require_fusion_logits(method: str, source: str, fusion: str,
                          allowed: tuple[str, ...]) -> None:
  """ConfigError unless `fusion` provides the per-modality logits a
  multi-loss method trains when its unimodal logits come from the fusion
  (`source="fusion"`); separate heads work with any fusion."""
  if source == "fusion" and fusion not in allowed:
    raise ConfigError(
        f"config.method={method!r} trains the fusion's per-modality logits "
        f"(unimodal_heads='fusion'), which fusion {fusion!r} does not "
        f"provide in the released form; use --config.model.fusion= one of "
        f"{allowed}, or --config.{method}.unimodal_heads=separate.")


def multi_loss_terms(outputs: Any, labels: Array, source: str
                     ) -> tuple[Array, dict[str, Array]]:
  """(CE of the fused logits, {m: CE of modality m's unimodal logits}): the
  terms of the multi-loss objective of MLB and MMPareto."""
  fused = losses.cross_entropy(outputs.logits, labels)
  uni = {m: losses.cross_entropy(l, labels)
         for m, l in unimodal_logits(outputs, source).items()}
  return fused, uni


def multi_loss(outputs: Any, labels: Array, source: str
               ) -> tuple[Array, dict[str, Array]]:
  """`CE(fused) + sum_m CE(unimodal_m)` and its terms as metrics
  (`student`, `unimodal/<m>`)."""
  fused, uni = multi_loss_terms(outputs, labels, source)
  metrics = {"student": fused, **{f"unimodal/{m}": v for m, v in uni.items()}}
  return fused + sum(uni.values()), metrics


def zeros_like_outputs(outputs: Any) -> Any:
  """A zero cotangent with the structure of the model outputs."""
  return jax.tree.map(jnp.zeros_like, outputs)
