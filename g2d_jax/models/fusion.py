"""Fusion heads of G2D A.3: late, sum, concat, FiLM, gated, cross-attention.

A fusion is split in two places so that every parameter that sees only one
modality lives in that modality's subtree (and SMP gating can address it):

- per-modality parts, declared by the fusion's `branch_spec` and built by
  `multimodal.ModalityBranch` under `params["encoders"][m]`: a linear `head`
  (late, sum) and/or a projection `proj` to the fusion's common width
  (gated always; FiLM and cross-attention only for modalities whose feature
  size differs from it);
- the parts that mix modalities, built by the fusion module itself under
  `params["fusion"]` (concat's `fc_out`, FiLM's `fc_<target>` conditioning
  layers and `fc_out`, gated's `fc_out`, cross-attention's `attn_<m>`,
  `norm_<m>` and `fc_out`). Late and sum have no shared parameters.

Every fusion returns the fused logits [B, C] and per-modality logits {m: [B, C]}
used to report unimodal accuracy inside the multimodal model. These follow
the official `utils.unimodal_outputs` conventions, generalised from two to k
modalities (the official "bias/2" becomes "bias/k"); see each class.

The common width `dim` of FiLM, gated and cross-attention is `dim` when given,
otherwise the feature size of the first modality (the official code has 512
everywhere, so no projection happens there for FiLM and cross-attention).
Modalities are ordered as the user's `encoders` mapping.
"""

import dataclasses
import functools
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from g2d_jax.errors import ConfigError
from g2d_jax.models import initializers as inits

PROJECTION_MODES = ("never", "if_needed", "always")


class BranchSpec(NamedTuple):
  """Per-modality parts a fusion needs inside each modality's subtree.

  Attributes:
    head: a linear head `head` (features -> num_outputs) per modality.
    projection: when a Dense `proj` (features -> common dim) is built:
      "never", "if_needed" (feature size differs from the common dim) or
      "always".
  """

  head: bool = False
  projection: str = "never"


class BranchOutput(NamedTuple):
  """What one modality's branch hands to the fusion.

  Attributes:
    features: raw pooled encoder features [B, D_m].
    head_logits: `features @ head_kernel + head_bias` [B, C], or None.
    head_kernel: the head's kernel [D_m, C], or None.
    head_bias: the head's bias [C], or None.
    projected: `proj(features)` [B, dim], or None when not projected.
  """

  features: jax.Array
  head_logits: jax.Array | None = None
  head_kernel: jax.Array | None = None
  head_bias: jax.Array | None = None
  projected: jax.Array | None = None

  @property
  def common(self) -> jax.Array:
    """Features in the fusion's common width (projected if there is `proj`)."""
    return self.features if self.projected is None else self.projected


FusionResult = tuple[jax.Array, dict[str, jax.Array]]


def _dense_params(module: nn.Module) -> tuple[jax.Array, jax.Array]:
  """Kernel and bias of a bound, already called Dense layer."""
  params = module.variables["params"]
  return params["kernel"], params["bias"]


class LateFusion(nn.Module):
  """Late fusion, the default: mean of per-modality linear heads (G2D A.3.6).

  fused = (sum_m (W_m f_m + b_m)) / k; modality m's logits are its own head
  with its full bias (official `out_a = fc_x(af)`), so the fused logits are
  exactly the mean of the per-modality logits, computed in order as
  `((l_1 + l_2) + ...) * (1 / k)` in float32.
  """

  num_outputs: int
  branch_spec: ClassVar[BranchSpec] = BranchSpec(head=True)
  # With missing modalities (`present`), absent heads are left out of the
  # mean instead of contributing their bias.
  handles_missing: ClassVar[bool] = True

  def __call__(self, outs: Mapping[str, BranchOutput],
               present: Mapping[str, jax.Array] | None = None
               ) -> FusionResult:
    """Fused logits [B, C] and {m: logits [B, C]} from the branch outputs.

    `present` ({m: [B] 0/1}) averages each sample's logits over its present
    modalities only (evaluation with missing modalities, paper Table 11).
    """
    modality_logits = {m: o.head_logits for m, o in outs.items()}
    if present is not None:
      weights = {m: present[m].astype(jnp.float32)[:, None] for m in outs}
      total = functools.reduce(
          jnp.add, [weights[m] * modality_logits[m] for m in outs])
      count = functools.reduce(jnp.add, weights.values())
      return total / jnp.maximum(count, 1.0), modality_logits
    # Multiply by 1/k rather than divide: XLA rewrites x / k into that under
    # jit anyway, so eager and jitted results agree bit for bit.
    total = functools.reduce(jnp.add, modality_logits.values())
    fused = total * (1.0 / len(outs))
    return fused, modality_logits


class SumFusion(nn.Module):
  """Summation fusion: sum of per-modality linear heads (G2D A.3.1).

  fused = sum_m (W_m f_m + b_m); modality m's logits are `W_m f_m + b_m / k`
  (official: `b/2` for two modalities).
  """

  num_outputs: int
  branch_spec: ClassVar[BranchSpec] = BranchSpec(head=True)

  def __call__(self, outs: Mapping[str, BranchOutput]) -> FusionResult:
    """Fused logits [B, C] and {m: logits [B, C]} from the branch outputs."""
    k = len(outs)
    fused = functools.reduce(jnp.add, [o.head_logits for o in outs.values()])
    modality_logits = {
        m: o.features @ o.head_kernel + o.head_bias / k
        for m, o in outs.items()
    }
    return fused, modality_logits


class ConcatFusion(nn.Module):
  """Concatenation fusion: one linear layer on [f_1; ...; f_k] (G2D A.3.2).

  fused = W [f_1; ...; f_k] + b with `fc_out` under `params["fusion"]`;
  modality m's logits use its slice of W: `W[rows of m] f_m + b / k`
  (official: halves of W with `b/2`).
  """

  num_outputs: int
  branch_spec: ClassVar[BranchSpec] = BranchSpec()

  @nn.compact
  def __call__(self, outs: Mapping[str, BranchOutput]) -> FusionResult:
    """Fused logits [B, C] and {m: logits [B, C]} from the branch outputs."""
    k = len(outs)
    fc_out = inits.dense(self.num_outputs, name="fc_out")
    fused = fc_out(jnp.concatenate([o.features for o in outs.values()], -1))
    kernel, bias = _dense_params(fc_out)
    modality_logits, start = {}, 0
    for m, o in outs.items():
      stop = start + o.features.shape[-1]
      modality_logits[m] = o.features @ kernel[start:stop] + bias / k
      start = stop
    return fused, modality_logits


def _resolve(name: str | None, outs: Mapping[str, BranchOutput],
             role: str) -> str:
  """The named modality, or the first one when None."""
  if name is None:
    return next(iter(outs))
  if name not in outs:
    raise ConfigError(f"{role} modality {name!r} is not one of {tuple(outs)}.")
  return name


class FiLMFusion(nn.Module):
  """FiLM fusion: one modality scales and shifts the others (G2D A.3.3).

  With c the conditioning modality (default: the first, official
  `x_film=True`) and h_m the features in the common width, each other
  modality t gets `gamma_t, beta_t = split(fc_t(h_c))` and
  fused = fc_out(sum_t (gamma_t * h_t + beta_t)). For two modalities this is
  the official `fc_out(gamma * y + beta)`; for k > 2 the modulated targets are
  summed, so `fc_out` stays dim -> C.

  Modality m's logits follow the official self-conditioning: every slot is
  filled with h_m, i.e. `fc_out(sum_t (gamma_t(h_m) * h_m + beta_t(h_m)))`
  with the bias divided by k. Modalities whose feature size differs from the
  common width get a per-modality projection `proj` in their subtree.

  Attributes:
    num_outputs: classes (or 1 for regression).
    dim: common width; None means the first modality's feature size.
    conditioning: the conditioning modality; None means the first.
  """

  num_outputs: int
  dim: int | None = None
  conditioning: str | None = None
  branch_spec: ClassVar[BranchSpec] = BranchSpec(projection="if_needed")

  @nn.compact
  def __call__(self, outs: Mapping[str, BranchOutput]) -> FusionResult:
    """Fused logits [B, C] and {m: logits [B, C]} from the branch outputs."""
    k = len(outs)
    cond = _resolve(self.conditioning, outs, "FiLM conditioning")
    targets = [m for m in outs if m != cond]
    h = {m: o.common for m, o in outs.items()}
    dim = h[cond].shape[-1]
    film = {t: inits.dense(2 * dim, name=f"fc_{t}") for t in targets}

    def modulate(cond_h, target_h):
      terms = []
      for t in targets:
        gamma, beta = jnp.split(film[t](cond_h), 2, axis=-1)
        terms.append(gamma * target_h[t] + beta)
      return functools.reduce(jnp.add, terms)

    fc_out = inits.dense(self.num_outputs, name="fc_out")
    fused = fc_out(modulate(h[cond], h))
    kernel, bias = _dense_params(fc_out)
    modality_logits = {
        m: modulate(h[m], {t: h[m] for t in targets}) @ kernel + bias / k
        for m in outs
    }
    return fused, modality_logits


class GatedFusion(nn.Module):
  """BiGated fusion: one modality's sigmoid gate scales the others (G2D A.3.4).

  Every modality is projected, `o_m = proj_m(f_m)` (official `fc_x`, `fc_y`,
  kept in each modality's subtree), and with g the gating modality (default:
  the first, official `x_gate=True`) fused = fc_out(sum_{t != g}
  sigmoid(o_g) * o_t); for two modalities this is the official
  `fc_out(sigmoid(fc_x(x)) * fc_y(y))`. Modality m's logits are the official
  `fc_out(o_m)` with the bias divided by k (the gate is dropped).

  Deviation: the official module returns the projections o_m as "features"
  for the feature-distillation loss; this library returns the raw encoder
  features for every fusion (`MultimodalOutput.features`), so teacher and
  student features are comparable.

  Attributes:
    num_outputs: classes (or 1 for regression).
    dim: width of the projections; None means the first modality's feature
      size (official: 512 -> 512).
    gate: the gating modality; None means the first.
  """

  num_outputs: int
  dim: int | None = None
  gate: str | None = None
  branch_spec: ClassVar[BranchSpec] = BranchSpec(projection="always")

  @nn.compact
  def __call__(self, outs: Mapping[str, BranchOutput]) -> FusionResult:
    """Fused logits [B, C] and {m: logits [B, C]} from the branch outputs."""
    k = len(outs)
    gate = _resolve(self.gate, outs, "Gated fusion gate")
    o = {m: out.projected for m, out in outs.items()}
    weight = jax.nn.sigmoid(o[gate])
    z = functools.reduce(jnp.add, [weight * o[t] for t in outs if t != gate])
    fc_out = inits.dense(self.num_outputs, name="fc_out")
    fused = fc_out(z)
    kernel, bias = _dense_params(fc_out)
    modality_logits = {m: o[m] @ kernel + bias / k for m in outs}
    return fused, modality_logits


class CrossAttentionFusion(nn.Module):
  """All-directional cross-attention fusion for k >= 2 modalities (G2D A.3.5).

  Each modality's pooled feature h_m (in the common width) is one token. Its
  query attends to the tokens of all other modalities (`attn_m`), the result
  is added back and normalised, r_m = LayerNorm_m(h_m + attn_m(h_m, others)),
  and fused = fc_out([r_1; ...; r_k]). For two modalities this is X attending
  to Y and Y to X. With one token per modality and k = 2 the softmax is over
  a single key, so each attention reduces to its value and output
  projections.

  The official code has no cross-attention; modality m's logits are defined
  like concat's: m's slice of `fc_out` applied to r_m, bias / k. Unlike the
  other heads, r_m already carries information from the other modalities.

  Attributes:
    num_outputs: classes (or 1 for regression).
    dim: common width; None means the first modality's feature size.
    num_heads: attention heads; must divide the common width.
  """

  num_outputs: int
  dim: int | None = None
  num_heads: int = 8
  branch_spec: ClassVar[BranchSpec] = BranchSpec(projection="if_needed")

  @nn.compact
  def __call__(self, outs: Mapping[str, BranchOutput]) -> FusionResult:
    """Fused logits [B, C] and {m: logits [B, C]} from the branch outputs."""
    k = len(outs)
    h = {m: o.common for m, o in outs.items()}
    dim = next(iter(h.values())).shape[-1]
    if dim % self.num_heads:
      raise ConfigError(f"cross_attention num_heads={self.num_heads} does not "
                        f"divide the common width {dim}; set num_heads or dim.")
    refined = {}
    for m in outs:
      others = jnp.stack([h[n] for n in outs if n != m], axis=1)
      attended = nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, kernel_init=inits.dense_kernel_init,
          name=f"attn_{m}")(h[m][:, None, :], others)[:, 0]
      refined[m] = nn.LayerNorm(name=f"norm_{m}")(h[m] + attended)
    fc_out = inits.dense(self.num_outputs, name="fc_out")
    fused = fc_out(jnp.concatenate(list(refined.values()), axis=-1))
    kernel, bias = _dense_params(fc_out)
    modality_logits, start = {}, 0
    for m, r in refined.items():
      modality_logits[m] = r @ kernel[start:start + dim] + bias / k
      start += dim
    return fused, modality_logits


FUSIONS: dict[str, type[nn.Module]] = {
    "late": LateFusion,
    "sum": SumFusion,
    "concat": ConcatFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
    "cross_attention": CrossAttentionFusion,
}


def fusion_class(name: str) -> type[nn.Module]:
  """The fusion module class registered under `name`; ConfigError if unknown."""
  try:
    return FUSIONS[name]
  except KeyError:
    raise ConfigError(f"Unknown fusion {name!r}; valid fusions: "
                      f"{', '.join(FUSIONS)}.") from None


def check_fusion_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
  """Raises ConfigError if `kwargs` are not options of fusion `name`."""
  valid = [f.name for f in dataclasses.fields(fusion_class(name))
           if f.name not in ("num_outputs", "parent", "name")]
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ConfigError(f"Unknown option(s) {unknown} for fusion {name!r}; "
                      f"valid options: {valid or 'none'}.")


def make_fusion(name: str, num_outputs: int, **options: Any) -> nn.Module:
  """Builds the unbound fusion `name` with its options; ConfigError if bad."""
  check_fusion_kwargs(name, options)
  return fusion_class(name)(num_outputs=num_outputs, **options)
