r"""Test accuracy of the trained teachers in a workdir (no student needed).

Used for calibrating the AV-MNIST defaults against the pipeline's own
teachers:

  G2D_DATA_DIR=../shared/data python experiments/teacher_test_accuracy.py \
      --config=configs/avmnist.py:quick --workdir=runs/calib \
      --config.data.snr_db=-5.0
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from g2d_jax import data
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import scoring
from g2d_jax.pipeline import teachers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir with teachers.")


def main(argv):
  del argv
  cfg = _CONFIG.value
  ds = data.load_dataset(cfg.data)
  mesh = mesh_lib.data_mesh()
  for m in ds.modalities:
    record = teachers.teacher_record(cfg, ds, _WORKDIR.value, m)
    model, w = teachers.load_teacher(cfg, ds, _WORKDIR.value, m, mesh)
    res = {}
    for split in ("val", "test"):
      res[split] = scoring.evaluate_split(
          scoring.make_eval_step(model, ds.task), w["params"],
          w["batch_stats"], ds.splits[split], cfg.eval.batch_size,
          mesh)["accuracy/fused"]
    print(f"{m}: best epoch {record['best']['epoch']}, val {res['val']:.4f}, "
          f"test {res['test']:.4f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
