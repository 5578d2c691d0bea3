r"""Trains one unimodal teacher of a config exactly as `--mode=teachers` does
and reports what the AV-MNIST calibration needs: val and test accuracy per
epoch, and the teacher's confidence on training batches (Eq. 5, which SMP
ranks modalities by), at the selected (best-val) epoch.

  G2D_DATA_DIR=../shared/data python experiments/calibrate_teacher.py \
      --config=configs/avmnist.py:quick --modality=audio \
      --config.data.audio_split=take --config.data.snr_db=-13.5

Nothing is written outside a temporary directory except `--json_out`.
"""

from __future__ import annotations

import json
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from g2d_jax import artifacts
from g2d_jax import data
from g2d_jax.methods import joint
from g2d_jax.pipeline import build
from g2d_jax.pipeline import loader
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import scoring
from g2d_jax.pipeline import steps
from g2d_jax.pipeline import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_MODALITY = flags.DEFINE_string("modality", "audio", "Teacher to train.")
_CONF_SAMPLES = flags.DEFINE_integer(
    "confidence_samples", 8192, "Training samples for the confidence.")
_JSON = flags.DEFINE_string("json_out", "", "Write the results here.")


def main(argv):
  del argv
  c, m = _CONFIG.value, _MODALITY.value
  ds = data.load_dataset(c.data)
  mesh = mesh_lib.data_mesh()
  train = ds.splits["train"]
  spe = loader.steps_per_epoch(len(train), c.teacher.batch_size)
  model = build.teacher_model(c, ds, m)
  tx = steps.make_optimizer(c.teacher.optimizer, spe, c.teacher.epochs)
  state = build.new_state(model, tx, train, c.seed, mesh)
  step = steps.TrainStep(model, tx, joint.build(c, ds.task), ds.task)
  ev = scoring.make_eval_step(model, ds.task)
  score = lambda split: (lambda p, b: scoring.evaluate_split(
      ev, p, b, ds.splits[split], c.eval.batch_size, mesh))
  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:
    fit = trainer.fit(
        name=f"teacher/{m}", directory=tmp, state=state, step_fn=step,
        train_split=train, batch_size=c.teacher.batch_size,
        epochs=c.teacher.epochs, seed=c.seed, task=ds.task,
        evaluate=score("val"), monitors={"test": score("test")}, mesh=mesh,
        fingerprint={"calibration": True}, log_every_steps=c.log_every_steps)
  wall = time.time() - t0
  weights = fit.weights

  @jax.jit
  def true_prob(x, y):
    out, _ = steps.apply_model(model, weights["params"],
                               weights["batch_stats"], x, train=False)
    p = jax.nn.softmax(out.logits, -1)
    return jnp.sum(jnp.take_along_axis(p, y[:, None], -1))

  idx = np.random.default_rng(0).permutation(len(train))[:_CONF_SAMPLES.value]
  total = 0.0
  for i in range(0, len(idx), 256):
    b = train.batch(idx[i:i + 256])
    total += float(true_prob({m: b[m]}, b["label"]))
  result = {
      "modality": m, "data": artifacts.plain(c.data),
      "epochs": [{"epoch": r["epoch"], "val": r["val/accuracy/fused"],
                  "test": r["test/accuracy/fused"]} for r in fit.history],
      "best_epoch": fit.best["epoch"],
      "best_val": fit.best["val"]["accuracy/fused"],
      "test_at_best": fit.history[fit.best["epoch"]]["test/accuracy/fused"],
      "train_confidence_at_best": total / len(idx), "wall_s": wall}
  print(json.dumps(result, indent=1))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
