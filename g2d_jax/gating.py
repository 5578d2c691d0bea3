"""The SMP-gated optimizer (paper Eq. 8) as an optax transformation.

`smp_optimizer` is an `optax.partition` over per-modality parameter subtrees
(plus "shared"); each modality's copy of the inner optimizer is wrapped by
`kappa_gate`, which reads that modality's kappa from the `kappa=` extra
argument of `update`. Because kappa arrives as a (traced) argument, one
compiled training step serves every gating pattern.

    labels = modality_labels(params, ("audio", "image"))
    tx = smp_optimizer(optax.chain(optax.add_decayed_weights(1e-4),
                                   optax.sgd(1e-3, momentum=0.9)), labels)
    updates, opt_state = tx.update(grads, opt_state, params, kappa=kappa)

What a gate of 0 freezes (`scope`, `config.gating.freeze_scope`):
  "branch" (default): every parameter labelled with the modality: its
    encoder (`encoders/<m>/backbone/**`: convolutions, dense layers and the
    BatchNorm scale and bias inside it), its late/sum-fusion head
    (`encoders/<m>/head`) and any head a method adds for it (`aux/<m>`).
  "encoder": Eq. 8's theta^m literally: the encoder's parameters
    (`encoders/<m>/backbone/**`) only; the modality's fusion head and the
    method's heads for it are labelled `<m>:rest` and keep training.
Under both, the frozen branch's BatchNorm running statistics keep moving
with the training batches unless the step holds them
(`config.gating.frozen_batch_stats = "hold"`). The official code's gate
(`semantics="reference"`) is narrower than either: it zeroes the gradient
of the suppressed encoder's 4-D conv kernels before SGD, so weight decay
and momentum still move those kernels, and BatchNorm affine parameters,
running statistics and the head all train.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any
LeafPredicate = Callable[[tuple[Any, ...], Array], bool]

SHARED = "shared"
SEMANTICS = ("freeze", "reference")
SCOPES = ("branch", "encoder")
REST = ":rest"   # label suffix of a modality's non-encoder parameters


def path_keys(path: tuple[Any, ...]) -> list[Any]:
  """The dict keys (or attribute names) along a pytree path."""
  return [getattr(p, "key", getattr(p, "name", None)) for p in path]


def leaf_modality(path: tuple[Any, ...],
                  modalities: Sequence[str]) -> str | None:
  """The modality a parameter belongs to: the first key on its path that is
  a modality name (`encoders/audio/...` -> "audio"), or None (shared)."""
  for key in path_keys(path):
    if key in modalities:
      return key
  return None


def is_encoder_leaf(path: tuple[Any, ...], modality: str) -> bool:
  """Whether the leaf is in modality's encoder, `encoders/<m>/backbone/...`
  (not its fusion head or projection, nor a method's extra heads)."""
  return path_keys(path)[:3] == ["encoders", modality, "backbone"]


def rest_label(modality: str) -> str:
  """The label of a modality's non-encoder parameters under scope
  "encoder" (they follow the modality's mask, never its SMP kappa)."""
  return modality + REST


def modality_labels(params: PyTree, modalities: Sequence[str],
                    shared: str = SHARED, *, scope: str = "branch") -> PyTree:
  """Labels every parameter leaf with its modality, or `shared`.

  A leaf belongs to modality m when m is a key on its path (the first such key
  wins, `leaf_modality`), e.g.
  `params["encoders"]["audio"]["backbone"]["conv_init"]["kernel"]` ->
  "audio". Everything else (fusion layers that mix modalities) is shared.
  With `scope="encoder"` only m's encoder leaves are labelled m; its other
  leaves (fusion head, method heads) are labelled `rest_label(m)`.

  Args:
    params: the parameter pytree (nested dicts).
    modalities: modality names, each of which must occur as a key.
    shared: the label for parameters of no single modality.
    scope: "branch" or "encoder" (what a gate of 0 freezes; module doc).

  Returns:
    A pytree of the same structure as `params` with string leaves.
  """
  modalities = tuple(modalities)
  if shared in modalities:
    raise ValueError(f"a modality may not be called {shared!r}.")
  if scope not in SCOPES:
    raise ValueError(f"scope={scope!r} is not one of {SCOPES}.")

  def label(path, _):
    m = leaf_modality(path, modalities)
    if m is None:
      return shared
    if scope == "encoder" and not is_encoder_leaf(path, m):
      return rest_label(m)
    return m

  labels = jax.tree_util.tree_map_with_path(label, params)
  seen = {x.removesuffix(REST) for x in jax.tree.leaves(labels)}
  absent = [m for m in modalities if m not in seen]
  if absent:
    raise ValueError(f"modalities {absent} are not keys anywhere in the "
                     "parameter tree; expected e.g. params['encoders'][name].")
  return labels


def conv_kernel(path: tuple[Any, ...], leaf: Array) -> bool:
  """Default `reference` gate target: 4-D leaves (2-D conv kernels, HWIO).

  This is the official code's `len(grad.size()) == 4` test; BatchNorm
  parameters, biases and dense (head) kernels are not gated.
  """
  del path
  return getattr(leaf, "ndim", 0) == 4


def kappa_gate(inner: optax.GradientTransformation, modality: str, *,
               semantics: str = "freeze",
               gated_leaf: LeafPredicate = conv_kernel,
               ) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that its updates follow `kappa[modality]`.

  Semantics:
    "freeze" (paper Eq. 8): the inner update is multiplied by kappa. Where
      kappa == 0 the update is exactly zero and the inner state (momentum,
      ...) is left as it was; integer leaves of the state (step counters) still
      advance so learning-rate schedules stay on the global step. A
      fractional kappa (partial suppression) scales the step while the state
      advances with the unscaled gradient.
    "reference" (official code): the gradients of the `gated_leaf` leaves
      (conv kernels) are multiplied by kappa before the inner transform, so
      weight decay and momentum still move them and all other leaves
      (BatchNorm, heads) train normally.

  Args:
    inner: the optimizer for this modality's parameters.
    modality: the key of this modality in the `kappa` mapping.
    semantics: "freeze" or "reference".
    gated_leaf: for "reference", which leaves are gated (path, leaf) -> bool.

  Returns:
    A transformation whose `update` needs `kappa={modality: scalar, ...}`.
  """
  if semantics not in SEMANTICS:
    raise ValueError(f"semantics={semantics!r} is not one of {SEMANTICS}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if semantics == "reference" and not any(
        gated_leaf(p, x) for p, x in
        jax.tree_util.tree_leaves_with_path(params)):
      # Otherwise kappa would silently never act on this branch.
      raise ValueError(
          f"semantics='reference' gates only the {gated_leaf.__name__} "
          f"leaves (the official code's conv kernels), and modality "
          f"{modality!r} has none (an MLP or Transformer encoder?): use "
          "semantics='freeze', or pass a gated_leaf that selects its "
          "parameters.")
    return inner.init(params)

  def update_fn(updates, state, params=None, *, kappa=None, **extra_args):
    k = _lookup_kappa(kappa, modality)
    if semantics == "reference":
      updates = jax.tree_util.tree_map_with_path(
          lambda p, g: g * k.astype(g.dtype) if gated_leaf(p, g) else g,
          updates)
      return inner.update(updates, state, params, **extra_args)
    new_updates, new_state = inner.update(updates, state, params, **extra_args)
    frozen = k == 0
    new_updates = jax.tree.map(
        lambda u: jnp.where(frozen, jnp.zeros_like(u), k.astype(u.dtype) * u),
        new_updates)
    new_state = jax.tree.map(
        lambda old, new: new if _is_counter(new) else jnp.where(frozen, old,
                                                                new),
        state, new_state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def smp_optimizer(inner: optax.GradientTransformation,
                  labels: PyTree | Callable[[PyTree], PyTree], *,
                  semantics: str = "freeze",
                  gated_leaf: LeafPredicate = conv_kernel,
                  shared: str = SHARED,
                  ) -> optax.GradientTransformationExtraArgs:
  """`optax.partition` with one kappa-gated copy of `inner` per modality.

  Args:
    inner: the base optimizer (e.g. SGD with momentum and weight decay); each
      modality and the shared group get their own state of it.
    labels: the output of `modality_labels` (or a function of params giving
      it).
    semantics: "freeze" (paper Eq. 8) or "reference" (official code); see
      `kappa_gate`.
    gated_leaf: which leaves "reference" gates (default: 4-D conv kernels).
    shared: the label whose parameters are never gated.

  Returns:
    A transformation; call `update(grads, state, params, kappa=kappa)` with
    `kappa` a mapping from every modality label to a scalar (traced is fine).
  """
  if semantics not in SEMANTICS:
    raise ValueError(f"semantics={semantics!r} is not one of {SEMANTICS}.")

  def build(label_tree):
    groups = sorted(set(jax.tree.leaves(label_tree)) | {shared})
    transforms = {shared: inner}
    for m in groups:
      if m != shared:
        transforms[m] = kappa_gate(inner, m, semantics=semantics,
                                   gated_leaf=gated_leaf)
    return optax.partition(transforms, label_tree)

  if not callable(labels):
    return build(labels)

  # A label function: resolve the groups from the params at init time.
  def init_fn(params):
    return build(labels(params)).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    return build(labels(updates)).update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def group_gates(kappa: Mapping[str, Array],
                mask: Mapping[str, Array] | None = None) -> dict[str, Array]:
  """The `kappa=` argument for every label group: modality m's encoder (or
  branch) gets kappa[m] * mask[m]; its `rest_label(m)` group (scope
  "encoder") only mask[m], so a method's per-modality mask still covers
  the whole branch while SMP freezes the encoder alone."""
  out: dict[str, Array] = {}
  for m, k in kappa.items():
    keep = jnp.float32(1.0) if mask is None else jnp.asarray(mask[m],
                                                             jnp.float32)
    out[m] = jnp.asarray(k, jnp.float32) * keep
    out[rest_label(m)] = keep
  return out


def _lookup_kappa(kappa: Mapping[str, Array] | None, modality: str) -> Array:
  if kappa is None:
    raise TypeError("an SMP-gated optimizer needs the gate: call "
                    "tx.update(grads, state, params, kappa={modality: k, ...}) "
                    "(all ones trains every modality).")
  if modality not in kappa and modality.endswith(REST):
    # A modality's non-encoder group is never gated by SMP itself.
    return jnp.float32(1.0)
  if modality not in kappa:
    raise KeyError(f"kappa has no entry for modality {modality!r}; it has "
                   f"{sorted(kappa)}.")
  return jnp.asarray(kappa[modality], jnp.float32)


def _is_counter(x: Any) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.integer)
