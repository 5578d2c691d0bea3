r"""Student step time of every balancing method, relative to joint training.

All methods run in one process on the same model (AV-MNIST `quick` by
default: the two stride-2 CNN encoders, batch 64, late fusion) and the same
random batches shaped like AV-MNIST (audio 112x112, image 28x28, uint8).
Every variant is compiled first (compile time reported apart), then the
variants run interleaved in blocks of `--steps` steps for `--rounds` rounds
(A B C ... A B C ...), each step timed with `jax.block_until_ready`; a
variant's time is the median over all its timed steps, and its ratio to
joint is the median over rounds of (its block median / joint's block median
in the same round), so load from other processes affects both sides alike.

Variants are the methods as `configs/avmnist.py:quick --config.method=NAME`
runs them (SMP off, except G2D, whose step is timed in its joint phase,
pattern "all"), plus G2D inside its SMP window with one branch frozen (the
step that skips the frozen branch's backward pass). UME has no training
step. Epoch hooks are not part of the step: PMR's prototype pass (inference
over a tenth of the training batches at the start of every epoch), MSLR's
validation pass and Gradient Blending's probe trainings are timed apart and
reported amortised per training step (an AV-MNIST-sized epoch: 55,000
training and 5,000 validation examples).

  python experiments/method_step_time.py                      # ~5 min
  python experiments/method_step_time.py --rounds=3 --steps=3 # quicker
  python experiments/method_step_time.py --out=/tmp/step_time.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import avmnist
from g2d_jax import methods
from g2d_jax.data import base
from g2d_jax.data import synthetic
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import student
# pylint: enable=g-import-not-at-top,wrong-import-position

_PRESET = flags.DEFINE_string("preset", "quick", "configs/avmnist.py preset.")
_BATCH = flags.DEFINE_integer("batch_size", 0,
                              "Batch size (0: the preset's student batch).")
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant per round.")
_METHODS = flags.DEFINE_list(
    "methods",
    [m for m in methods.available() if not methods.trains_nothing(m)],
    "Methods to time (joint, the reference, first).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")

MODS = ("audio", "image")
TRAIN_EXAMPLES = 55000  # AV-MNIST's training split (steps per epoch for PMR)
VAL_EXAMPLES = 5000     # its validation split (MSLR's hook, GBlending's probes)


def fake_dataset(n: int) -> base.MultimodalDataset:
  """Random data with AV-MNIST's shapes, dtypes and scales."""
  return synthetic.random_dataset(
      n, {"audio": (112, 112, 1), "image": (28, 28, 1)}, 10,
      "random_avmnist_shapes")


def make_variant(name: str, method_name: str, frozen: str | None,
                 batch_size: int, mesh) -> dict:
  """Builds, initialises and compiles one variant; returns its runner."""
  cfg = avmnist.get_config(_PRESET.value)
  cfg.unlock()
  cfg.method = method_name
  cfg.student.batch_size = batch_size
  cfg.lock()
  ds = fake_dataset(4 * batch_size)
  spe = loader.steps_per_epoch(TRAIN_EXAMPLES, batch_size)
  s = student.build_student(cfg, ds, mesh)
  model, method, gate, step, state = s.model, s.method, s.gate, s.step, s.state
  hook_s = None
  if method.epoch_hook is not None:
    hook_spec = method.epoch_hook
    hook = student.make_epoch_hook(
        s, ds.splits["train"], batch_size, cfg.seed, mesh,
        val=ds.splits["val"],
        probe_tx=student.probe_optimizer(cfg, s.steps_per_epoch))
    state = hook(state, 0)  # compile
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state = hook(state, 0)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0
    if isinstance(hook_spec, methods.ProbeHook):
      # One round trains every probe for `epochs` epochs of the fake split's
      # 4 batches (plus 2 validation passes of its 4 batches each); a real
      # round does that on spe batches per epoch once every `every` epochs.
      per_batch = elapsed / (len(hook_spec.probes) * (hook_spec.epochs * 4 + 8))
      hook_s = (per_batch * len(hook_spec.probes) * (
          hook_spec.epochs * spe + 2 * VAL_EXAMPLES // batch_size)
                / (hook_spec.every * spe))
    elif hook_spec.split == "val":
      # The whole validation split (4 batches here) once per epoch.
      hook_s = elapsed / 4 * (VAL_EXAMPLES // batch_size) / spe
    else:
      # One batch per call here (4 batches in the fake split); a real epoch
      # visits num_batches(spe) of them once per spe steps.
      hook_s = elapsed * hook_spec.num_batches(spe) / spe
  feats = jax.eval_shape(lambda: steps.apply_model(
      model, state.params, state.batch_stats,
      {m: ds.splits["train"].batch(np.arange(2))[m] for m in MODS},
      train=False)[0])
  rng = np.random.default_rng(1)
  batches = []
  for i in range(4):
    b = next(loader.train_batches(ds.splits["train"], batch_size, seed=i,
                                  epoch=0))
    b["teacher"] = {
        "logits": {m: rng.normal(size=(batch_size, 10)).astype(np.float32)
                   for m in MODS},
        "features": {m: rng.normal(size=(batch_size,
                                         feats.features[m].shape[-1]))
                     .astype(np.float32) for m in MODS}}
    if frozen is not None:
      # Teacher logits that make `frozen` the more confident modality, so
      # SMP trains the other one alone (epoch 0 is in the window).
      b["label"] = np.zeros(batch_size, np.int32)
      for m in MODS:
        b["teacher"]["logits"][m][:, 0] = 5.0 if m == frozen else -5.0
    b["gate"] = gate.for_batch(b, 0)
    batches.append(mesh_lib.shard_batch(b, mesh))
  pattern = batches[0]["gate"]["pattern"]
  run = {"state": state, "i": 0}

  def one_step():
    b = batches[run["i"] % len(batches)]
    run["i"] += 1
    t0 = time.perf_counter()
    run["state"], m = step(run["state"], b, np.int32(0), jax.random.key(0))
    jax.block_until_ready((run["state"], m))
    return time.perf_counter() - t0

  compile_s = one_step()  # compiles (and runs) the step once
  one_step()
  return {"name": name, "step": one_step, "compile_s": compile_s,
          "pattern": pattern, "hook_per_step_s": hook_s, "times": [],
          "blocks": []}


def main(argv):
  del argv
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  batch_size = _BATCH.value or avmnist.get_config(
      _PRESET.value).student.batch_size
  plan = [(m, m, None) for m in _METHODS.value]
  if "g2d" in _METHODS.value:
    plan.append(("g2d, SMP window (image frozen)", "g2d", "image"))
  if plan[0][0] != "joint":
    raise app.UsageError("--methods must start with joint (the reference).")
  variants = []
  for name, method_name, frozen in plan:
    t0 = time.perf_counter()
    variants.append(make_variant(name, method_name, frozen, batch_size, mesh))
    print(f"built {name} in {time.perf_counter() - t0:.1f} s "
          f"(first step incl. compile {variants[-1]['compile_s']:.2f} s)",
          flush=True)
  load0 = os.getloadavg()[0]
  for _ in range(_ROUNDS.value):
    for v in variants:
      times = [v["step"]() for _ in range(_STEPS.value)]
      v["times"] += times
      v["blocks"].append(statistics.median(times))
  load1 = os.getloadavg()[0]
  ref = variants[0]
  rows = []
  for v in variants:
    ratios = [b / r for b, r in zip(v["blocks"], ref["blocks"])]
    row = {"variant": v["name"], "median_ms": 1e3 * statistics.median(
        v["times"]), "ratio_to_joint": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios),
           "compile_s": v["compile_s"], "pattern": v["pattern"]}
    if v["hook_per_step_s"] is not None:
      row["epoch_hook_ms_per_step"] = 1e3 * v["hook_per_step_s"]
      row["ratio_to_joint_with_epoch_hook"] = (
          (statistics.median(v["times"]) + v["hook_per_step_s"])
          / statistics.median(ref["times"]))
    rows.append(row)
  print(f"\n{_PRESET.value} model, batch {batch_size}, "
        f"{_ROUNDS.value} rounds x {_STEPS.value} steps, "
        f"{jax.devices()[0].platform} x1, load avg {load0:.1f} -> {load1:.1f}")
  print(f"{'variant':34s} {'ms/step':>8s} {'x joint':>8s} {'(min-max)':>13s}"
        f" {'compile s':>9s}")
  for r in rows:
    extra = ""
    if "epoch_hook_ms_per_step" in r:
      extra = (f"  +{r['epoch_hook_ms_per_step']:.2f} ms/step epoch hook "
               f"-> {r['ratio_to_joint_with_epoch_hook']:.2f}x")
    print(f"{r['variant']:34s} {r['median_ms']:8.1f} "
          f"{r['ratio_to_joint']:8.2f} ({r['ratio_min']:.2f}-"
          f"{r['ratio_max']:.2f}) {r['compile_s']:9.1f}{extra}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"preset": _PRESET.value, "batch_size": batch_size,
                 "rounds": _ROUNDS.value, "steps": _STEPS.value,
                 "load_avg": [load0, load1], "jax": jax.__version__,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
