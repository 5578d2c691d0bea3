"""g2d_jax: Gradient-Guided Distillation, balanced multimodal learning in JAX.

The core (importable without models, data or the pipeline) is pure functions:

- `g2d_loss` and its terms (paper Eq. 1-4), in `g2d_jax.losses`;
- `teacher_confidence` (Eq. 5), in `g2d_jax.confidence`;
- `smp_kappa`, `partial_kappa`, `smp_stage` (Eq. 6-7, Table 6), in
  `g2d_jax.smp`;
- `modality_labels`, `smp_optimizer` (Eq. 8), in `g2d_jax.gating`.
"""

from g2d_jax.confidence import teacher_confidence
from g2d_jax.gating import kappa_gate
from g2d_jax.gating import modality_labels
from g2d_jax.gating import smp_optimizer
from g2d_jax.losses import cross_entropy
from g2d_jax.losses import feature_distillation
from g2d_jax.losses import g2d_loss
from g2d_jax.losses import logit_distillation
from g2d_jax.smp import partial_kappa
from g2d_jax.smp import smp_active
from g2d_jax.smp import smp_kappa
from g2d_jax.smp import smp_stage

__version__ = "0.1.0"

__all__ = [
    "cross_entropy",
    "feature_distillation",
    "g2d_loss",
    "kappa_gate",
    "logit_distillation",
    "modality_labels",
    "partial_kappa",
    "smp_active",
    "smp_kappa",
    "smp_optimizer",
    "smp_stage",
    "teacher_confidence",
]
