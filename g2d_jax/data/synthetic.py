"""Synthetic multimodal data with a controllable modality imbalance.

This is synthetic data, always named "synthetic"; it stands in for no real
dataset. It exists for tests and quick experiments on modality imbalance.

Classification: a class y is drawn uniformly. Modality m observes
`x_m = signal[m] * u_m[y'] + N(0, I)`, where u_m are random orthonormal class
prototypes in R^dims[m] and y' = y mod groups[m] (groups[m] = 0 means every
class has its own prototype). The noise is independent across modalities, so
their evidence adds up: fusion beats each modality alone. A modality with a
large `signal` is learnt fast (its loss falls quickly and a jointly trained
model leans on it); a small `signal` gives a slow, weak but complementary
modality that joint training tends to under-use. Setting groups[0] to a
divisor of num_classes makes the strong modality blind to some distinctions
only the weak one can make.

Regression: a target z ~ U(0, 1) and `x_m = signal[m] * (2z - 1) * w_m +
N(0, I)` with a random unit direction w_m; labels are z (float32 in [0, 1]).

Samples of split s are drawn from a generator keyed by (seed, s), and the
prototypes from one keyed by seed alone, so val/test do not change when the
training size does.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from g2d_jax import errors
from g2d_jax.data import base

NAME = "synthetic"
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def default_config() -> ml_collections.ConfigDict:
  """Settings of the synthetic generator (two modalities, strong and weak)."""
  cfg = ml_collections.ConfigDict()
  cfg.name = NAME
  # "classification" or "regression" (targets in [0, 1]).
  cfg.task = "classification"
  cfg.num_modalities = 2
  # Feature dimension per modality (length num_modalities).
  cfg.dims = (32, 32)
  # Signal strength per modality in noise standard deviations; the first
  # modality is strong/fast, the second weak/slow. With 10 classes the
  # nearest-centroid test accuracy is about 0.81 (m0), 0.40 (m1), 0.86 fused.
  cfg.signal = (2.5, 1.2)
  # Distinguishable class groups per modality (0 = all classes).
  cfg.groups = (0, 0)
  cfg.num_classes = 10
  cfg.num_train = 2000
  cfg.num_val = 500
  cfg.num_test = 1000
  cfg.seed = 0
  return cfg


def _validate(cfg) -> None:
  k = cfg.num_modalities
  if k < 1:
    raise errors.ConfigError(
        f"config.data.num_modalities={k} must be at least 1")
  for field in ("dims", "signal", "groups"):
    if len(tuple(cfg[field])) != k:
      raise errors.ConfigError(
          f"config.data.{field} has {len(tuple(cfg[field]))} entries but"
          f" num_modalities={k}; give one per modality")
  if cfg.task not in base.TASKS:
    raise errors.ConfigError(
        f"config.data.task={cfg.task!r}; use one of {base.TASKS}")
  if cfg.task == "classification":
    if cfg.num_classes < 2:
      raise errors.ConfigError(
          f"config.data.num_classes={cfg.num_classes} must be >= 2")
    for m, (d, g) in enumerate(zip(cfg.dims, cfg.groups)):
      if g < 0 or g > cfg.num_classes:
        raise errors.ConfigError(
            f"config.data.groups[{m}]={g} must be in 0..num_classes")
      if d < (g or cfg.num_classes):
        raise errors.ConfigError(
            f"config.data.dims[{m}]={d} is smaller than the number of class"
            f" prototypes ({g or cfg.num_classes}); raise it")
  if min(cfg.dims) < 1:
    raise errors.ConfigError("config.data.dims must be positive")
  for s in base.SPLIT_NAMES:
    if cfg[f"num_{s}"] < 1:
      raise errors.ConfigError(f"config.data.num_{s} must be positive")


def generate(cfg) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
  """Generates every split: split -> ({modality: float32 [N, D]}, labels)."""
  _validate(cfg)
  k = cfg.num_modalities
  names = modality_names(k)
  proto_rng = np.random.default_rng([cfg.seed, 1000])
  protos = []
  for m in range(k):
    n_proto = (cfg.groups[m] or cfg.num_classes
               if cfg.task == "classification" else 1)
    # Orthonormal prototypes: QR of a Gaussian matrix.
    q, _ = np.linalg.qr(proto_rng.standard_normal((cfg.dims[m], n_proto)))
    protos.append(q.T)
  out = {}
  for s in base.SPLIT_NAMES:
    rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[s]])
    n = cfg[f"num_{s}"]
    if cfg.task == "classification":
      labels = rng.integers(0, cfg.num_classes, size=n).astype(np.int32)
    else:
      labels = rng.random(n).astype(np.float32)
    inputs = {}
    for m in range(k):
      noise = rng.standard_normal((n, cfg.dims[m]))
      if cfg.task == "classification":
        g = cfg.groups[m] or cfg.num_classes
        signal = protos[m][labels % g]
      else:
        signal = (2.0 * labels[:, None] - 1.0) * protos[m][0]
      inputs[names[m]] = (cfg.signal[m] * signal + noise).astype(np.float32)
    out[s] = (inputs, labels)
  return out


def modality_names(k: int) -> tuple[str, ...]:
  """Modality names m0, m1, ... (m0 is the strong one by default)."""
  return tuple(f"m{i}" for i in range(k))


def load(cfg) -> base.MultimodalDataset:
  """Returns the synthetic dataset (name "synthetic")."""
  data = generate(cfg)
  names = modality_names(cfg.num_modalities)
  splits = {s: base.Split(inputs=x, labels=y, scales=dict.fromkeys(names, 1.0))
            for s, (x, y) in data.items()}
  settings = base.build_settings(cfg)
  return base.MultimodalDataset(
      name=NAME, modalities=names, splits=splits,
      num_classes=cfg.num_classes if cfg.task == "classification" else 1,
      task=cfg.task,
      fingerprint=base.make_fingerprint(NAME, settings, splits, cfg.task))


def random_dataset(n: int, shapes: dict[str, tuple[int, ...]],
                   num_classes: int, name: str = "random",
                   seed: int = 0) -> base.MultimodalDataset:
  """Uniform random uint8 inputs (scale 1/255) and labels of the given
  shapes, n per split: data with a real dataset's shapes for benchmarks,
  never for accuracy (its name says "random")."""
  rng = np.random.default_rng(seed)

  def split():
    return base.Split(
        inputs={m: rng.integers(0, 255, (n, *s), np.uint8)
                for m, s in shapes.items()},
        labels=rng.integers(0, num_classes, n).astype(np.int32),
        scales=dict.fromkeys(shapes, 1 / 255))

  splits = {s: split() for s in base.SPLIT_NAMES}
  return base.MultimodalDataset(name, tuple(shapes), splits, num_classes,
                                "classification", {})
