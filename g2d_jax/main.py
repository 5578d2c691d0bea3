r"""Command-line entry point.

  python -m g2d_jax.main --config=configs/avmnist.py:quick --workdir=runs/q
  python -m g2d_jax.main --config=configs/avmnist.py --workdir=runs/p \
      --mode=teachers --config.teacher.epochs=3

`--mode` runs one stage (teachers, precompute, student, eval) or all of them;
a finished stage whose outputs match the config is skipped. Any config field
can be overridden with `--config.<field>=<value>`.
"""

import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from g2d_jax.errors import G2DError
from g2d_jax.pipeline import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config file from configs/, optionally with a preset: "
    "configs/avmnist.py:quick.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs.")
_MODE = flags.DEFINE_enum("mode", "all", config_lib.MODES, "Stage(s) to run.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with config-override mistakes reported in one line.

  A mistyped field (`--config.student.epochz=3`) makes ml_collections raise
  an AttributeError/KeyError from deep inside flag parsing; show its
  message (which suggests the right name) instead of a traceback.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A failing config file is wrapped with its whole traceback; its last
    # line is the message.
    lines = [l for l in str(e).splitlines() if l.strip()]
    print(f"error: {lines[-1] if lines else e}\nPass --helpfull to see the "
          "flags.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e.args[0] if e.args else e)
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    if hint:
      msg = f"unknown field {hint.group(2)!r}; did you mean {hint.group(1)!r}?"
    else:
      msg = "unknown field '" + re.sub(r"[\\'\"]", "", text) + "'."
    print(f"error: bad --config override: {msg} Every --config.<field> must "
          "name an existing field of the config file.", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from g2d_jax.pipeline import run  # pylint: disable=g-import-not-at-top
  try:
    run.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except G2DError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
