"""Run logs: JSON lines survive a line cut short by a kill, TensorBoard
drops the events a resumed run replays, and W&B (a stand-in module here:
the package is optional) gets the same scalars."""

import json
import sys
import types

import ml_collections
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.pipeline import logs
from tests.test_main import read_events


def test_a_last_line_cut_short_is_dropped(tmp_path):
  w = logs.JsonlWriter(str(tmp_path / "m.jsonl"))
  w.write({"step": 1, "loss": 2.0})
  w.write({"step": 2, "loss": 1.5})
  with open(w.path, "a") as f:
    f.write('{"step": 3, "lo')            # killed mid-write
  assert [r["step"] for r in w.read()] == [1, 2]
  w.truncate_after("step", 1)
  assert w.read() == [{"loss": 2.0, "step": 1}]
  with open(w.path, "a") as f:
    f.write('{"bad"\n{"step": 4}\n')
  with pytest.raises(json.JSONDecodeError):
    w.read()                              # damage before the end is an error


def test_tensorboard_purges_the_steps_a_resumed_run_replays(tmp_path):
  log = logs.RunLog(str(tmp_path), "t")
  for s in (1, 2, 3, 4):
    log.step({"step": s, "loss": float(s)})
  log.close()
  # Resumed from the checkpoint at step 2: steps 3 and 4 are written again.
  log = logs.RunLog(str(tmp_path), "t", resume_step=2)
  for s in (3, 4):
    log.step({"step": s, "loss": 10.0 * s})
  log.epoch({"epoch": 0, "step": 4, "train/loss": 7.0})
  log.close()
  scalars, _ = read_events(tmp_path / "tensorboard")
  # Both files hold their events; the reader is told (a SessionLog purge
  # at step 3) to drop the first file's steps >= 3.
  assert scalars["step/loss"][:4] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
  assert scalars["step/loss"][4:] == [(3, 30.0), (4, 40.0)]
  assert scalars["train/loss"] == [(4, 7.0)]
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  second = sorted(glob.glob(str(tmp_path / "tensorboard" / "events.*")))[-1]
  data, pos, events = open(second, "rb").read(), 0, []
  while pos + 12 <= len(data):
    n = int.from_bytes(data[pos:pos + 8], "little")
    events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
    pos += 12 + n + 4
  starts = [e.step for e in events if e.HasField("session_log")
            and e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [3]


def test_wandb_gets_the_same_scalars_offline(tmp_path, monkeypatch):
  calls = []

  class Run:
    def log(self, values, step):
      calls.append(("log", dict(values), step))

    def finish(self):
      calls.append(("finish",))

  fake = types.SimpleNamespace(
      init=lambda **kw: calls.append(("init", kw)) or Run(),
      Image=lambda path: ("image", path))
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = ml_collections.ConfigDict(dict(tensorboard=False, wandb=True,
                                       wandb_mode="offline",
                                       wandb_project="p"))
  log = logs.RunLog(str(tmp_path), "student", cfg)
  log.step({"step": 5, "loss": 0.5, "kappa/audio": 1.0})
  log.epoch({"epoch": 0, "step": 8, "val/accuracy/fused": 0.25})
  log.close()
  assert calls[0] == ("init", {"project": "p", "name": "student",
                               "dir": str(tmp_path), "mode": "offline",
                               "reinit": "finish_previous"})
  assert calls[1] == ("log", {"step/loss": 0.5, "step/kappa/audio": 1.0}, 5)
  assert calls[2] == ("log", {"val/accuracy/fused": 0.25, "epoch": 0}, 8)
  assert calls[3] == ("finish",)
  # metrics.jsonl stays the source of truth.
  assert json.loads(open(tmp_path / "metrics.jsonl").read())["step"] == 8
  monkeypatch.setitem(sys.modules, "wandb", None)   # not installed
  with pytest.raises(ConfigError, match="pip install wandb"):
    logs.RunLog(str(tmp_path), "student", cfg)


def test_a_run_log_that_does_not_write_keeps_records_in_memory(tmp_path):
  """Processes other than 0 of a multi-process job: the same records, no
  files."""
  log = logs.RunLog(str(tmp_path), "student", resume_step=0, write=False)
  for e in range(3):
    log.epoch({"epoch": e, "step": 10 * (e + 1), "train/loss": 1.0 / (e + 1)})
  log.step({"step": 5, "loss": 2.0})
  log.epochs.truncate_after("epoch", 1)
  log.close()
  assert [r["epoch"] for r in log.epochs.read()] == [0, 1]
  assert log.epochs.read()[1]["train/loss"] == 0.5
  assert log.steps.read() == [{"step": 5, "loss": 2.0}]
  assert not list(tmp_path.iterdir())
