"""The command line: the smoke preset end to end with no flag but the config
(default workdir, TensorBoard events), the console script, a run killed
between its checkpoint saves that resumes to the same weights, and every
bad input users tried: one `error:` line, exit status 2, no valid-looking
output.

Bad inputs run the CLI in this process (`main.cli`, four fake devices);
the end-to-end runs start `python -m g2d_jax.main` as a user would.
"""

import glob
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from g2d_jax import main
from tests.conftest import DATA_DIR

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMOKE = f"--config={ROOT}/configs/avmnist.py:smoke"


def run_main(args, tmp_path, env_extra=None, data_dir=DATA_DIR, cwd=ROOT,
             command=(sys.executable, "-m", "g2d_jax.main")):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["G2D_CACHE_DIR"] = str(tmp_path / "cache")
  if data_dir is None:
    env.pop("G2D_DATA_DIR", None)
  else:
    env["G2D_DATA_DIR"] = data_dir
  env.update(env_extra or {})
  return subprocess.run([*command, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def read_events(directory):
  """{tag: [(step, value)]} of the scalar summaries in TensorBoard event
  files (TFRecord framing: length, crc, Event proto, crc)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars, images = {}, []
  for path in sorted(glob.glob(os.path.join(directory, "events.out.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos + 12 <= len(data):
      n = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("image"):
          images.append((v.tag, event.step))
        else:
          scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
  return scalars, images


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke preset with nothing but the config flag, from a fresh
  directory: its outputs go to runs/avmnist_smoke there."""
  tmp = tmp_path_factory.mktemp("smoke")
  proc = run_main([SMOKE], tmp, cwd=tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, tmp / "runs" / "avmnist_smoke", proc


def test_smoke_preset_end_to_end(smoke_run):
  _, workdir, proc = smoke_run
  assert f"outputs go to {workdir}" in proc.stderr
  summary = json.load(open(workdir / "summary.json"))
  accs = [summary["student"]["test_accuracy"],
          *summary["student"]["modality_test_accuracy"].values(),
          *(t["test_accuracy"] for t in summary["teachers"].values()),
          summary["teacher_ensemble"]["test_accuracy"]]
  assert len(accs) == 6
  # 256 test examples: every accuracy is a multiple of 1/256.
  assert all(0 <= a <= 1 and abs(a * 256 - round(a * 256)) < 1e-6
             for a in accs)
  assert summary["config"]["method"] == "g2d"
  assert summary["config"]["data"]["max_examples_per_split"] == 256
  records = [json.loads(l) for l in open(workdir / "student" /
                                          "metrics.jsonl")]
  assert [r["epoch"] for r in records] == [0, 1]
  assert all(-1 <= r["val/cosine/audio"] <= 1 for r in records)
  s = summary["student"]
  for m in ("audio", "image"):
    assert s["modality_confidence_ratio"][m] == pytest.approx(
        s["modality_test_true_class_prob"][m]
        / summary["teachers"][m]["test_true_class_prob"])
    assert -1 <= s["test_feature_cosine"][m] <= 1
  # SMP: in epoch 0 (tau_1 = 1) exactly one modality trains per batch.
  r0 = records[0]
  assert r0["train/kappa/audio"] + r0["train/kappa/image"] == pytest.approx(1)
  for name in ("curves.png", "metrics.jsonl", "steps.jsonl"):
    assert (workdir / "student" / name).stat().st_size > 1000
  manifest = json.load(open(workdir / "teacher_cache" / "manifest.json"))
  assert manifest["splits"] == {"train": 256, "val": 256, "test": 256}
  assert "steps/s" in proc.stderr and "ETA" in proc.stderr


def test_tensorboard_events_hold_the_metrics_and_the_curves(smoke_run):
  _, workdir, _ = smoke_run
  scalars, images = read_events(workdir / "student" / "tensorboard")
  records = [json.loads(l) for l in open(workdir / "student" /
                                          "metrics.jsonl")]
  steps = [json.loads(l) for l in open(workdir / "student" / "steps.jsonl")]
  for key in ("val/accuracy/fused", "train/loss", "train/kappa/audio"):
    assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6))
                            for r in records]
  assert scalars["step/loss"] == [(r["step"], pytest.approx(r["loss"],
                                                            rel=1e-6))
                                  for r in steps]
  assert images == [("curves", records[-1]["step"])]
  teacher, _ = read_events(workdir / "teachers" / "audio" / "tensorboard")
  assert len(teacher["val/accuracy/fused"]) == 2


def test_rerun_skips_every_finished_stage(smoke_run):
  tmp, workdir, _ = smoke_run
  proc = run_main([SMOKE], tmp, cwd=tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("skipping") == 4  # two teachers, cache, student
  assert "step 1/" not in proc.stderr


def test_console_script_is_installed(tmp_path):
  exe = shutil.which("g2d-jax", path=os.path.dirname(sys.executable))
  assert exe, "pip install -e . installs the g2d-jax console script"
  proc = run_main(["--help"], tmp_path, command=(exe,))
  assert proc.returncode == 0 and "--workdir" in proc.stderr


def test_kill_between_the_best_and_the_latest_save_resumes_identically(
    smoke_run, tmp_path):
  """SIGKILL right after the student's first best-weights save (epoch 0's
  latest state is not saved yet): the rerun replays that epoch, saves the
  same step again and ends with the weights of the uninterrupted run."""
  _, straight, _ = smoke_run
  workdir = tmp_path / "w"
  shutil.copytree(straight / "teachers", workdir / "teachers")
  shutil.copytree(straight / "teacher_cache", workdir / "teacher_cache")
  args = [SMOKE, f"--workdir={workdir}"]
  killed = run_main(args, tmp_path, {"G2D_KILL_AT": "after_best_save"})
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  best = workdir / "student" / "checkpoints" / "best"
  latest = workdir / "student" / "checkpoints" / "latest"
  assert os.listdir(best) == ["8"] and not os.path.exists(latest / "8")
  again = run_main(args, tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  done = json.load(open(workdir / "student" / "done.json"))
  want = json.load(open(straight / "student" / "done.json"))
  assert done["digest"] == want["digest"]
  assert done["best"] == want["best"]
  got = json.load(open(workdir / "summary.json"))["student"]
  assert got == json.load(open(straight / "summary.json"))["student"]


# --------------------------------------------------------------------------
# Bad inputs, in process.


def cli(args, capsys):
  """(exit status, the one `error:` line) of `main.cli`."""
  status = main.cli(["g2d_jax.main", *args])
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, err[-3000:]
  assert "Traceback" not in err
  return status, lines[0]


@pytest.fixture(scope="module")
def trained(smoke_run, tmp_path_factory):
  """A finished smoke workdir (a copy of `smoke_run`'s, which the CLI's
  stages do not tell apart from one trained in process), for the
  stage-order cases."""
  workdir = tmp_path_factory.mktemp("cli") / "run"
  shutil.copytree(smoke_run[1], workdir)
  return workdir


@pytest.mark.parametrize("args,message", [
    (["--config.student.epochz=3"], "did you mean 'epochs'"),
    (["--config.student.epochs=abc"], "invalid literal for int()"),
    (["--config.student.epochs=-1"], "epochs must be >= 1"),
    (["--config.student.batch_size=30"], "not divisible by the 4 devices"),
    (["--config.student.batch_size=0"], "batch_size=0 must be at least 1"),
    (["--config.gating.taus=(9,)"], "longer than training"),
    (["--config.gating.taus=(1,2)"], "needs k - 1 = 1 entries"),
    (["--config.method=magic"], "config.method='magic'"),
    (["--config.model.fusion=xyz"], "Unknown fusion 'xyz'"),
    (["--config.gating.semantics=soft"], "must be 'freeze' or 'reference'"),
    (["--config.logging.wandb_mode=cloud"], "wandb_mode='cloud'"),
    (["--mode=everything"], "value should be one of"),
    (["extra"], "unexpected arguments"),
])
def test_bad_flags(args, message, tmp_path, capsys):
  status, line = cli([SMOKE, f"--workdir={tmp_path / 'w'}", *args], capsys)
  assert status == 2 and message in line
  assert not (tmp_path / "w").exists()


def test_bad_config_file_and_preset(tmp_path, capsys):
  status, line = cli([f"--config={ROOT}/configs/avmnist.py:fast",
                      f"--workdir={tmp_path}"], capsys)
  assert status == 2 and "unknown preset 'fast'" in line
  status, line = cli([f"--workdir={tmp_path}"], capsys)
  assert status == 2 and "--config is required" in line


def test_reference_gating_on_mlp_encoders(tmp_path, capsys):
  status, line = cli([f"--config={ROOT}/configs/mfeat.py:smoke",
                      f"--workdir={tmp_path / 'w'}",
                      "--config.gating.semantics=reference"], capsys)
  assert status == 2 and "encoder has none; use" in line
  assert not (tmp_path / "w").exists()


def test_workdir_naming_a_file(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("x")
  status, line = cli([SMOKE, f"--workdir={path}"], capsys)
  assert status == 2 and "is a file, not a directory" in line
  assert path.read_text() == "x"


def linked_data(tmp_path, skip=(), keep_mnist=True):
  """A data folder of symlinks to the real data, without `skip`."""
  data = tmp_path / "data"
  data.mkdir()
  for sub in ("mnist", "fsdd", "speech_commands_noise", "mfeat"):
    if sub not in skip and (keep_mnist or sub != "mnist"):
      os.symlink(os.path.join(DATA_DIR, sub), data / sub)
  return data


@pytest.mark.parametrize("case,message", [
    ("no_dir", "does not exist"),
    ("no_noise", "speech_commands_noise is missing"),
    ("no_fsdd", "fsdd/recordings is missing"),
    ("truncated", "truncated"),
])
def test_missing_or_bad_data(case, message, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("G2D_CACHE_DIR", str(tmp_path / "cache"))
  if case == "no_dir":
    data = tmp_path / "nowhere"
  elif case == "truncated":
    data = linked_data(tmp_path, keep_mnist=False)
    (data / "mnist").mkdir()
    for name in os.listdir(os.path.join(DATA_DIR, "mnist")):
      src = os.path.join(DATA_DIR, "mnist", name)
      if name.startswith("train-images"):
        raw = gzip.open(src).read()
        with gzip.open(data / "mnist" / name, "wb") as f:
          f.write(raw[:len(raw) // 2])
      else:
        os.symlink(src, data / "mnist" / name)
  else:
    data = linked_data(tmp_path, skip={"no_noise": ("speech_commands_noise",),
                                       "no_fsdd": ("fsdd",)}[case])
  status, line = cli([SMOKE, f"--workdir={tmp_path / 'w'}",
                      f"--config.data.data_dir={data}"], capsys)
  assert status == 2 and message in line
  built = list((tmp_path / "cache").rglob("manifest.json"))
  assert built == [] and not (tmp_path / "w" / "summary.json").exists()


def test_multibench_files_absent(tmp_path, capsys):
  status, line = cli([f"--config={ROOT}/configs/avmnist.py:smoke,multibench",
                      f"--workdir={tmp_path / 'w'}",
                      f"--config.data.data_dir={tmp_path}"], capsys)
  assert status == 2 and "is missing" in line and "MultiBench" in line


@pytest.mark.parametrize("mode", ["precompute", "student", "eval"])
def test_later_stages_before_the_teachers(mode, tmp_path, capsys):
  status, line = cli([SMOKE, f"--workdir={tmp_path / 'w'}", f"--mode={mode}"],
                     capsys)
  assert status == 2 and "run --mode=teachers" in line
  assert not (tmp_path / "w" / "summary.json").exists()


def test_bad_teacher_cache_and_changed_settings(trained, tmp_path, capsys):
  """An edited manifest, a deleted cache array, and a resumed student with
  other settings are refused with the fix; nothing is overwritten."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  manifest_path = workdir / "teacher_cache" / "manifest.json"
  manifest = json.load(open(manifest_path))
  json.dump(dict(manifest, splits={"train": 1}), open(manifest_path, "w"))
  args = [SMOKE, f"--workdir={workdir}", "--mode=student",
          "--config.run_name=other"]
  status, line = cli(args, capsys)
  assert status == 2 and "'splits' differs" in line
  json.dump(manifest, open(manifest_path, "w"))
  os.remove(workdir / "teacher_cache" / "train" / "audio.logits.npy")
  status, line = cli(args, capsys)
  assert status == 2 and "does not match its manifest" in line
  assert "run --mode=precompute" in line
  status, line = cli([SMOKE, f"--workdir={trained}", "--mode=student",
                      "--config.student.optimizer.lr=0.01"], capsys)
  assert status == 2 and "different settings" in line


def test_diverging_loss(tmp_path, capsys):
  status, line = cli([SMOKE, f"--workdir={tmp_path / 'w'}", "--mode=teachers",
                      "--config.teacher.optimizer.lr=1e30"], capsys)
  assert status == 2 and "lower the learning rate" in line
  assert not (tmp_path / "w" / "teachers" / "audio" / "done.json").exists()


def test_leftovers_of_killed_runs_are_removed_on_start(trained, tmp_path,
                                                       capsys):
  """A dead process's temporaries (an atomic directory, a half-written JSON
  file, an old-style teacher-cache temporary) go; a live one's stay."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  dead = 2 ** 22 + 12345       # above the default pid_max: never alive
  stale = [workdir / f".tmp-teacher_cache-{dead}",
           workdir / "teacher_cache.tmp-abc123",
           workdir / "student" / f"metrics.tmp-{dead}.jsonl"]
  for p in stale[:2]:
    p.mkdir()
  stale[2].write_text("{")
  live = workdir / f".tmp-teacher_cache-{os.getpid()}"
  live.mkdir()
  assert main.cli(["g2d_jax.main", SMOKE, f"--workdir={workdir}"]) == 0
  capsys.readouterr()
  assert [p.exists() for p in stale] == [False, False, False]
  assert live.exists()


def test_default_workdir_names():
  assert main.default_workdir("configs/avmnist.py") == os.path.join(
      "runs", "avmnist")
  assert main.default_workdir("configs/avmnist.py:quick,joint") == (
      os.path.join("runs", "avmnist_quick_joint"))
  assert main.smaller_preset_hint(f"{ROOT}/configs/avmnist.py") == (
      f"--config={ROOT}/configs/avmnist.py:quick")
  np.testing.assert_equal(main.smaller_preset_hint("nonexistent.py"),
                          "a smaller preset")
