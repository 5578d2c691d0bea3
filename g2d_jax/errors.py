"""Errors that carry a message naming the fix.

The CLI catches `G2DError` and prints only its message (no stack trace) and
exits non-zero; anything else is a bug and keeps its traceback.
"""


class G2DError(Exception):
  """Base class: a user-facing problem whose message says how to fix it."""


class ConfigError(G2DError, ValueError):
  """A config value is missing, unknown or out of range."""


class DataError(G2DError, ValueError):
  """Input data is missing, truncated or malformed."""


class CacheMismatchError(G2DError):
  """A stored artefact (teacher cache, checkpoint) does not match this run."""


class TrainingError(G2DError, RuntimeError):
  """Training cannot continue (for example a non-finite loss)."""
