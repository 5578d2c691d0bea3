"""Schedule-relative windows: fractions of the run, absolute overrides, and
the resolved record every summary keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import avmnist
from configs import mfeat
from g2d_jax import schedule
from g2d_jax.errors import ConfigError
from g2d_jax.methods import pmr
from g2d_jax.methods.base import StepContext
from g2d_jax.models import MultimodalOutput
from g2d_jax.pipeline import config as config_lib
from tests import pipeline_fixtures as fx


@pytest.mark.parametrize("fraction,epochs,want", [
    (0.51, 100, 51), (0.51, 8, 4), (151 / 300, 300, 151), (151 / 300, 8, 4),
    (151 / 300, 2, 1), (0.5, 7, 4), (0.71, 8, 6), (0.71, 100, 71),
    (2 / 3, 300, 200), (0.0, 5, 0), (1.0, 5, 5)])
def test_boundary_rounds_half_up(fraction, epochs, want):
  assert schedule.boundary(fraction, epochs) == want


def test_release_windows_come_back_exactly_at_release_length():
  # OGM-GE: modulation epochs 0..50 (inclusive) of 100.
  w = schedule.resolve_window(schedule.window_config(0.0, 0.51), 100)
  assert (w.start, w.stop, w.num_epochs) == (0, 51, 51)
  assert w.record(100) == {"first_epoch": 0, "last_epoch": 50, "epochs": 51,
                           "share": 0.51}
  # The same fractions on the quick protocol's 8 epochs: half the run.
  assert schedule.resolve_window(schedule.window_config(0.0, 0.51),
                                 8) == schedule.Window(0, 4)
  # PMR's 0..70 of 100, and at 8 epochs.
  assert schedule.resolve_window(schedule.window_config(0.0, 0.71),
                                 100) == schedule.Window(0, 71)
  assert schedule.resolve_window(schedule.window_config(0.0, 0.71),
                                 8) == schedule.Window(0, 6)


def test_absolute_epochs_override_fractions():
  w = schedule.window_config(0.0, 0.51)
  w.end_epoch = 2                      # inclusive, as the releases write it
  assert schedule.resolve_window(w, 8) == schedule.Window(0, 3)
  w.end_epoch = 50                     # the unscaled release value at 8 ...
  assert schedule.resolve_window(w, 8) == schedule.Window(0, 8)  # ... = all
  w.end_epoch = -1
  w.start_epoch = 3
  assert schedule.resolve_window(w, 8) == schedule.Window(3, 8)
  w.start_epoch = 9                    # starts after the run: empty
  empty = schedule.resolve_window(w, 8)
  assert empty.num_epochs == 0 and empty.record(8)["first_epoch"] is None


def test_window_contains_is_traced_and_half_open():
  w = schedule.Window(2, 5)
  got = jax.jit(jax.vmap(w.contains))(jnp.arange(7))
  np.testing.assert_array_equal(got, [0, 0, 1, 1, 1, 0, 0])


@pytest.mark.parametrize("fields,match", [
    (dict(end=1.2), r"end=1.2 is a fraction .* \[0, 1\].*end_epoch"),
    (dict(start=-0.1), r"start=-0.1 is a fraction.*start_epoch"),
    (dict(start=0.6, end=0.4), "ends .* before it starts"),
    (dict(start_epoch=4, end_epoch=2), "end_epoch=2 is before its start"),
    (dict(start_epoch=-1), "start_epoch=-1 must be >= 0"),
])
def test_bad_windows_name_the_field_and_the_fix(fields, match):
  w = schedule.window_config(0.0, 0.5)
  for k, v in fields.items():
    w[k] = v
  with pytest.raises(ConfigError, match=match):
    schedule.resolve_window(w, 10, "ogm_ge.window")


def test_smp_taus_cut_at_cumulative_fractions():
  two_stages = (75 / 300, 76 / 300)
  assert schedule.smp_taus(two_stages, 300) == (75, 76)
  assert schedule.smp_taus(two_stages, 6) == (2, 1)
  assert schedule.smp_taus((0.25, 0.25), 60) == (15, 15)
  # Cumulative rounding keeps the total: 3 x (1/3) of 10 is 3 + 4 + 3.
  assert schedule.smp_taus((1 / 3, 1 / 3, 1 / 3), 10) == (3, 4, 3)
  assert schedule.smp_taus((0.5,), 8, absolute=(2,)) == (2,)
  with pytest.raises(ConfigError, match="add up to 1.1"):
    schedule.smp_taus((0.6, 0.5), 10)
  with pytest.raises(ConfigError, match="longer than training"):
    schedule.smp_taus((0.5,), 8, absolute=(9,))
  with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
    schedule.smp_taus((1.5,), 8)


def test_decay_epochs():
  assert schedule.decay_epochs((2 / 3,), 300) == (200,)
  assert schedule.decay_epochs((0.7,), 8) == (6,)
  assert schedule.decay_epochs((0.7,), 8, absolute=(3,)) == (3,)
  assert schedule.decay_epochs((), 8) == ()


def test_presets_resolve_to_the_release_proportions():
  quick = config_lib.resolve_schedule(avmnist.get_config("quick,ogm_ge"))
  assert quick["windows"]["ogm_ge.window"] == {
      "first_epoch": 0, "last_epoch": 3, "epochs": 4, "share": 0.5,
      "given": "fractions", "fractions": [0.0, 0.51]}
  assert quick["student_optimizer"]["decay_epochs"] == [6]
  assert quick["teacher_optimizer"]["decay_epochs"] == [3]
  g2d = config_lib.resolve_schedule(avmnist.get_config("quick"))
  assert g2d["smp"]["taus"] == [4] and g2d["windows"] == {}
  paper = config_lib.resolve_schedule(avmnist.get_config("paper"))
  assert paper["smp"]["taus"] == [151]
  assert paper["student_optimizer"]["decay_epochs"] == [200]
  pmr_quick = config_lib.resolve_schedule(avmnist.get_config("quick,pmr"))
  assert pmr_quick["windows"]["pmr.window"]["last_epoch"] == 5
  three = mfeat.get_config("three_views")
  assert schedule.gating_taus(three) == (15, 15)
  # A longer run scales every window alike.
  long = avmnist.get_config("quick,ogm_ge").unlock()
  long.student.epochs = 24
  got = config_lib.resolve_schedule(long)
  assert got["windows"]["ogm_ge.window"]["last_epoch"] == 11
  assert got["student_optimizer"]["decay_epochs"] == [18]


def test_released_protocol_swaps_only_the_optimizer():
  c = avmnist.get_config("quick,mlb").unlock()
  assert config_lib.student_optimizer(c).name == "sgd"
  c.protocol = "released"
  opt = config_lib.student_optimizer(c)
  assert (opt.name, opt.lr, opt.weight_decay) == ("adam", 1e-3, 1e-4)
  c.method = "joint"
  got = config_lib.resolve_schedule(c)
  # StepLR(70) of 100 epochs is 0.7 of the run: epoch 6 of 8.
  assert got["student_optimizer"] == {"name": "sgd", "lr": 1e-3,
                                      "decay_factor": 0.1, "decay_epochs": [6]}
  assert got["protocol"] == "released"
  # Teachers are shared by every method: their optimizer never changes.
  assert got["teacher_optimizer"]["lr"] == 0.01
  assert c.student.batch_size == 64


@pytest.mark.parametrize("overrides,match", [
    ({"protocol": "fair"}, "config.protocol='fair' must be one of"),
    ({"method": "ogm_ge", "ogm_ge.window.end": 1.5}, r"ogm_ge.window.end=1.5"),
    ({"method": "pmr", "pmr.window.start": 0.8, "pmr.window.end": 0.2},
     "ends .* before it starts"),
    ({"gating.taus": None, "gating.tau_fractions": (1.2,)},
     r"must be in \[0, 1\]"),
    ({"gating.taus": None, "gating.tau_fractions": (0.5, 0.5)},
     r"tau_fractions=\(0.5, 0.5\) needs k - 1 = 1 entries"),
    ({"student.optimizer.decay_epochs": None,
      "student.optimizer.decay_fractions": (2.0,)},
     r"decay_fractions entry=2.0 .*decay_epochs"),
])
def test_validate_refuses_bad_schedules(overrides, match):
  config = fx.tiny_config(**overrides)
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(config, 1, ("audio", "image"))


def test_validate_accepts_fractions_and_resolves_them():
  config = fx.tiny_config(**{"gating.taus": None,
                             "gating.tau_fractions": (0.7,)})
  config_lib.validate(config, 1, ("audio", "image"))
  assert schedule.gating_taus(config) == (2,)  # round(0.7 * 3 epochs)


def test_pmr_acts_on_the_resolved_window():
  rng = np.random.default_rng(0)
  outputs = MultimodalOutput(
      jnp.float32(rng.normal(size=(8, 4))), {},
      {"audio": jnp.float32(rng.normal(size=(8, 6))),
       "image": jnp.float32(3 * rng.normal(size=(8, 5)))})
  state = {"audio": jnp.float32(rng.normal(size=(4, 6))),
           "image": jnp.float32(rng.normal(size=(4, 5)))}
  y = rng.integers(0, 4, 8)

  def weight_sum(epochs, epoch):
    loss = pmr.make_loss(fx.tiny_config(**{"method": "pmr",
                                           "student.epochs": epochs}),
                         "classification")
    _, parts = loss(outputs, StepContext.of_batch(
        {"label": y}, epoch=epoch, method_state=state))
    return sum(float(parts[f"pmr/weight/{m}"]) for m in state)

  # Release length: epochs 0..70 of 100; quick length: 0..5 of 8.
  assert (weight_sum(100, 70), weight_sum(100, 71)) == (2.0, 0.0)
  assert (weight_sum(8, 5), weight_sum(8, 6)) == (2.0, 0.0)
