"""The command line: the smoke preset end to end, and bad inputs that must
end with one clear message, exit status 2 and no valid-looking output."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import DATA_DIR

ROOT = os.path.join(os.path.dirname(__file__), "..")


def run_main(args, tmp_path, env_extra=None, data_dir=DATA_DIR, cwd=ROOT):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["G2D_CACHE_DIR"] = str(tmp_path / "cache")
  if data_dir is None:
    env.pop("G2D_DATA_DIR", None)
  else:
    env["G2D_DATA_DIR"] = data_dir
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "g2d_jax.main", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600)


def last_error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("smoke")
  workdir = tmp / "run"
  # As in the README: a workdir relative to the current directory.
  proc = run_main([f"--config={ROOT}/configs/avmnist.py:smoke",
                   "--workdir=run", "--config.eval.test_every_epoch=True"],
                  tmp, cwd=tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, workdir, proc


def test_smoke_preset_end_to_end(smoke_run):
  _, workdir, proc = smoke_run
  summary = json.load(open(workdir / "summary.json"))
  accs = [summary["student"]["test_accuracy"],
          *summary["student"]["modality_test_accuracy"].values(),
          *(t["test_accuracy"] for t in summary["teachers"].values())]
  assert len(accs) == 5
  # 256 test examples: every accuracy is a multiple of 1/256.
  assert all(0 <= a <= 1 and abs(a * 256 - round(a * 256)) < 1e-6
             for a in accs)
  assert summary["config"]["method"] == "g2d"
  assert summary["config"]["data"]["max_examples_per_split"] == 256
  records = [json.loads(l) for l in open(workdir / "student" /
                                          "metrics.jsonl")]
  assert [r["epoch"] for r in records] == [0, 1]
  # Learning curves on test (never used for selection) and diagnostics.
  assert all(0 <= r["test/accuracy/fused"] <= 1 and -1 <= r["val/cosine/audio"]
             <= 1 for r in records)
  s = summary["student"]
  for m in ("audio", "image"):
    assert s["modality_confidence_ratio"][m] == pytest.approx(
        s["modality_test_true_class_prob"][m]
        / summary["teachers"][m]["test_true_class_prob"])
    assert -1 <= s["test_feature_cosine"][m] <= 1
  # SMP: in epoch 0 (tau_1 = 1) exactly one modality trains per batch.
  r0 = records[0]
  assert r0["train/kappa/audio"] + r0["train/kappa/image"] == pytest.approx(1)
  assert records[1]["train/kappa/audio"] == records[1]["train/kappa/image"] == 1
  steps = [json.loads(l) for l in open(workdir / "student" / "steps.jsonl")]
  assert len(steps) == 2 * (256 // 32)
  for name in ("curves.png",):
    assert (workdir / "student" / name).stat().st_size > 1000
  manifest = json.load(open(workdir / "teacher_cache" / "manifest.json"))
  assert manifest["splits"] == {"train": 256, "val": 256, "test": 256}
  assert "steps/s" in proc.stderr and "ETA" in proc.stderr


def test_rerun_skips_every_finished_stage(smoke_run):
  tmp, workdir, _ = smoke_run
  proc = run_main(["--config=configs/avmnist.py:smoke", f"--workdir={workdir}",
                   "--config.eval.test_every_epoch=True"], tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("skipping") == 4  # two teachers, cache, student
  assert "step 1/" not in proc.stderr


def test_changed_student_settings_in_same_workdir_are_refused(smoke_run):
  tmp, workdir, _ = smoke_run
  proc = run_main(["--config=configs/avmnist.py:smoke", f"--workdir={workdir}",
                   "--mode=student", "--config.student.optimizer.lr=0.01"],
                  tmp)
  assert proc.returncode == 2
  assert "different settings" in last_error_line(proc)


@pytest.mark.parametrize("args,message", [
    (["--config.student.epochz=3"], "did you mean 'epochs'"),
    (["--config.gating.taus=(9,)"], "longer than training"),
    (["--config.method=magic"], "config.method='magic'"),
])
def test_bad_config_is_one_line_and_exit_2(args, message, tmp_path):
  proc = run_main(["--config=configs/avmnist.py:smoke",
                   f"--workdir={tmp_path / 'w'}", *args], tmp_path)
  assert proc.returncode == 2
  assert message in last_error_line(proc)
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "summary.json").exists()


def test_batch_not_divisible_by_devices(tmp_path):
  proc = run_main(["--config=configs/avmnist.py:smoke",
                   f"--workdir={tmp_path / 'w'}",
                   "--config.student.batch_size=30"], tmp_path,
                  {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert proc.returncode == 2
  assert "not divisible by the 4 devices" in last_error_line(proc)


def test_missing_data_dir(tmp_path):
  proc = run_main(["--config=configs/avmnist.py:smoke",
                   f"--workdir={tmp_path / 'w'}"], tmp_path, data_dir=None)
  assert proc.returncode == 2
  assert "G2D_DATA_DIR" in last_error_line(proc)
  assert not (tmp_path / "w").exists()


def test_truncated_idx_file_leaves_no_build(tmp_path):
  data = tmp_path / "data"
  (data / "mnist").mkdir(parents=True)
  for sub in ("fsdd", "speech_commands_noise", "mfeat"):
    os.symlink(os.path.join(os.path.abspath(DATA_DIR), sub), data / sub)
  for name in os.listdir(os.path.join(DATA_DIR, "mnist")):
    src = os.path.join(DATA_DIR, "mnist", name)
    if name.startswith("train-images"):
      raw = gzip.open(src).read()
      with gzip.open(data / "mnist" / name, "wb") as f:
        f.write(raw[:len(raw) // 2])
    else:
      os.symlink(os.path.abspath(src), data / "mnist" / name)
  proc = run_main(["--config=configs/avmnist.py:smoke",
                   f"--workdir={tmp_path / 'w'}"], tmp_path,
                  data_dir=str(data))
  assert proc.returncode == 2
  assert "truncated" in last_error_line(proc)
  cache = tmp_path / "cache"
  built = [p for p in cache.rglob("manifest.json")] if cache.exists() else []
  assert built == []


@pytest.mark.parametrize("labels_max,audio_size,message", [
    (10, 112, "labels out of range: found values 0..10"),
    (9, 100, "expected [N, 112, 112] spectrograms"),  # wrong array shape
])
def test_bad_multibench_arrays_are_one_line_and_exit_2(
    labels_max, audio_size, message, tmp_path):
  """MultiBench's layout with a label 10 or 100x100 spectrograms."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  root = tmp_path / "mb"
  (root / "image").mkdir(parents=True)
  (root / "audio").mkdir()
  for part, n in (("train", 30), ("test", 10)):
    np.save(root / "image" / f"{part}_data.npy", np.zeros((n, 784), np.uint8))
    np.save(root / "audio" / f"{part}_data.npy",
            np.zeros((n, audio_size, audio_size), np.uint8))
    np.save(root / f"{part}_labels.npy", np.arange(n) % (labels_max + 1))
  proc = run_main(["--config=configs/avmnist.py:smoke,multibench",
                   f"--workdir={tmp_path / 'w'}",
                   f"--config.data.data_dir={root}",
                   "--config.data.num_val=10"], tmp_path)
  assert proc.returncode == 2
  assert message in last_error_line(proc)
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "summary.json").exists()
