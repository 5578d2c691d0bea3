"""Multi-process jobs (jax.distributed): settings, each process's rows of a
global batch, and real 2-process x 2-device jobs on 127.0.0.1 (gloo)
against 1 process x 4 devices.

The job tests start `python -m g2d_jax.main` processes with a free port and
a timeout; they share one module-scoped pair of runs of the AV-MNIST smoke
preset (1 teacher epoch, 2 student epochs).
"""

import glob
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from g2d_jax.data.base import Split
from g2d_jax.errors import ConfigError
from g2d_jax.pipeline import distributed
from g2d_jax.pipeline import loader
from tests.conftest import DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--config=configs/avmnist.py:smoke", "--config.teacher.epochs=1"]
# Parameters after 1 + 2 epochs of 1 x 4 and 2 x 2 devices differ only by
# the order of the gradient all-reduce's float additions.
PARAM_RTOL, PARAM_ATOL = 1e-3, 1e-4
# Teacher outputs of 1 x 4 and 2 x 2 devices (measured: at most 3e-8).
CACHE_ATOL = 1e-6
# A process whose peer died exits within this (its next collective fails
# at once; a process outside collectives is stopped by the heartbeat
# timeout, --distributed_timeout=20 here).
PEER_DEATH_EXIT_S = 45


# ---------------------------------------------------------------------------
# Settings (pure)


def test_settings_from_flags_and_environment():
  off = distributed.settings_from("off", None, None, None, 60, environ={})
  assert off == distributed.Settings(timeout_s=60)
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  s = distributed.settings_from("off", None, None, None, 30, environ=env)
  assert s == distributed.Settings("manual", "10.0.0.1:1234", 4, 3, 30)
  # Flags win over the environment.
  s = distributed.settings_from("off", "h:1", 2, 0, 30, environ=env)
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("h:1", 2,
                                                                    0)
  auto = distributed.settings_from("auto", None, None, None, 30, environ={})
  assert auto.mode == "auto" and auto.num_processes is None


@pytest.mark.parametrize("args, match", [
    (("off", "h:1", 2, None), r"--process_id is missing.*--distributed=auto"),
    (("off", None, 2, 0), r"--coordinator_address is missing"),
    (("off", "h:1", 2, 2), r"--process_id=2 with --num_processes=2: ids run "
                           r"0\.\.1"),
    (("off", "h:1", 0, 0), r"ids run 0\.\.0"),
    (("off", "host", 2, 0), r"write HOST:PORT"),
    (("slurm", None, None, None), r"use 'off'.*or 'auto'"),
])
def test_bad_settings_name_the_fix(args, match):
  with pytest.raises(ConfigError, match=match):
    distributed.settings_from(*args, 60, environ={})
  with pytest.raises(ConfigError, match="not an integer"):
    distributed.settings_from("off", "h:1", None, 0, 60,
                              environ={"JAX_NUM_PROCESSES": "two"})
  with pytest.raises(ConfigError, match="at least 1"):
    distributed.settings_from("off", None, None, None, 0, environ={})


# ---------------------------------------------------------------------------
# Each process's rows (the real loader, with a faked process layout)


def _as_process(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def test_local_rows_are_the_process_blocks(monkeypatch):
  rows = np.arange(12) * 10
  _as_process(monkeypatch, 1, 3)
  np.testing.assert_array_equal(distributed.local_rows(rows), [40, 50, 60, 70])
  with pytest.raises(ConfigError, match="multiple of the total device count"):
    distributed.local_rows(np.arange(10))
  _as_process(monkeypatch, 0, 1)
  assert distributed.local_rows(rows) is rows


def _split(n=40):
  rng = np.random.default_rng(0)
  return Split(inputs={"a": rng.normal(size=(n, 3)).astype(np.float32)},
               labels=(np.arange(n) % 4).astype(np.int32), scales={"a": 1.0})


def test_processes_read_disjoint_rows_of_the_same_batches(monkeypatch):
  """Two processes' training batches put together are the one-process
  batches, row for row, and both see the gate of the whole batch."""
  split = _split()
  logits = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
  teacher = {"a": {"logits": logits}}
  gate = lambda b, epoch: {"rows": np.sort(b["label"]) * 0 + len(b["label"]),
                           "sum": float(b["teacher"]["logits"]["a"].sum())}
  kw = dict(seed=3, epoch=2, teacher=teacher,
            teacher_keys=frozenset({"logits"}), gate=gate)
  _as_process(monkeypatch, 0, 1)
  whole = list(loader.train_batches(split, 8, **kw))
  parts = []
  for p in range(2):
    _as_process(monkeypatch, p, 2)
    parts.append(list(loader.train_batches(split, 8, **kw)))
  assert len(whole) == len(parts[0]) == len(parts[1]) == 5
  for w, p0, p1 in zip(whole, *parts):
    np.testing.assert_array_equal(np.concatenate([p0["index"], p1["index"]]),
                                  w["index"])
    np.testing.assert_array_equal(
        np.concatenate([p0["inputs"]["a"], p1["inputs"]["a"]]),
        w["inputs"]["a"])
    np.testing.assert_array_equal(
        np.concatenate([p0["teacher"]["logits"]["a"],
                        p1["teacher"]["logits"]["a"]]),
        w["teacher"]["logits"]["a"])
    assert p0["gate"]["sum"] == p1["gate"]["sum"] == w["gate"]["sum"]
    assert p0["gate"]["rows"][0] == 8


def test_eval_batches_split_rows_and_padding_mask(monkeypatch):
  split = _split(10)
  _as_process(monkeypatch, 1, 2)
  batches = list(loader.eval_batches(split, 8))
  # Global batches: rows 0..7, then 8, 9 and six padding rows (row 8 again).
  np.testing.assert_array_equal(batches[0]["index"], [4, 5, 6, 7])
  np.testing.assert_array_equal(batches[1]["index"], [8, 8, 8, 8])
  np.testing.assert_array_equal(batches[1]["mask"], [False] * 4)
  _as_process(monkeypatch, 0, 2)
  batches = list(loader.eval_batches(split, 8))
  np.testing.assert_array_equal(batches[1]["index"], [8, 9, 8, 8])
  np.testing.assert_array_equal(batches[1]["mask"], [True, True, False, False])


# ---------------------------------------------------------------------------
# Real jobs


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, extra=None) -> dict:
  env = dict(os.environ, G2D_DATA_DIR=DATA_DIR,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  env.update(extra or {})
  return env


def _start(workdir, args, process_id=None, processes=2, port=None,
           devices=2, env=None, timeout=20):
  cmd = [sys.executable, "-m", "g2d_jax.main", *SMOKE,
         f"--workdir={workdir}", *args]
  if process_id is not None:
    cmd += [f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={processes}", f"--process_id={process_id}",
            f"--distributed_timeout={timeout}"]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices, env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(procs, timeout=600):
  """[(exit status, stderr, seconds)] of each process; kills all at the
  timeout."""
  t0, out = time.monotonic(), []
  for p in procs:
    try:
      _, err = p.communicate(timeout=max(1, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((p.returncode, err, time.monotonic() - t0))
  return out


def _job(workdir, args=(), processes=2, env_by_process=None, timeout=600):
  port = _free_port()
  procs = [_start(workdir, args, i, processes, port,
                  env=(env_by_process or {}).get(i))
           for i in range(processes)]
  return _finish(procs, timeout)


def _weights(workdir, stage="student"):
  d = sorted(glob.glob(os.path.join(workdir, stage, "checkpoints", "best",
                                    "*", "weights")))[-1]
  ck = ocp.StandardCheckpointer()
  meta = ck.metadata(d)
  meta = getattr(meta, "item_metadata", meta)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.device_get(ck.restore(d, jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)))


def _cache(workdir):
  root = os.path.join(workdir, "teacher_cache")
  return {os.path.relpath(f, root): np.load(f)
          for f in sorted(glob.glob(os.path.join(root, "*", "*.npy")))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The smoke job as 1 process x 4 devices and as 2 processes x 2."""
  tmp = tmp_path_factory.mktemp("distributed")
  single = str(tmp / "single")
  [(code, err, _)] = _finish([_start(single, [], devices=4)])
  assert code == 0, err[-3000:]
  multi = str(tmp / "multi")
  results = _job(multi)
  for code, err, _ in results:
    assert code == 0, err[-3000:]
  return tmp, single, multi, results


def test_two_processes_train_the_one_process_student(runs):
  _, single, multi, results = runs
  assert all("joined a 2-process job" in err for _, err, _ in results)
  # Only process 0 writes metrics and summaries.
  assert "summary.json" in os.listdir(multi)
  a = _weights(single)
  b = _weights(multi)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(y, x, rtol=PARAM_RTOL, atol=PARAM_ATOL)
  import json  # pylint: disable=g-import-not-at-top
  s1 = json.load(open(os.path.join(single, "summary.json")))
  s2 = json.load(open(os.path.join(multi, "summary.json")))
  for block in ("student", "teacher_ensemble"):
    assert s2[block]["test_accuracy"] == s1[block]["test_accuracy"]
    assert s2[block]["modality_test_accuracy"] == s1[block][
        "modality_test_accuracy"]
    assert s2[block]["test_ece"] == pytest.approx(s1[block]["test_ece"],
                                                  abs=1e-5)
  for m in s1["teachers"]:
    assert s2["teachers"][m]["test_accuracy"] == s1["teachers"][m][
        "test_accuracy"]
  lines = lambda w: open(os.path.join(w, "student", "metrics.jsonl")
                         ).read().count("\n")
  assert lines(multi) == lines(single) == 2


def test_teacher_cache_of_two_processes_is_identical(runs):
  """The same teachers' cache, written by two processes (each its own
  rows), equals bit for bit the cache of one process running the same
  per-device program (2 devices, 16 rows each); against 1 process x 4
  devices the image CNN's convolutions round differently in the last bits
  (CACHE_ATOL)."""
  tmp, single, _, _ = runs
  work, same = str(tmp / "precompute"), str(tmp / "precompute_1x2")
  for w in (work, same):
    shutil.copytree(os.path.join(single, "teachers"),
                    os.path.join(w, "teachers"))
  for code, err, _ in _job(work, ["--mode=precompute"]):
    assert code == 0, err[-3000:]
  [(code, err, _)] = _finish([_start(same, ["--mode=precompute",
                                            "--config.eval.batch_size=32"])])
  assert code == 0, err[-3000:]
  got, want, four = _cache(work), _cache(same), _cache(single)
  assert sorted(got) == sorted(want) == sorted(four) and len(want) == 12
  for name, arr in want.items():
    assert got[name].shape == (256, 8 if "features" in name else 10)
    np.testing.assert_array_equal(got[name], arr, err_msg=name)
    np.testing.assert_allclose(got[name], four[name], rtol=0,
                               atol=CACHE_ATOL, err_msg=name)
  assert not glob.glob(os.path.join(work, "*tmp*"))


def test_killed_process_stops_the_other_and_the_rerun_resumes(runs):
  """Process 1 is killed right after the first student checkpoint; process
  0 exits with a clear error within PEER_DEATH_EXIT_S, and rerunning both
  resumes from that checkpoint to the uninterrupted job's student."""
  tmp, _, multi, _ = runs
  work = str(tmp / "killed")
  for part in ("teachers", "teacher_cache"):
    shutil.copytree(os.path.join(multi, part), os.path.join(work, part))
  port = _free_port()
  procs = [_start(work, ["--mode=student"], i, 2, port,
                  env={"G2D_KILL_AT": "after_latest_save"} if i else None)
           for i in range(2)]
  t_killed = None
  for _ in range(1200):
    if procs[1].poll() is not None:
      t_killed = time.monotonic()
      break
    time.sleep(0.5)
  assert t_killed is not None and procs[1].returncode == -9
  (code, err, _), _ = _finish(procs, timeout=PEER_DEATH_EXIT_S + 60)
  assert time.monotonic() - t_killed < PEER_DEATH_EXIT_S
  assert code == 2
  assert "error: the multi-process job failed in process 0 of 2" in err
  assert "start every process again with the same flags" in err
  for code, err, _ in _job(work, ["--mode=student"]):
    assert code == 0, err[-3000:]
    assert "student: resuming at epoch 1 step 0" in err
  a, b = _weights(multi), _weights(work)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(y, x)


def test_unreachable_coordinator_and_missing_processes(tmp_path):
  port = _free_port()
  # Process 1 alone: nobody serves the coordinator's port.
  [(code, err, secs)] = _finish([_start(str(tmp_path / "a"), [], 1, 2, port,
                                        timeout=3)], timeout=120)
  assert code == 2 and secs < 60
  assert "could not join the multi-process job at 127.0.0.1" in err
  assert "--coordinator_address" in err
  # Process 0 of a job of 2 whose other process never comes.
  [(code, err, secs)] = _finish([_start(str(tmp_path / "b"), [], 0, 2,
                                        _free_port(), timeout=3)], timeout=120)
  assert code == 2 and secs < 60
  assert "with 2 processes" in err and "--num_processes" in err
  assert not os.path.exists(tmp_path / "b" / "summary.json")


def test_batch_not_divisible_by_every_device_of_the_job(tmp_path):
  results = _job(str(tmp_path / "w"), ["--config.student.batch_size=6"],
                 timeout=300)
  for code, err, _ in results:
    assert code == 2
    assert ("config.student.batch_size=6 is not divisible by the 4 devices"
            in err)


def test_processes_without_teacher_outputs_get_the_whole_batch_gate(
    monkeypatch):
  """Methods that read no teacher outputs (SMP off): the gate still sees
  the whole global batch's labels, in every process."""
  split = _split()
  seen = []
  gate = lambda b, epoch: seen.append(np.array(b["label"])) or {"n": 0}
  _as_process(monkeypatch, 0, 1)
  whole = list(loader.train_batches(split, 8, seed=1, epoch=0))
  _as_process(monkeypatch, 1, 2)
  part = list(loader.train_batches(split, 8, seed=1, epoch=0, gate=gate))
  assert len(part) == len(whole) == len(seen) == 5
  for p, w in zip(part, whole):
    assert p["gate"] == {"n": 0}
    np.testing.assert_array_equal(p["label"], w["label"][4:])
  # Batches are fetched by a pool of threads: compare as a set of batches.
  assert sorted(map(tuple, seen)) == sorted(tuple(w["label"]) for w in whole)
