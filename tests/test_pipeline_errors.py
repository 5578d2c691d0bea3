"""Bad configs and a diverging run end with a clear error and no output that
a later run would take as valid."""

import os

import jax
import pytest

from g2d_jax.errors import ConfigError
from g2d_jax.errors import TrainingError
from g2d_jax.pipeline import config as config_lib
from g2d_jax.pipeline import mesh as mesh_lib
from g2d_jax.pipeline import records
from g2d_jax.pipeline import student as student_lib
from g2d_jax.pipeline import teachers
from tests import pipeline_fixtures as fx

MODS = ("audio", "image")


@pytest.mark.parametrize("override,match", [
    ({"student.batch_size": 30}, "not divisible by the 4 devices"),
    ({"teacher.batch_size": 6}, "config.teacher.batch_size=6"),
    ({"eval.batch_size": 10}, "config.eval.batch_size=10"),
    ({"gating.taus": (9,)}, "longer than training"),
    ({"gating.taus": (1, 1)}, "needs k - 1 = 1 entries"),
    ({"gating.semantics": "soft"}, "semantics"),
    ({"method": "magic"}, "config.method='magic'"),
    ({"student.epochs": 0}, "epochs must be >= 1"),
])
def test_bad_config_values(override, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(fx.tiny_config(**override), 4, MODS)


def test_good_config_passes_and_smp_off_ignores_taus():
  config_lib.validate(fx.tiny_config(), 4, MODS)
  config_lib.validate(fx.tiny_config(**{"smp": False, "gating.taus": (99,)}),
                      4, MODS)
  with pytest.raises(ConfigError, match="one encoder per modality"):
    config_lib.validate(fx.tiny_config(), 4, ("audio", "video"))


def test_diverging_loss_stops_with_a_message_and_no_done_marker(tmp_path):
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(**{"teacher.optimizer.lr": 1e30})
  mesh = mesh_lib.data_mesh(jax.devices()[:1])
  with pytest.raises(TrainingError, match="lower the learning rate"):
    teachers.train_teachers(cfg, ds, str(tmp_path), mesh)
  audio = teachers.teacher_dir(str(tmp_path), "audio")
  assert not os.path.exists(os.path.join(audio, records.DONE))
  with pytest.raises(Exception, match="--mode=teachers"):
    teachers.teacher_digests(cfg, ds, str(tmp_path))


def test_reference_gating_on_an_encoder_without_convs_is_a_config_error():
  """fx's image encoder is an MLP: `reference` would never gate it."""
  ds = fx.tiny_dataset()
  cfg = fx.tiny_config(**{"gating.semantics": "reference"})
  with pytest.raises(ConfigError, match="'image' encoder has none; use "
                     "--config.gating.semantics=freeze"):
    student_lib.build_student(cfg, ds, mesh_lib.data_mesh(jax.devices()[:1]),
                              init=False)
