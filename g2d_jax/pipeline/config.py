"""The pipeline's config schema: defaults shared by every dataset's config file.

Config files in `configs/` start from `base_config()`, set the dataset, the
encoders and the protocol, then lock the result so that a mistyped
command-line override fails instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from g2d_jax import artifacts
from g2d_jax import gating
from g2d_jax import methods
from g2d_jax import models
from g2d_jax import schedule
from g2d_jax.errors import ConfigError
from g2d_jax.pipeline import logs

# joint, umt, ume, ogm, ogm_ge, mlb, mmpareto, mla, pmr, g2d
METHODS = methods.available()
MODES = ("all", "teachers", "precompute", "student", "eval")
PROTOCOL_CHOICES = ("common", "released")


def optimizer_config(lr: float = 1e-3, *, name: str = "sgd",
                     momentum: float = 0.9, weight_decay: float = 1e-4,
                     decay_fractions: tuple[float, ...] = (2 / 3,),
                     decay_epochs: tuple[int, ...] | None = None,
                     decay_factor: float = 0.1) -> ml_collections.ConfigDict:
  """SGD with PyTorch-style weight decay and a per-epoch step schedule.

  The rate is multiplied by `decay_factor` at the start of the epochs that
  `decay_fractions` name as fractions of the stage's epochs (the paper's
  epoch 200 of 300 is 2/3; `g2d_jax.schedule.boundary` rounds), or at the
  absolute `decay_epochs` when those are given.
  """
  return ml_collections.ConfigDict(dict(
      name=name,                  # "sgd" | "adam" | "adamw"
      lr=lr,
      # Multiplies lr, whichever protocol picks it (a tuning knob that
      # works under protocol=released too).
      lr_scale=1.0,
      momentum=momentum,          # sgd only
      weight_decay=weight_decay,  # added to the gradient (torch.optim.SGD)
      decay_fractions=tuple(decay_fractions),
      decay_epochs=ml_collections.FieldReference(
          None if decay_epochs is None else tuple(decay_epochs),
          field_type=tuple),
      decay_factor=decay_factor,
  ))


def train_config(epochs: int, batch_size: int,
                 optimizer: ml_collections.ConfigDict
                 ) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      epochs=epochs,
      batch_size=batch_size,      # global batch, split over all devices
      optimizer=optimizer,
      checkpoint_every_steps=0,   # 0: only at the end of every epoch
  ))


def base_config() -> ml_collections.ConfigDict:
  """Every field the pipeline reads, with the paper's defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 999
  # Students with different settings can share one workdir's teachers and
  # teacher cache: a non-empty run_name puts the student in
  # <workdir>/student_<run_name> and its summary in summary_<run_name>.json.
  c.run_name = ""
  c.method = "g2d"
  # SMP gating for any method that trains a multimodal student (Table 4).
  # Unset (None): the method's default, on for G2D only (G2D = its loss +
  # SMP); --config.smp=True/False forces it. Read it with
  # `methods.smp_enabled(config)`.
  c.smp = ml_collections.FieldReference(None, field_type=bool)
  # The optimizer every method trains the student with: "common" (the
  # config's `student.optimizer`, one protocol for all) or "released" (each
  # method's own, `methods.released_optimizer`; decay points as fractions
  # of the run).
  c.protocol = "common"
  c.gating = ml_collections.ConfigDict(dict(
      # SMP stage lengths, k-1 entries, as fractions of the student's epochs
      # (official: epochs 0..150 of 300); `taus` in epochs overrides them.
      tau_fractions=(151 / 300,),
      taus=ml_collections.FieldReference(None, field_type=tuple),
      semantics="freeze",         # "freeze" (Eq. 8) | "reference" (official)
      # What a gate of 0 freezes (g2d_jax.gating): "branch" (the encoder, its
      # fusion head and the method's heads for it) | "encoder" (Eq. 8's
      # theta^m: the encoder's parameters only).
      freeze_scope="branch",
      # A frozen branch's BatchNorm running statistics: "update" (they move
      # with the training batches, as in the official code) | "hold".
      frozen_batch_stats="update",
      suppression="complete",     # "complete" (SMP) | "partial" (Table 6)
      partial_strength=1.0,       # OGM-GE's alpha for partial suppression
      skip_frozen_backward=True,  # specialised step per gating pattern
  ))
  # Every method's hyperparameters, `config.<method>` (defaults and their
  # sources in g2d_jax/methods/<module>.py).
  for name, defaults in methods.default_configs().items():
    c[name] = defaults
  c.data = ml_collections.ConfigDict()  # set by the dataset's config file
  c.model = ml_collections.ConfigDict(dict(
      fusion="late",
      fusion_kwargs=ml_collections.ConfigDict(),
      encoders=ml_collections.ConfigDict(),  # {modality: {kind: ..., ...}}
      # Activations' dtype: "bfloat16" is mixed precision for GPUs and TPUs
      # (parameters, optimizer state, BatchNorm statistics and losses stay
      # float32; steps.apply_model).
      dtype="float32",
  ))
  c.teacher = train_config(300, 16, optimizer_config())
  c.student = train_config(300, 16, optimizer_config())
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=256,
      # Also score the student on the test split after every epoch (learning
      # curves in metrics.jsonl as test/...; selection stays on val).
      test_every_epoch=False,
      # Paper Table 11: also score the student on test with each modality
      # missing at these rates (e.g. (0.0, 0.2, 0.4, 0.6)); a missing
      # modality's features are zeros and late fusion averages the present
      # modalities' logits (evaluate.missing_modality_pattern).
      missing_rates=(),
      missing_seed=0,
  ))
  c.log_every_steps = 100
  # Metrics besides metrics.jsonl: TensorBoard (on), Weights & Biases (off).
  c.logging = logs.logging_config()
  return c


def validate(config: ml_collections.ConfigDict, num_devices: int,
             modalities: tuple[str, ...]) -> None:
  """Raises ConfigError naming the field and the fix for a bad value."""
  if config.run_name and not all(ch.isalnum() or ch in "-_."
                                 for ch in config.run_name):
    raise ConfigError(f"config.run_name={config.run_name!r} may only contain "
                      "letters, digits, '-', '_' and '.'.")
  if config.method not in METHODS:
    raise ConfigError(f"config.method={config.method!r} is not one of "
                      f"{METHODS}.")
  if config.model.get("dtype", "float32") not in models.COMPUTE_DTYPES:
    raise ConfigError(f"config.model.dtype={config.model.dtype!r} is not one "
                      f"of {models.COMPUTE_DTYPES}.")
  if sorted(config.model.encoders.keys()) != sorted(modalities):
    raise ConfigError(
        f"config.model.encoders has {sorted(config.model.encoders.keys())} but "
        f"the dataset's modalities are {list(modalities)}: give one encoder "
        "per modality.")
  for stage in ("teacher", "student"):
    tc = config[stage]
    if tc.epochs < 1:
      raise ConfigError(f"config.{stage}.epochs must be >= 1, got "
                        f"{tc.epochs}.")
    if tc.batch_size < 1:
      raise ConfigError(f"config.{stage}.batch_size={tc.batch_size} must be "
                        "at least 1 (it is the global batch, split over the "
                        f"{num_devices} device(s)).")
    if tc.batch_size % num_devices:
      raise ConfigError(
          f"config.{stage}.batch_size={tc.batch_size} is not divisible by the "
          f"{num_devices} devices; use a multiple of {num_devices}, e.g. "
          f"--config.{stage}.batch_size="
          f"{max(num_devices, tc.batch_size // num_devices * num_devices)}.")
  if config.eval.batch_size < 1:
    raise ConfigError(f"config.eval.batch_size={config.eval.batch_size} must "
                      "be at least 1.")
  if config.eval.batch_size % num_devices:
    raise ConfigError(
        f"config.eval.batch_size={config.eval.batch_size} is not divisible "
        f"by the {num_devices} devices; use a multiple of {num_devices}.")
  g = config.gating
  if methods.trains_nothing(config.method):
    if config.smp:
      raise ConfigError(f"config.method={config.method!r} trains no student, "
                        "so SMP has nothing to gate; drop --config.smp=True.")
    if tuple(config.eval.missing_rates):
      raise ConfigError(
          f"config.eval.missing_rates: method {config.method!r} has no "
          "trained student to evaluate with missing modalities; leave "
          "missing_rates empty.")
  if methods.smp_enabled(config):
    given = "taus" if g.taus is not None else "tau_fractions"
    if len(tuple(g[given])) != len(modalities) - 1:
      raise ConfigError(
          f"config.gating.{given}={tuple(g[given])} needs k - 1 = "
          f"{len(modalities) - 1} entries for the {len(modalities)} "
          f"modalities {list(modalities)}.")
    schedule.gating_taus(config)  # raises on a bad length or fraction
  if config.protocol not in PROTOCOL_CHOICES:
    raise ConfigError(f"config.protocol={config.protocol!r} must be one of "
                      f"{PROTOCOL_CHOICES}: 'common' trains every method with "
                      "config.student.optimizer, 'released' with the "
                      "optimizer of its released code.")
  resolve_schedule(config)  # raises on a bad fraction or window
  if g.semantics not in ("freeze", "reference"):
    raise ConfigError(f"config.gating.semantics={g.semantics!r} must be "
                      "'freeze' or 'reference'.")
  if g.freeze_scope not in gating.SCOPES:
    raise ConfigError(f"config.gating.freeze_scope={g.freeze_scope!r} must be "
                      f"one of {gating.SCOPES}.")
  if g.frozen_batch_stats not in ("update", "hold"):
    raise ConfigError(f"config.gating.frozen_batch_stats="
                      f"{g.frozen_batch_stats!r} must be 'update' or 'hold'.")
  if g.suppression not in ("complete", "partial"):
    raise ConfigError(f"config.gating.suppression={g.suppression!r} must be "
                      "'complete' or 'partial'.")
  if config.g2d.feature_reduction not in ("mean", "sum_features"):
    raise ConfigError("config.g2d.feature_reduction must be 'mean' or "
                      "'sum_features'.")
  rates = tuple(config.eval.missing_rates)
  for rate in rates:
    if not 0.0 <= float(rate) < 1.0:
      raise ConfigError(f"config.eval.missing_rates={rates} has {rate}; each "
                        "rate must be in [0, 1), e.g. (0.0, 0.2, 0.4, 0.6).")
  if config.logging.wandb_mode not in logs.WANDB_MODES:
    raise ConfigError(f"config.logging.wandb_mode={config.logging.wandb_mode!r}"
                      f" must be one of {logs.WANDB_MODES}.")
  for stage in ("teacher", "student"):
    name = config[stage].optimizer.name
    if name not in ("sgd", "adam", "adamw"):
      raise ConfigError(f"config.{stage}.optimizer.name={name!r} must be "
                        "'sgd', 'adam' or 'adamw'.")


def student_optimizer(config: ml_collections.ConfigDict
                      ) -> ml_collections.ConfigDict:
  """The optimizer the student trains with under `config.protocol`.

  "common": `config.student.optimizer`. "released": that config with the
  method's released optimizer (`methods.released_optimizer`: name, rate,
  momentum, weight decay and decay points as fractions of the run) in its
  place; the batch size and epochs stay the config's. Methods without a
  released protocol (UME) keep the common one.
  """
  opt = ml_collections.ConfigDict(artifacts.plain(config.student.optimizer))
  released = methods.released_optimizer(config.method)
  if config.get("protocol", "common") == "released" and released is not None:
    opt.decay_epochs = None
    for key, value in released.items():
      opt[key] = tuple(value) if isinstance(value, list) else value
  return opt


def resolve_schedule(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every epoch window of a config, in epochs: the record `summary.json`
  keeps and the values the run uses.

  Returns:
    {"student_epochs", "protocol", "smp": {"taus", "given", ...} (when SMP
    is on), "windows": {"<method>.<name>": window record}, and
    "student_optimizer" / "teacher_optimizer": {name, lr, decay_epochs}}.

  Raises:
    ConfigError: a fraction outside [0, 1], a window that ends before it
      starts, or SMP stages longer than the run.
  """
  epochs = int(config.student.epochs)
  out: dict[str, Any] = {"student_epochs": epochs,
                         "protocol": config.get("protocol", "common")}
  if methods.smp_enabled(config):
    g = config.gating
    taus = schedule.gating_taus(config)
    out["smp"] = {"taus": list(taus), "epochs": sum(taus),
                  "share": sum(taus) / epochs,
                  "given": "epochs" if g.taus is not None else "fractions",
                  "tau_fractions": list(g.tau_fractions)}
  windows = {}
  if config.method in config:
    for name in schedule.method_windows(config[config.method]):
      w = config[config.method][name]
      rec = schedule.method_window(config, config.method, name).record(epochs)
      rec["given"] = ("epochs" if w.start_epoch is not None
                      or w.end_epoch is not None else "fractions")
      rec["fractions"] = [w.start, w.end]
      windows[f"{config.method}.{name}"] = rec
  out["windows"] = windows
  for stage, opt in (("student", student_optimizer(config)),
                     ("teacher", config.teacher.optimizer)):
    n = int(config[stage].epochs)
    out[f"{stage}_optimizer"] = {
        "name": opt.name, "lr": opt.lr * opt.get("lr_scale", 1.0),
        "decay_factor": opt.decay_factor,
        "decay_epochs": list(schedule.optimizer_decay_epochs(
            opt, n, f"config.{stage}.optimizer"))}
  return out
