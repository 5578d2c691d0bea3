#!/usr/bin/env bash
# The GPU path, checked in one script, on a machine with an NVIDIA GPU (the
# development machine has none: every number in experiments/README.md that
# is not from this script is from a CPU).
#
#   G2D_DATA_DIR=../shared/data bash experiments/device_check.sh [OUT_DIR]
#
# Stages, each named when it fails (non-zero exit; nothing falls back to the
# CPU silently: the devices stage fails unless JAX's default backend is the
# GPU, and the smoke stage checks its job ran on it):
#   venv       a fresh venv with requirements.txt + requirements-gpu.txt
#   devices    prints the devices; fails unless JAX sees a GPU
#   tests      the suite's fast single-device subset, on the GPU
#   smoke      the AV-MNIST smoke job end to end on the GPU (summary.json)
#   torch      PyTorch with CUDA, if pip can install it (else the benchmark
#              is JAX only, and the JSON says why)
#   benchmark  experiments/benchmark_step.py: paper model, batch 16 and 128,
#              joint and G2D, JAX against PyTorch on CUDA
#   report     OUT_DIR/device_check.json (everything) and a short table
# Budget: under 8 minutes on one H100 (the benchmark uses 3 reps of 5 steps).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=$(realpath -m "${1:-device_check}")
mkdir -p "$out"
stage="start"
begin=$(date +%s)
trap 'echo "device_check: FAILED in stage \"$stage\" (see $out/$stage.log)" >&2' ERR
run() {  # run STAGE CMD...: logs to OUT/STAGE.log and times the stage
  stage=$1; shift
  local t0=$(date +%s)
  echo "== $stage"
  "$@" > "$out/$stage.log" 2>&1
  echo "$stage $(( $(date +%s) - t0 ))" >> "$out/stage_seconds.txt"
}
: > "$out/stage_seconds.txt"

# DEVICE_CHECK_VENV=DIR reuses a venv made by an earlier run.
venv="${DEVICE_CHECK_VENV:-$out/venv}"
if [ -z "${DEVICE_CHECK_VENV:-}" ]; then
  run venv bash -c "python3 -m venv '$venv' && . '$venv/bin/activate' \
    && pip install -q --upgrade pip && pip install -q -r requirements.txt \
    -r requirements-gpu.txt && pip install -q --no-deps -e ."
fi
. "$venv/bin/activate"
# The GPU first (the default backend); the CPU beside it for the host-side
# work that asks for it (the SMP gate is computed on the host CPU device).
export JAX_PLATFORMS=cuda,cpu
export G2D_DATA_DIR="${G2D_DATA_DIR:-$root/../shared/data}"

run devices python -c "
import jax
devices = jax.devices()
print('jax', jax.__version__, 'backend', jax.default_backend())
for d in devices:
  print(' ', d.id, d.platform, d.device_kind)
assert jax.default_backend() == 'gpu', 'JAX does not see a GPU'
"
cat "$out/devices.log"

# Single-device tests that exercise what differs on a GPU: the step
# (donation, no host transfers, bfloat16, gated patterns), kernels that
# resolve by backend, losses and gating. Multi-device tests need 4 CPU
# devices and stay on the CPU suite.
run tests python -m pytest -q -p no:cacheprovider \
  tests/test_losses.py tests/test_smp.py tests/test_gating.py \
  tests/test_confidence.py tests/test_calibration.py \
  "tests/test_pipeline_steps.py::test_bfloat16_activations_keep_float32_parameters_and_losses" \
  "tests/test_pipeline_steps.py::test_step_donates_its_state_and_never_touches_the_host" \
  "tests/test_pipeline_steps.py::test_skipping_frozen_backward_gives_identical_parameters" \
  "tests/test_models_conv.py::test_im2col_equals_xla_conv_values_and_gradients" \
  "tests/test_models_conv.py::test_fast_max_pool_equals_xla_values_and_gradient_with_ties"
tail -n 1 "$out/tests.log"

run smoke python -m g2d_jax.main --config=configs/avmnist.py:smoke \
  --workdir="$out/smoke"
test -f "$out/smoke/summary.json"
grep -q "device(s) (gpu)" "$out/smoke.log"

torch_note="PyTorch with CUDA installed"
stage=torch
if pip install -q torch > "$out/torch.log" 2>&1 \
    && python -c "import torch; assert torch.cuda.is_available()" \
      >> "$out/torch.log" 2>&1; then
  impls=jax,torch
else
  impls=jax
  torch_note="no PyTorch with CUDA here (see torch.log): JAX only"
fi
echo "== torch: $torch_note"

G2D_TORCH_DEVICE=cuda run benchmark python experiments/benchmark_step.py \
  --models=paper --batch_sizes=16,128 --methods=joint,g2d --impls="$impls" \
  --reps=3 --steps=5 --max_wait=2 --out="$out/step.json"

run report python - "$out" "$torch_note" "$(( $(date +%s) - begin ))" <<'EOF'
import json, os, sys
out, torch_note, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
step = json.load(open(os.path.join(out, "step.json")))
stages = dict(line.split() for line in open(os.path.join(out,
                                                         "stage_seconds.txt")))
summary = json.load(open(os.path.join(out, "smoke", "summary.json")))
report = {"devices": open(os.path.join(out, "devices.log")).read(),
          "tests": open(os.path.join(out, "tests.log")).read().strip()
                   .splitlines()[-1],
          "smoke_student_test_accuracy": summary["student"]["test_accuracy"],
          "torch": torch_note, "step": step,
          "stage_seconds": {k: int(v) for k, v in stages.items()},
          "total_seconds": seconds}
json.dump(report, open(os.path.join(out, "device_check.json"), "w"),
          indent=1)
lines = ["| impl | batch | method | median ms | ex/s | jax/torch |",
         "|---|---|---|---|---|---|"]
for r in step["records"]:
  if r["pattern"] != "all":
    continue
  ratio = r.get("jax_over_torch")
  lines.append(f"| {r['impl']} | {r['batch_size']} | {r['method']} | "
               f"{r['median_ms']:.1f} | {r['examples_per_s']:.0f} | "
               f"{'-' if ratio is None else f'{ratio:.2f}'} |")
open(os.path.join(out, "device_check.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
cat "$out/report.log"
echo "device_check: passed in $(( $(date +%s) - begin )) s; $out/device_check.json"
