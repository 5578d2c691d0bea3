"""Progress lines with rate and ETA, for training and for long builds."""

from __future__ import annotations

import math
import time

from absl import logging


def format_seconds(s: float) -> str:
  """`h:mm:ss` (with `<d>d ` in front from two days on), or "?"."""
  if not math.isfinite(s):
    return "?"
  s = int(round(s))
  days = f"{s // 86400}d " if s >= 2 * 86400 else ""
  if days:
    s %= 86400
  return f"{days}{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
  """Logs `<name> <done>/<total> (<pct>%) <rate> <unit>/s ETA h:mm:ss`.

  A line is logged when `update` reaches a multiple of `every` (if set),
  when at least `seconds` passed since the last line (if set), and at the
  end. The rate counts only what this process did (a resumed run's earlier
  steps are not in it).
  """

  def __init__(self, name: str, total: int, done: int = 0, *,
               unit: str = "steps", every: int = 0, seconds: float = 0.0):
    self.name, self.total, self.unit = name, int(total), unit
    self.every, self.seconds = int(every), float(seconds)
    self.done = int(done)
    self._t0 = self._last = time.perf_counter()
    self._n0 = self.done

  def rate(self) -> float:
    """Units per second so far (nan before the first update)."""
    dt = time.perf_counter() - self._t0
    return (self.done - self._n0) / dt if dt > 0 else float("nan")

  def eta(self) -> float:
    """Estimated seconds to the end (nan while unknown)."""
    rate = self.rate()
    return (self.total - self.done) / rate if rate > 0 else float("nan")

  def update(self, done: int, extra: str = "") -> None:
    self.done = int(done)
    now = time.perf_counter()
    due = done >= self.total
    if self.every and done % self.every == 0:
      due = True
    if self.seconds and now - self._last >= self.seconds:
      due = True
    if not due:
      return
    self._last = now
    logging.info("%s %d/%d (%.1f%%) %.2f %s/s ETA %s%s", self.name, done,
                 self.total, 100.0 * done / max(1, self.total), self.rate(),
                 self.unit, format_seconds(self.eta()),
                 f" {extra}" if extra else "")
