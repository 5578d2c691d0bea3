"""Balancing methods as plug-ins to the shared student training step.

One module per method, each with `default_config()` (its hyperparameters with
the defaults of its released code, commented with their source) and
`build(config, task, **context) -> Method` (the contract is in
`g2d_jax.methods.base`):

  joint      fused cross-entropy only
  umt        + feature distillation from the unimodal teachers
  ogm        OGM: dominant encoder's conv gradients scaled by 1 - tanh(a rho)
  ogm_ge     OGM + Gaussian noise on the encoders' conv gradients
  mlb        multi-loss + per-modality gradient scaling (speeds up / slows down)
  mmpareto   Pareto combination of multimodal and unimodal encoder gradients
  mla        alternating unimodal sub-updates of a shared head (+ GS projection)
  pmr        prototype cross-entropy on the weaker modality
  mslr       encoder gradients scaled by each modality's validation trend
  mmcosine   fused logits as scaled cosines of features and class weights
  opm        per-sample feature drop of the dominant modality (OPM)
  agm        Shapley mono-modal outputs, gradients scaled toward the running
             score ratio (+ gradient-norm clipping)
  reconboost alternating boosting stages of each modality's learner
  greedy     conditional learning speeds; re-balancing steps for the slower
             modality (two modalities)
  gblending  unimodal + fused losses weighted by probe-measured OGR
  inforeg    multi-loss; a proximal pull on the leading modality while its
             gradient information still rises (the prime learning window)
  relearning encoders softly re-initialised by their k-means purity gap
             between the training and the validation split
  valuation  per-sample Shapley values; extra unimodal losses for samples a
             modality contributes little to
  mbsd       multi-loss + KL and response similarity between modalities,
             weighted by their true-class confidence gap
  cml        calibration: confidence with fewer modalities must not exceed
             confidence with more (hinge), over modality-dropped predictions
  lfm        CE and an alignment of the modalities' predictions, weighted by
             a hypergradient-learned alpha
  amco       sine-ramped masking of the dependent modality's feature units
  g2d        G2D loss (+ SMP by default)

and one evaluation that trains nothing, selectable by the same name:

  ume        the ensemble of the unimodal teachers (`methods.ume`; every run's
             evaluation reports it as `teacher_ensemble`)

`config.method` picks one; `config.<method>` holds its hyperparameters (every
method's sub-config is in the base config, so `--config.ogm_ge.alpha=0.3`
works on any config file). `config.smp` adds SMP gating to any method that
trains a multimodal student; left unset (None) it is on where the method's
module says `SMP_DEFAULT = True` (G2D only).

Presets: `apply_preset(config, name)` selects a method;
`apply_preset(config, name, method_optimizer=True)` also sets
`config.protocol = "released"`, so the student trains with the optimizer
the method's released code uses (`released_optimizer`, its module's
`RELEASED_OPTIMIZER`; the default protocol,
"common", trains every method with `config.student.optimizer`).
`configs/avmnist.py:<preset>,<method>` applies the former.

Adding a method: one module with `default_config`, `build`,
`RELEASED_OPTIMIZER` (the optimizer of its released code) and `TUNING_GRID`
(the leaderboard's equal tuning budget), and its line in `_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections

from g2d_jax.errors import ConfigError
from g2d_jax.methods.base import EpochHook
from g2d_jax.methods.base import Gradient
from g2d_jax.methods.base import HeadsSpec
from g2d_jax.methods.base import Method
from g2d_jax.methods.base import MethodSpec
from g2d_jax.methods.base import ProbeHook
from g2d_jax.methods.base import StepContext
from g2d_jax.methods.base import StepResult
from g2d_jax.methods.base import standard_update

_MODULES = {
    "joint": "g2d_jax.methods.joint",
    "umt": "g2d_jax.methods.umt",
    "ogm": "g2d_jax.methods.ogm",
    "ogm_ge": "g2d_jax.methods.ogm",
    "mlb": "g2d_jax.methods.mlb",
    "mmpareto": "g2d_jax.methods.mmpareto",
    "mla": "g2d_jax.methods.mla",
    "pmr": "g2d_jax.methods.pmr",
    "mslr": "g2d_jax.methods.mslr",
    "mmcosine": "g2d_jax.methods.mmcosine",
    "opm": "g2d_jax.methods.opm",
    "agm": "g2d_jax.methods.agm",
    "reconboost": "g2d_jax.methods.reconboost",
    "greedy": "g2d_jax.methods.greedy",
    "gblending": "g2d_jax.methods.gblending",
    "cml": "g2d_jax.methods.cml",
    "inforeg": "g2d_jax.methods.inforeg",
    "mbsd": "g2d_jax.methods.mbsd",
    "lfm": "g2d_jax.methods.lfm",
    "amco": "g2d_jax.methods.amco",
    "valuation": "g2d_jax.methods.valuation",
    "relearning": "g2d_jax.methods.relearning",
    "g2d": "g2d_jax.methods.g2d",
}

# The teachers' ensemble: selectable as config.method, trains no student.
TEACHER_ENSEMBLE = "ume"
_ENSEMBLE_MODULE = "g2d_jax.methods.ume"


def released_optimizer(name: str) -> dict[str, Any] | None:
  """The optimizer method `name`'s released code trains with (its module's
  `RELEASED_OPTIMIZER`: name, lr, momentum, weight decay, decay points as
  fractions of the run), or None (UME trains no student).
  `--config.protocol=released` trains each method with its own
  (`pipeline.config.student_optimizer`)."""
  if name not in _MODULES:
    return None
  released = getattr(module(name), "RELEASED_OPTIMIZER", None)
  return None if released is None else dict(released)


def available() -> tuple[str, ...]:
  """Every name `config.method` accepts: the training methods and UME."""
  return (*_MODULES, TEACHER_ENSEMBLE)


def trains_nothing(name: str) -> bool:
  """Whether `name` is the teachers' ensemble (no student to train)."""
  return name == TEACHER_ENSEMBLE


def module(name: str) -> Any:
  """The module of method `name` (UME's for the teachers' ensemble)."""
  if trains_nothing(name):
    return importlib.import_module(_ENSEMBLE_MODULE)
  return importlib.import_module(_MODULES[name])


def default_configs() -> dict[str, ml_collections.ConfigDict]:
  """{method: its default hyperparameters}; `ogm` and `ogm_ge` share fields."""
  return {name: module(name).default_config() for name in available()}


def smp_default(name: str) -> bool:
  """Whether SMP is on for `name` when config.smp is unset: the module's
  `SMP_DEFAULT` (G2D is "G2D loss + SMP"; every comparator runs as
  published, SMP off, unless --config.smp=True)."""
  if name not in _MODULES:
    return False
  return bool(getattr(module(name), "SMP_DEFAULT", False))


def smp_enabled(config: ml_collections.ConfigDict) -> bool:
  """`config.smp`, or the method's default when it is unset (None)."""
  smp = config.get("smp")
  return smp_default(config.method) if smp is None else bool(smp)


def build_method(config: ml_collections.ConfigDict, task: str,
                 **context: Any) -> Method:
  """The Method named by `config.method`.

  Args:
    config: the run's config.
    task: "classification" or "regression".
    **context: what some methods need besides the config: `modalities`
      (the dataset's modality order) and `steps_per_epoch`.
  """
  if trains_nothing(config.method):
    raise ConfigError(
        f"config.method={config.method!r} trains no student: it is the "
        "ensemble of the unimodal teachers, which the evaluation stage "
        "reports (--mode=eval); pick a training method to build a student.")
  if config.method not in _MODULES:
    raise ConfigError(f"config.method={config.method!r} is not implemented; "
                      f"choose one of {sorted(available())}.")
  return module(config.method).build(
      config, task, **context)


def apply_preset(config: ml_collections.ConfigDict, name: str, *,
                 method_optimizer: bool = False) -> ml_collections.ConfigDict:
  """Selects method `name` (its hyperparameters are the defaults in
  `config.<name>`); with `method_optimizer`, also `config.protocol =
  "released"`: the student trains with the optimizer of the method's
  released code (`released_optimizer`). Returns `config`."""
  if name not in available():
    raise ConfigError(f"unknown method {name!r}; choose one of "
                      f"{sorted(available())}.")
  config.method = name
  if method_optimizer:
    config.protocol = "released"
  return config


__all__ = ["EpochHook", "Gradient", "HeadsSpec", "Method", "MethodSpec",
           "ProbeHook",
           "StepContext", "StepResult", "TEACHER_ENSEMBLE",
           "apply_preset", "available", "build_method", "default_configs",
           "released_optimizer",
           "smp_default", "smp_enabled", "standard_update", "trains_nothing"]
