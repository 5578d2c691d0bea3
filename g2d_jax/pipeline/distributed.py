"""Multi-process runs on JAX's own multi-controller runtime.

One `python -m g2d_jax.main` process runs per host (or per GPU); they join
one job with `jax.distributed.initialize` and then see every device of the
job in `jax.devices()`, so the 'data' mesh spans the hosts and `jit` inserts
the cross-host all-reduce (gloo collectives on CPU, NCCL on GPU).

What changes with several processes, and where:
  * the input pipeline builds the same global batches in every process and
    each process reads only its rows (`local_rows`); the batch order, and so
    the results, do not depend on the number of processes;
  * `global_batch` makes the global arrays from each process's rows
    (`jax.make_array_from_process_local_data`);
  * host copies of sharded outputs are gathered (`to_host`), or each
    process takes its own rows of them (`local_part`, the teacher cache);
  * only the primary process (0) writes metrics, plots, records, caches and
    summaries (`is_primary`); orbax writes checkpoints the multi-host way;
  * `barrier` orders a write by process 0 before the others read it.

With one process every function here is the plain single-process
operation, so single-process runs are unchanged bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils

from g2d_jax.errors import ConfigError

# Environment fallbacks of the command-line flags (JAX itself reads
# JAX_COORDINATOR_ADDRESS; the other two are ours, named alike).
ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Seconds past the join timeout before we report a failed join ourselves
# (XLA's client aborts about five seconds past it).
_WATCHDOG_GRACE_S = 1.5


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to join a job: `mode` "off" (one process), "manual" (address,
  process count and id given) or "auto" (JAX's cluster detection: SLURM,
  Open MPI, Kubernetes, Cloud TPU)."""
  mode: str = "off"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 60


def settings_from(distributed: str, coordinator_address: str | None,
                  num_processes: int | None, process_id: int | None,
                  timeout_s: int, environ: Any = None) -> Settings:
  """The job settings of the command line, with the environment's
  `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` for
  flags not given; ConfigError naming the fix when they do not add up."""
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get(ENV_ADDRESS) or None

  def number(value: int | None, name: str, flag: str) -> int | None:
    if value is not None:
      return value
    text = env.get(name)
    if text in (None, ""):
      return None
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"${name}={text!r} is not an integer; set it to "
                        f"the job's {flag.replace('_', ' ')}.") from None

  n = number(num_processes, ENV_PROCESSES, "num_processes")
  pid = number(process_id, ENV_PROCESS_ID, "process_id")
  if timeout_s < 1:
    raise ConfigError(f"--distributed_timeout={timeout_s}: give the seconds "
                      "to wait for the other processes (at least 1).")
  if distributed == "auto":
    return Settings("auto", address, n, pid, timeout_s)
  if distributed != "off":
    raise ConfigError(f"--distributed={distributed!r}: use 'off' (one "
                      "process, unless --coordinator_address is given) or "
                      "'auto' (JAX's cluster detection, e.g. under SLURM).")
  if address is None and n is None and pid is None:
    return Settings(timeout_s=timeout_s)
  missing = [flag for flag, v in (("--coordinator_address", address),
                                  ("--num_processes", n),
                                  ("--process_id", pid)) if v is None]
  if missing:
    raise ConfigError(
        f"a multi-process job needs --coordinator_address, --num_processes "
        f"and --process_id (or ${ENV_ADDRESS}, ${ENV_PROCESSES}, "
        f"${ENV_PROCESS_ID}); {', '.join(missing)} is missing. Under SLURM "
        "or Open MPI pass --distributed=auto instead.")
  assert n is not None and pid is not None and address is not None
  if n < 1 or not 0 <= pid < n:
    raise ConfigError(f"--process_id={pid} with --num_processes={n}: ids "
                      f"run 0..{max(n - 1, 0)}, one per process.")
  if ":" not in address:
    raise ConfigError(f"--coordinator_address={address!r}: write HOST:PORT "
                      "of process 0 (e.g. 10.0.0.1:1234).")
  return Settings("manual", address, n, pid, timeout_s)


def initialize(settings: Settings) -> None:
  """Joins the job (no-op for one process). Must run before any JAX
  computation. On CPU the collectives are gloo's.

  A join that has not finished `settings.timeout_s` (+1.5) seconds in
  (coordinator unreachable, a process missing) ends the process with one
  error line and exit status 2, before XLA's client would abort it.

  Raises:
    ConfigError: `jax.distributed.initialize` itself raised.
  """
  if settings.mode == "off":
    return
  # CPU devices talk through gloo; GPUs use NCCL whatever this says.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs: dict[str, Any] = {
      "initialization_timeout": settings.timeout_s,
      # A process that dies is noticed by the others within this time.
      "heartbeat_timeout_seconds": max(10, settings.timeout_s),
      "shutdown_timeout_seconds": max(10, settings.timeout_s)}
  if settings.mode == "manual":
    kwargs.update(coordinator_address=settings.coordinator_address,
                  num_processes=settings.num_processes,
                  process_id=settings.process_id)
  where = (f"{settings.coordinator_address} with {settings.num_processes} "
           "processes" if settings.mode == "manual"
           else "the cluster JAX detected")
  fix = (f"could not join the multi-process job at {where} within "
         f"{settings.timeout_s} s: the coordinator was not reachable or not "
         "every process started. Start every process with the same "
         "--coordinator_address (HOST:PORT of process 0, reachable from every "
         "host) and --num_processes, with process ids 0..num_processes-1; "
         "raise --distributed_timeout if processes start far apart.")
  # XLA's client does not raise when the coordinator is unreachable or a
  # process is missing: it aborts the process with a stack dump some
  # seconds after the timeout. Say what is wrong before that happens.
  joined = threading.Event()

  def watchdog() -> None:
    if not joined.wait(settings.timeout_s + _WATCHDOG_GRACE_S):
      sys.stderr.write(f"error: {fix}\n")
      sys.stderr.flush()
      os._exit(2)  # pylint: disable=protected-access

  threading.Thread(target=watchdog, daemon=True,
                   name="g2d-distributed-watchdog").start()
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ConfigError(f"{fix} ({first[:300]})") from None
  finally:
    joined.set()
  logging.info("joined a %d-process job as process %d (%d local of %d "
               "devices)", jax.process_count(), jax.process_index(),
               jax.local_device_count(), jax.device_count())


def multiprocess() -> bool:
  return jax.process_count() > 1


def is_primary() -> bool:
  """Process 0: the one that writes files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op alone)."""
  if multiprocess():
    multihost_utils.sync_global_devices(name)


def local_rows(rows: np.ndarray) -> np.ndarray:
  """This process's share of a global batch's rows: the contiguous block
  `process_index` of `process_count` equal blocks (the rows its devices
  hold in the 'data' mesh)."""
  if not multiprocess():
    return rows
  n = jax.process_count()
  if len(rows) % n:
    raise ConfigError(
        f"a global batch of {len(rows)} does not split over {n} processes; "
        "make the batch size (config.*.batch_size, config.eval.batch_size) "
        "a multiple of the total device count.")
  size = len(rows) // n
  start = jax.process_index() * size
  return rows[start:start + size]


def global_batch(local: np.ndarray, sharding: jax.sharding.Sharding
                 ) -> jax.Array:
  """The global array whose rows of this process are `local`."""
  return jax.make_array_from_process_local_data(sharding, local)


def to_host(tree: Any) -> Any:
  """Host NumPy copies of (possibly sharded) arrays, whole on every
  process."""
  if not multiprocess():
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def local_part(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order (the whole
  array in a one-process run)."""
  if not multiprocess():
    return np.asarray(jax.device_get(x))
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])
