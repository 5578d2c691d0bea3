r"""Command-line entry point (also installed as `g2d-jax`).

  python -m g2d_jax.main --config=configs/avmnist.py:quick
  python -m g2d_jax.main --config=configs/avmnist.py --workdir=runs/p \
      --mode=teachers --config.teacher.epochs=3

`--workdir` defaults to `runs/<config name>[_<preset>]` under the current
directory. `--mode` runs one stage (teachers, precompute, student, eval) or
all of them; a finished stage whose outputs match the config is skipped. Any
config field can be overridden with `--config.<field>=<value>`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from g2d_jax.errors import G2DError
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import distributed as distributed_lib

RUNS_DIR = "runs"


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  """This program's flags, on `fv` (a fresh FlagValues per invocation, so
  the CLI can run several times in one process)."""
  config_flags.DEFINE_config_file(
      "config", None, "A config file from configs/, optionally with a "
      "preset: configs/avmnist.py:quick.", lock_config=True, flag_values=fv,
      sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for all outputs (default: "
                      f"{RUNS_DIR}/<config name>[_<preset>]).", flag_values=fv)
  flags.DEFINE_enum("mode", "all", config_lib.MODES, "Stage(s) to run.",
                    flag_values=fv)
  # A multi-process job (jax.distributed): one process per host or GPU.
  flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                    "'auto': join a multi-process job found by JAX's cluster "
                    "detection (SLURM, Open MPI, ...). A job can also be "
                    "given by the three flags below.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0 of a multi-process job "
                      f"(or ${distributed_lib.ENV_ADDRESS}).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "processes in the job (or "
                       f"${distributed_lib.ENV_PROCESSES}).", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process, 0..num_processes-1 "
                       f"(or ${distributed_lib.ENV_PROCESS_ID}).",
                       flag_values=fv)
  flags.DEFINE_integer("distributed_timeout", 60, "seconds to wait for every "
                       "process to join, and after which a silent process "
                       "counts as dead.", flag_values=fv)


def default_workdir(config_arg: str) -> str:
  """`runs/<config file name>[_<preset>]` of a `--config` value."""
  path, _, preset = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if preset:
    name += "_" + re.sub(r"[^A-Za-z0-9_.-]", "_", preset.replace(",", "_"))
  return os.path.join(RUNS_DIR, name)


def smaller_preset_hint(config_arg: str) -> str:
  """`--config=<file>:quick` if the config file has a `quick` preset, for
  the message that the job is too long for this machine."""
  path = config_arg.partition(":")[0]
  try:
    spec = importlib.util.spec_from_file_location("_g2d_config_hint", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    presets = tuple(getattr(module, "PRESETS", ()))
  except Exception:  # pylint: disable=broad-except
    presets = ()
  for name in ("quick", "small", "smoke"):
    if name in presets:
      return f"--config={path}:{name}"
  return "a smaller preset"


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def parse(argv: list[str]) -> tuple[flags.FlagValues | None, int]:
  """Parses `argv` (argv[0] is the program): (flags, 0), or (None, exit
  status) after printing the one-line error or the help."""
  fv = flags.FlagValues()
  try:
    define_flags(fv, argv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
      print(fv.main_module_help() or fv.get_help(), file=sys.stderr)
      return None, 0
    rest = fv(argv)
  except flags.Error as e:
    # A failing config file is wrapped with its whole traceback; its last
    # line is the message.
    lines = [line for line in str(e).splitlines() if line.strip()]
    return None, _error(f"{lines[-1] if lines else e}\nPass --help to see "
                        "the flags.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # A mistyped field (`--config.student.epochz=3`) makes ml_collections
    # raise from deep inside flag parsing: show its message (which suggests
    # the right name) instead of a traceback.
    text = str(e.args[0] if e.args else e)
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    if hint:
      msg = f"unknown field {hint.group(2)!r}; did you mean {hint.group(1)!r}?"
    else:
      msg = "unknown field '" + re.sub(r"[\\'\"]", "", text) + "'."
    return None, _error(f"bad --config override: {msg} Every "
                        "--config.<field> must name an existing field of the "
                        "config file.")
  if len(rest) > 1:
    return None, _error(f"unexpected arguments: {rest[1:]}")
  if fv["config"].value is None:
    return None, _error("--config is required, e.g. "
                        "--config=configs/avmnist.py:quick")
  return fv, 0


def cli(argv: list[str]) -> int:
  """Runs the pipeline for `argv`; returns the exit status (0, or 2 after
  one line saying what is wrong and how to fix it)."""
  fv, status = parse(argv)
  if fv is None:
    return status
  config_arg = config_flags.get_config_filename(fv["config"])
  workdir = fv.workdir or default_workdir(config_arg)
  from g2d_jax.pipeline import run  # pylint: disable=g-import-not-at-top
  logging.info("outputs go to %s", os.path.abspath(workdir))
  print(f"g2d_jax: outputs go to {os.path.abspath(workdir)}", file=sys.stderr)
  try:
    distributed_lib.initialize(distributed_lib.settings_from(
        fv.distributed, fv.coordinator_address, fv.num_processes,
        fv.process_id, fv.distributed_timeout))
    run.run(fv["config"].value, workdir, fv.mode,
            smaller_preset=smaller_preset_hint(config_arg))
  except G2DError as e:
    logging.error("%s", e)
    return _error(str(e))
  except jax.errors.JaxRuntimeError as e:
    if not distributed_lib.multiprocess():
      raise
    # A collective failed: most often another process of the job died.
    # Leave at once: JAX's shutdown would wait for the dead process and
    # then abort with a stack dump.
    first = (str(e).strip().splitlines() or [repr(e)])[0][:300]
    status = _error(
        f"the multi-process job failed in process "
        f"{jax.process_index()} of {jax.process_count()}: {first}. If "
        "another process died or was killed, start every process again "
        "with the same flags: the job resumes from its last checkpoint.")
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  return 0


def console() -> None:
  """The `g2d-jax` console script and `python -m g2d_jax.main`."""
  # absl's own flags (verbosity, ...) are not used; mark them parsed so
  # logging does not warn, and log at INFO to stderr.
  flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  sys.exit(cli(sys.argv))


if __name__ == "__main__":
  console()
