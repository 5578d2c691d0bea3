"""Sequential Modality Prioritization (paper Sec. 3.3, Eq. 6-7) and its
partial-suppression variant (paper Table 6).

All functions work with `epoch` and the confidences traced under `jit`; the
schedule `taus` is static (a tuple of Python ints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def modality_order(confidence: Mapping[str, Array],
                   modalities: Sequence[str] | None = None) -> tuple[str, ...]:
  """The order that breaks ties: `modalities` if given, else sorted names.

  Sorted names are the default because that is the order JAX gives a dict
  once it has passed through `jit`, so eager and jitted calls agree.
  """
  if modalities is None:
    return tuple(sorted(confidence))
  modalities = tuple(modalities)
  if sorted(modalities) != sorted(confidence):
    raise ValueError(f"modalities {modalities} do not match the confidence "
                     f"keys {sorted(confidence)}.")
  return modalities


def smp_stage(epoch: Array | int, taus: Sequence[int]) -> Array:
  """Index j of the SMP stage for a 0-indexed epoch (Eq. 6).

  Stage j < len(taus) trains only the (j+1)-th least confident modality; stage
  len(taus) is the joint phase. Epoch e is in stage j when
  `sum_{i<j} tau_i <= e < sum_{i<=j} tau_i`.
  """
  taus = _check_taus(taus)
  bounds = jnp.asarray(np.cumsum(taus), jnp.int32)
  return jnp.sum(jnp.asarray(epoch, jnp.int32) >= bounds).astype(jnp.int32)


def smp_active(epoch: Array | int, taus: Sequence[int]) -> Array:
  """True while a modality is being trained alone (before the joint phase)."""
  return jnp.asarray(epoch, jnp.int32) < int(sum(_check_taus(taus)))


def smp_kappa(confidence: Mapping[str, Array], epoch: Array | int,
              taus: Sequence[int],
              modalities: Sequence[str] | None = None) -> dict[str, Array]:
  """Modulation coefficients kappa_m in {0, 1} (Eq. 6-7).

  Modalities are ranked by confidence, least confident first; ties keep the
  modality order (see `modality_order`), so equal confidences never raise
  (the official two-modality code raises on an exact tie).

  Args:
    confidence: {modality: scalar} teacher confidences for this batch (Eq. 5).
    epoch: 0-indexed training epoch (may be traced).
    taus: k-1 non-negative epoch counts: tau_1 epochs for the least confident
      modality alone, then tau_2 for the second least confident alone, ...;
      afterwards every modality trains. The official code's single window of
      epochs 0..150 is `taus=(151,)`.
    modalities: optional order for tie-breaking.

  Returns:
    {modality: float32 scalar 0. or 1.}.
  """
  order = modality_order(confidence, modalities)
  k = len(order)
  if k < 2:
    raise ValueError(f"SMP needs at least two modalities, got {order}.")
  taus = _check_taus(taus)
  if len(taus) != k - 1:
    raise ValueError(f"taus has {len(taus)} entries but {k} modalities need "
                     f"k - 1 = {k - 1} (one per prioritised stage).")
  rho_K = jnp.stack([jnp.asarray(confidence[m], jnp.float32) for m in order])
  rank_K = jnp.argsort(rho_K, stable=True)  # ascending: rank_K[0] is weakest
  stage = smp_stage(epoch, taus)
  prioritized = rank_K[jnp.minimum(stage, k - 2)]
  one_hot_K = jax.nn.one_hot(prioritized, k, dtype=jnp.float32)
  kappa_K = jnp.where(stage < k - 1, one_hot_K, jnp.ones((k,), jnp.float32))
  return {m: kappa_K[i] for i, m in enumerate(order)}


def partial_kappa(confidence: Mapping[str, Array], strength: float,
                  modalities: Sequence[str] | None = None) -> dict[str, Array]:
  """Partial suppression of the most confident modality (paper Table 6).

  Follows OGM-GE's released rule, `kappa = 1 - tanh(strength * r)` on the
  dominant modality and 1 on the others, where r is the dominant modality's
  confidence divided by the mean confidence of the others (for two modalities
  exactly OGM-GE's ratio; the argument is `strength * r`, not
  `strength * (r - 1)`, as in the released code). Ties pick the first
  modality in order as dominant, which for two modalities matches OGM-GE's
  `else` branch. Apply it inside the SMP window (`smp_active`) and use
  kappa = 1 afterwards, as the paper's ablation does.

  Args:
    confidence: {modality: scalar} teacher confidences (Eq. 5).
    strength: OGM-GE's alpha.
    modalities: optional order for tie-breaking.

  Returns:
    {modality: float32 scalar in (0, 1]}.
  """
  order = modality_order(confidence, modalities)
  k = len(order)
  if k < 2:
    raise ValueError(f"partial suppression needs two or more modalities, got "
                     f"{order}.")
  rho_K = jnp.stack([jnp.asarray(confidence[m], jnp.float32) for m in order])
  dominant = jnp.argmax(rho_K)  # first maximum on ties
  is_dom_K = jnp.arange(k) == dominant
  others_mean = jnp.sum(jnp.where(is_dom_K, 0.0, rho_K)) / (k - 1)
  ratio = rho_K[dominant] / jnp.maximum(others_mean,
                                        jnp.finfo(jnp.float32).tiny)
  # 1 - tanh(x) == 2 * sigmoid(-2x), without the cancellation near 1.
  coeff = 2.0 * jax.nn.sigmoid(-2.0 * strength * ratio)
  kappa_K = jnp.where(is_dom_K, coeff, 1.0).astype(jnp.float32)
  return {m: kappa_K[i] for i, m in enumerate(order)}


def _check_taus(taus: Sequence[int]) -> tuple[int, ...]:
  taus = tuple(int(t) for t in taus)
  if any(t < 0 for t in taus):
    raise ValueError(f"taus must be non-negative epoch counts, got {taus}.")
  return taus
