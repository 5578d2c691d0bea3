"""Epoch windows of a run, given as fractions of it or as absolute epochs.

Every method that acts in a window of epochs (SMP's stages, OGM/OGM-GE's,
PMR's and MLB's modulation windows, the learning-rate decay points) states
it as a *fraction of the student's epochs*, so the same config scales from
`paper` (300 epochs) to `quick` (8) and to any user protocol the way the
release's own proportion says. An absolute epoch, when given, overrides the
fraction. These functions turn either into epochs; `pipeline.config.
resolve_schedule` applies them to a whole config and is what every run's
`summary.json` records.

The rounding rule, the same everywhere: a fraction f of E epochs is the
epoch boundary `round_half_up(f * E)`. A window [start, end) of fractions is
active on epochs `round(start E) <= e < round(end E)`; SMP's stages are
cut at the rounded cumulative sums of their fractions (so the stages always
add up to the rounded total). The releases' windows are inclusive epoch
ranges of a 100- or 300-epoch run; their fractions count the last epoch in:
OGM-GE's epochs 0..50 of 100 are the window (0, 0.51), G2D's SMP epochs
0..150 of 300 the fraction 151/300, and both give exactly the release's
epochs back at the release's length.

    w = window_config(0.0, 0.51)          # a method's `window` sub-config
    resolve_window(w, 8)                   # Window(start=0, stop=4)
    w.end_epoch = 2                        # absolute, inclusive (release style)
    resolve_window(w, 8)                   # Window(start=0, stop=3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from g2d_jax.errors import ConfigError

Array = jax.Array

# A window's config has exactly these fields (how `method_windows` finds them).
WINDOW_FIELDS = frozenset({"start", "end", "start_epoch", "end_epoch"})


def window_config(start: float = 0.0, end: float = 1.0
                  ) -> ml_collections.ConfigDict:
  """A window as fractions [start, end) of the run; `start_epoch` /
  `end_epoch` (absolute, 0-indexed, end inclusive as in the releases, -1 =
  to the end of the run) override them when set."""
  return ml_collections.ConfigDict(dict(
      start=float(start),
      end=float(end),
      start_epoch=ml_collections.FieldReference(None, field_type=int),
      end_epoch=ml_collections.FieldReference(None, field_type=int),
  ))


def boundary(fraction: float, epochs: int) -> int:
  """The epoch boundary a fraction of `epochs` names: round half up."""
  # The small slack keeps e.g. 0.51 * 100 = 51.00000000000001 and
  # 0.5 * 7 = 3.5 on the intended side.
  return int(math.floor(float(fraction) * epochs + 0.5 + 1e-9))


@dataclasses.dataclass(frozen=True)
class Window:
  """Epochs `start <= e < stop` of a run (0-indexed, `stop` exclusive)."""
  start: int
  stop: int

  @property
  def num_epochs(self) -> int:
    return max(0, self.stop - self.start)

  def contains(self, epoch: Array | int) -> Array:
    """Whether `epoch` is inside the window (traced: one compiled step)."""
    e = jnp.asarray(epoch, jnp.int32)
    return (e >= self.start) & (e < self.stop)

  def record(self, epochs: int) -> dict[str, Any]:
    """For summary.json: first and last active epoch (inclusive, as the
    releases print them; None if empty), count and share of the run."""
    n = self.num_epochs
    return {"first_epoch": self.start if n else None,
            "last_epoch": self.stop - 1 if n else None,
            "epochs": n, "share": n / epochs if epochs else 0.0}


def _check_fraction(value: float, field: str, absolute: str) -> float:
  if not 0.0 <= float(value) <= 1.0:
    raise ConfigError(
        f"{field}={value} is a fraction of the student's epochs and must be "
        f"in [0, 1]; for an absolute epoch set {absolute} instead.")
  return float(value)


def resolve_window(window: ml_collections.ConfigDict, epochs: int,
                   name: str = "window") -> Window:
  """The epochs of a `window_config` in a run of `epochs` epochs.

  Args:
    window: fields start, end (fractions) and start_epoch, end_epoch
      (absolute overrides, None = use the fraction).
    epochs: the run's length.
    name: the config path of `window`, for error messages.

  Raises:
    ConfigError: a fraction outside [0, 1], or a window that ends before it
      starts.
  """
  start = _check_fraction(window.start, f"config.{name}.start",
                          f"--config.{name}.start_epoch")
  end = _check_fraction(window.end, f"config.{name}.end",
                        f"--config.{name}.end_epoch")
  if window.start_epoch is None and window.end_epoch is None and end < start:
    raise ConfigError(
        f"config.{name} ends (end={end}) before it starts (start={start}); "
        f"give start <= end, e.g. --config.{name}.end={start}.")
  first = (boundary(start, epochs) if window.start_epoch is None
           else int(window.start_epoch))
  if first < 0:
    raise ConfigError(f"config.{name}.start_epoch={first} must be >= 0.")
  if window.end_epoch is None:
    stop = boundary(end, epochs)
  elif int(window.end_epoch) == -1:
    stop = epochs
  else:
    last = int(window.end_epoch)
    if last < first:
      raise ConfigError(
          f"config.{name}.end_epoch={last} is before its start epoch "
          f"{first}; give end_epoch >= start epoch, or -1 for the end of the "
          "run.")
    stop = last + 1
  return Window(min(first, epochs), max(min(stop, epochs), min(first, epochs)))


def smp_taus(fractions: Sequence[float], epochs: int,
             absolute: Sequence[int] | None = None,
             field: str = "config.gating") -> tuple[int, ...]:
  """SMP's stage lengths (tau_1, ..., tau_{k-1}) in epochs.

  Args:
    fractions: each stage's share of the run (G2D's release: 151/300).
    epochs: the student's epochs.
    absolute: stage lengths in epochs; override `fractions` when given.
    field: the config path, for error messages.

  Raises:
    ConfigError: a fraction outside [0, 1], stages longer than the run, or a
      negative length.
  """
  if absolute is not None:
    taus = tuple(int(t) for t in absolute)
    if any(t < 0 for t in taus):
      raise ConfigError(f"{field}.taus={taus} has a negative entry.")
    if sum(taus) > epochs:
      raise ConfigError(
          f"{field}.taus={taus} spans {sum(taus)} epochs, longer than "
          f"training (config.student.epochs={epochs}); shorten the taus or "
          "train longer.")
    return taus
  fractions = tuple(_check_fraction(f, f"{field}.tau_fractions entry",
                                    "--config.gating.taus=(N,...)")
                    for f in fractions)
  if sum(fractions) > 1.0 + 1e-9:
    raise ConfigError(
        f"{field}.tau_fractions={fractions} add up to {sum(fractions):g}: the "
        "SMP stages would run past the end of training; their sum must be at "
        "most 1.")
  bounds = [0] + [boundary(f, epochs) for f in _cumsum(fractions)]
  return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def decay_epochs(fractions: Sequence[float], epochs: int,
                 absolute: Sequence[int] | None = None,
                 field: str = "config.student.optimizer") -> tuple[int, ...]:
  """The epochs at whose start the learning rate decays."""
  if absolute is not None:
    return tuple(int(e) for e in absolute)
  return tuple(boundary(_check_fraction(
      f, f"{field}.decay_fractions entry", f"--{field}.decay_epochs"
  ), epochs) for f in fractions)


def gating_taus(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """SMP's tau_1..tau_{k-1} in epochs for a run config (`config.gating.
  tau_fractions` of `config.student.epochs`, or `config.gating.taus`)."""
  g = config.gating
  return smp_taus(g.tau_fractions, int(config.student.epochs), g.taus)


def optimizer_decay_epochs(optimizer: ml_collections.ConfigDict, epochs: int,
                           field: str = "config.student.optimizer"
                           ) -> tuple[int, ...]:
  """The decay epochs of an optimizer config in a stage of `epochs`."""
  return decay_epochs(optimizer.decay_fractions, epochs,
                      optimizer.get("decay_epochs"), field)


def method_windows(method_config: ml_collections.ConfigDict | None
                   ) -> list[str]:
  """The names of the window sub-configs in a method's config."""
  if method_config is None:
    return []
  return sorted(k for k, v in method_config.items()
                if isinstance(v, ml_collections.ConfigDict)
                and set(v.keys()) == WINDOW_FIELDS)


def method_window(config: ml_collections.ConfigDict, method: str,
                  name: str = "window") -> Window:
  """`config.<method>.<name>` resolved against the student's epochs."""
  return resolve_window(config[method][name], int(config.student.epochs),
                        f"{method}.{name}")


def _cumsum(values: Sequence[float]) -> list[float]:
  out, total = [], 0.0
  for v in values:
    total += v
    out.append(total)
  return out
