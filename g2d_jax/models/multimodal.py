"""Multimodal student and unimodal teacher models (G2D section 3, A.3, A.4).

Parameter layout (the same for `batch_stats`):

    params["encoders"][m]["backbone"]  modality m's encoder
    params["encoders"][m]["head"]      m's linear head (late, sum; teachers)
    params["encoders"][m]["proj"]      m's projection to the fusion width
                                       (gated; FiLM/cross-attention if needed)
    params["fusion"]                   parameters that mix modalities

so a modality's whole branch is addressable by name (SMP gating, optimizer
labels). Teachers (`UnimodalModel`) have the same `encoders/m/{backbone,head}`
subtree, so their features line up with the student's.

Deviations from the official code, on purpose:
- the per-modality heads of late and sum fusion (official `fc_x`, `fc_y`,
  inside the fusion module) and gated fusion's projections live in the
  modality's subtree;
- `features` is always the raw pooled encoder output, also for gated fusion
  (the official gated module returns its projections to the feature loss).
"""

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import flax.linen as nn

from g2d_jax.errors import ConfigError, DataError
from g2d_jax.models import initializers as inits
from g2d_jax.models.cnn import SmallCNN
from g2d_jax.models.fusion import (PROJECTION_MODES, BranchOutput,
                                   check_fusion_kwargs, fusion_class)
from g2d_jax.models.mlp import MLP
from g2d_jax.models.mobilenet import MobileNetV2
from g2d_jax.models.resnet import ResNet18
from g2d_jax.models.transformer import TransformerEncoder

ENCODERS: dict[str, type[nn.Module]] = {
    "resnet18": ResNet18,
    "cnn": SmallCNN,
    "mlp": MLP,
    "transformer": TransformerEncoder,
    "mobilenetv2": MobileNetV2,
}


# Keys of the parameter tree and the gating label for shared parameters: a
# modality of one of these names would make paths ambiguous.
RESERVED_NAMES = frozenset({"encoders", "fusion", "backbone", "head", "proj",
                            "shared"})


# What `compute_dtype` may be: the dtype of activations (parameters stay
# float32; `pipeline.steps.apply_model` casts).
COMPUTE_DTYPES = ("float32", "bfloat16")


class MultimodalOutput(NamedTuple):
  """Outputs of `MultimodalModel` and `UnimodalModel`.

  Attributes:
    logits: fused logits [B, C] (a teacher's head logits for UnimodalModel).
    modality_logits: {m: [B, C]} per-modality logits for reporting, following
      the official conventions of the fusion (see `g2d_jax.models.fusion`).
    features: {m: [B, D_m]} raw pooled encoder features (G2D feature loss).
  """

  logits: jax.Array
  modality_logits: dict[str, jax.Array]
  features: dict[str, jax.Array]


class ModalityBranch(nn.Module):
  """One modality's subtree: encoder and per-modality fusion parts (G2D A.3).

  Attributes:
    backbone: the encoder, `__call__(x, *, train[, mask]) -> [B, D]`.
    head_features: if set, a linear `head` (D -> head_features) is built.
    projection: "never", "if_needed" or "always": when to build a linear
      `proj` (D -> common width); see `fusion.BranchSpec`.
  """

  backbone: nn.Module
  head_features: int | None = None
  projection: str = "never"

  def __post_init__(self) -> None:
    if self.projection not in PROJECTION_MODES:
      raise ConfigError(f"projection must be one of {PROJECTION_MODES}, got "
                        f"{self.projection!r}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               proj_features: int | None = None,
               mask: jax.Array | None = None,
               present: jax.Array | None = None,
               feature_scale: jax.Array | None = None) -> BranchOutput:
    """Encodes x; `proj_features` is the common width (None: own size).

    `present` ([B] 0/1) zeroes the features of samples whose modality is
    missing, before the head and projection see them; `feature_scale`
    ([D] or [B, D]) multiplies the pooled features unit by unit, also
    before them (AMCo's unit masking).
    """
    kwargs = {} if mask is None else {"mask": mask}
    features = self.backbone(x, train=train, **kwargs)
    if present is not None:
      features = features * present.astype(features.dtype)[:, None]
    if feature_scale is not None:
      features = features * feature_scale.astype(features.dtype)
    head_logits = head_kernel = head_bias = None
    if self.head_features is not None:
      head = inits.dense(self.head_features, name="head")
      head_logits = head(features)
      params = head.variables["params"]
      head_kernel, head_bias = params["kernel"], params["bias"]
    width = features.shape[-1] if proj_features is None else proj_features
    projected = None
    if self.projection == "always" or (
        self.projection == "if_needed" and width != features.shape[-1]):
      projected = inits.dense(width, name="proj")(features)
    return BranchOutput(features, head_logits, head_kernel, head_bias,
                        projected)


class _Encoders(nn.Module):
  """The `encoders` container: each branch under its modality's name (G2D 3)."""

  # Keep the names the branches were built with (the modality names) instead
  # of Flax's default `branches_<key>` naming of adopted dict attributes.
  preserve_adopted_names = True

  branches: Mapping[str, ModalityBranch]
  modalities: tuple[str, ...]
  proj_features: int | None = None

  def __call__(self, inputs: Mapping[str, jax.Array], *, train: bool,
               masks: Mapping[str, jax.Array],
               present: Mapping[str, jax.Array] | None = None,
               feature_scale: Mapping[str, jax.Array] | None = None
               ) -> dict[str, BranchOutput]:
    """Runs the branches in modality order; {m: BranchOutput}."""
    outs = {}
    width = self.proj_features
    for m in self.modalities:
      if m not in inputs:
        raise DataError(f"Model inputs lack modality {m!r}; got keys "
                        f"{sorted(inputs)}.")
      outs[m] = self.branches[m](
          inputs[m], train=train, proj_features=width, mask=masks.get(m),
          present=None if present is None else present[m],
          feature_scale=(feature_scale or {}).get(m))
      # Without an explicit width, the first modality's features set it.
      if width is None:
        width = outs[m].features.shape[-1]
    return outs


def _orphan(module: nn.Module) -> nn.Module:
  """A parentless deep copy, which the branch adopts as "backbone"."""
  return module.copy(parent=None, name=None)


class MultimodalModel(nn.Module):
  """The multimodal student: k >= 2 encoders and a fusion head (G2D 3, A.3).

  `inputs` maps modality name to its batch (extra keys are ignored); `masks`
  optionally maps a modality to its [B, L] validity mask (sequence encoders).
  Modality order is the insertion order of `encoders` as passed (Flax sorts
  dict attributes, so it is captured in `modalities` at construction); it
  fixes concat slices, the FiLM conditioning and gating defaults, and which
  modality sets the common fusion width.

  Attributes:
    encoders: {modality: encoder module}.
    num_outputs: classes, or 1 for regression.
    fusion: one of `fusion.FUSIONS` ("late" is the paper's default).
    fusion_kwargs: options of the fusion (e.g. {"dim": 256}).
    modalities: modality order; None means the order of `encoders`.
    compute_dtype: the activations' dtype (`COMPUTE_DTYPES`), applied by
      `pipeline.steps.apply_model`.
  """

  encoders: Mapping[str, nn.Module]
  num_outputs: int
  fusion: str = "late"
  fusion_kwargs: Mapping[str, Any] | None = None
  modalities: tuple[str, ...] | None = None
  compute_dtype: str = "float32"

  def __post_init__(self) -> None:
    if not isinstance(self.encoders, Mapping) or len(self.encoders) < 2:
      raise ConfigError("MultimodalModel needs a mapping of at least two "
                        "modality encoders; use UnimodalModel for one.")
    reserved = sorted(RESERVED_NAMES & set(self.encoders))
    if reserved:
      raise ConfigError(f"Modality names {reserved} are reserved (they are "
                        f"keys of the parameter tree or the gating labels).")
    if self.modalities is None:
      # Captured before Flax freezes (and sorts) the dict attribute.
      object.__setattr__(self, "modalities", tuple(self.encoders))
    elif sorted(self.modalities) != sorted(self.encoders):
      raise ConfigError(f"modalities {tuple(self.modalities)} do not match the "
                        f"encoders {tuple(self.encoders)}.")
    else:
      object.__setattr__(self, "modalities", tuple(self.modalities))
    if self.num_outputs < 1:
      raise ConfigError(f"num_outputs must be >= 1, got {self.num_outputs}.")
    check_fusion_kwargs(self.fusion, self.fusion_kwargs or {})
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array], *, train: bool,
               masks: Mapping[str, jax.Array] | None = None,
               present: Mapping[str, jax.Array] | None = None,
               feature_scale: Mapping[str, jax.Array] | None = None
               ) -> MultimodalOutput:
    """Runs every encoder and the fusion; see `MultimodalOutput`.

    `present` ({m: [B] 0/1}) simulates missing modalities (paper Table 11):
    a missing modality's pooled features are replaced by zeros, and late
    fusion averages only the present modalities' logits. `feature_scale`
    ({m: [D] or [B, D]}, any subset of the modalities) multiplies pooled
    feature units before the heads and the fusion see them; the reported
    `features` are the scaled ones.
    """
    fusion_cls = fusion_class(self.fusion)
    spec = fusion_cls.branch_spec
    options = dict(self.fusion_kwargs or {})
    branches = {
        m: ModalityBranch(
            backbone=_orphan(self.encoders[m]),
            head_features=self.num_outputs if spec.head else None,
            projection=spec.projection, name=m, parent=None)
        for m in self.modalities
    }
    outs = _Encoders(branches=branches, modalities=self.modalities,
                     proj_features=options.get("dim"), name="encoders")(
                         inputs, train=train, masks=masks or {},
                         present=present, feature_scale=feature_scale)
    fusion_args = ({"present": present} if present is not None and
                   getattr(fusion_cls, "handles_missing", False) else {})
    logits, modality_logits = fusion_cls(
        num_outputs=self.num_outputs, name="fusion", **options)(
            outs, **fusion_args)
    return MultimodalOutput(logits, modality_logits,
                            {m: o.features for m, o in outs.items()})


class UnimodalModel(nn.Module):
  """A unimodal teacher: encoder plus linear head (G2D section 3, teachers).

  Its parameters are `encoders/<modality>/{backbone,head}`, the same subtree
  as the student's branch. `inputs` is the modality's batch or a mapping that
  contains it; `masks` likewise.

  Attributes:
    encoder: the encoder module.
    num_outputs: classes, or 1 for regression.
    modality: the modality name used in the parameter tree and outputs.
    compute_dtype: the activations' dtype (`COMPUTE_DTYPES`), applied by
      `pipeline.steps.apply_model`.
  """

  encoder: nn.Module
  num_outputs: int
  modality: str
  compute_dtype: str = "float32"

  def __post_init__(self) -> None:
    if self.modality in RESERVED_NAMES:
      raise ConfigError(f"Modality name {self.modality!r} is reserved (a key "
                        f"of the parameter tree or the gating labels).")
    if self.num_outputs < 1:
      raise ConfigError(f"num_outputs must be >= 1, got {self.num_outputs}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs: Mapping[str, jax.Array] | jax.Array, *,
               train: bool,
               masks: Mapping[str, jax.Array] | jax.Array | None = None
               ) -> MultimodalOutput:
    """Encodes the modality and applies the head; see `MultimodalOutput`."""
    m = self.modality
    if not isinstance(inputs, Mapping):
      inputs = {m: inputs}
    if masks is not None and not isinstance(masks, Mapping):
      masks = {m: masks}
    branch = ModalityBranch(backbone=_orphan(self.encoder),
                            head_features=self.num_outputs, name=m,
                            parent=None)
    out = _Encoders(branches={m: branch}, modalities=(m,), name="encoders")(
        inputs, train=train, masks=masks or {})[m]
    return MultimodalOutput(out.head_logits, {m: out.head_logits},
                            {m: out.features})


def make_encoder(kind: str, **kwargs: Any) -> nn.Module:
  """Builds an encoder of `kind` (a key of ENCODERS) with its options.

  Kinds: "resnet18", "cnn", "mlp", "transformer", "mobilenetv2".

  Raises:
    ConfigError: for an unknown kind or an option the encoder does not have.
  """
  if kind not in ENCODERS:
    raise ConfigError(f"Unknown encoder kind {kind!r}; valid kinds: "
                      f"{', '.join(ENCODERS)}.")
  cls = ENCODERS[kind]
  valid = [f.name for f in dataclasses.fields(cls)
           if f.name not in ("parent", "name")]
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ConfigError(f"Unknown option(s) {unknown} for encoder {kind!r}; "
                      f"valid options: {valid}.")
  return cls(**kwargs)


def _as_encoder(spec: nn.Module | Mapping[str, Any]) -> nn.Module:
  if isinstance(spec, nn.Module):
    return spec
  spec = dict(spec)
  if "kind" not in spec:
    raise ConfigError(f"Encoder spec {spec} needs a 'kind' "
                      f"({', '.join(ENCODERS)}).")
  return make_encoder(spec.pop("kind"), **spec)


def make_multimodal(encoders: Mapping[str, nn.Module | Mapping[str, Any]],
                    fusion: str, num_outputs: int,
                    **fusion_kwargs: Any) -> MultimodalModel:
  """Builds a MultimodalModel; encoders are modules or {"kind": ..., **opts}."""
  return MultimodalModel(
      encoders={m: _as_encoder(e) for m, e in encoders.items()},
      num_outputs=num_outputs, fusion=fusion,
      fusion_kwargs=fusion_kwargs or None)


def make_unimodal(encoder: nn.Module | Mapping[str, Any], num_outputs: int,
                  modality: str, compute_dtype: str = "float32"
                  ) -> UnimodalModel:
  """Builds a UnimodalModel; `encoder` is a module or {"kind": ..., **opts}."""
  return UnimodalModel(encoder=_as_encoder(encoder), num_outputs=num_outputs,
                       modality=modality, compute_dtype=compute_dtype)
