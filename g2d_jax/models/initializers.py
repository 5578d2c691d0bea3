"""Initialisers and normalisation settings shared by all encoders (G2D A.4.1).

The official code (`utils.weight_init`) uses PyTorch's `kaiming_normal_`
(fan-out) for convolutions, `xavier_normal_` for linear layers and constant
1/0 for BatchNorm. PyTorch draws those from an *untruncated* normal. In the
installed JAX (0.10) `variance_scaling(..., "normal")` is the untruncated
normal (only "truncated_normal" truncates, at two standard deviations; there
is no "untruncated_normal" value any more); the initialiser tests check the
variance and that the tails are not cut.
"""

import functools

import flax.linen as nn

# Kaiming-normal, fan-out, ReLU gain: Var = 2 / (out_channels * kh * kw).
conv_kernel_init = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal")
# Xavier-normal (gain 1): Var = 2 / (fan_in + fan_out).
dense_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_avg", "normal")

# PyTorch BatchNorm momentum 0.1 is Flax momentum 0.9 (weight of the old value).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults: batch statistics in train mode only."""
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON,
      name=name,
  )


def dense(features: int, name: str | None = None,
          use_bias: bool = True) -> nn.Dense:
  """Linear layer with Xavier-normal kernel and zero bias (official init)."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=dense_kernel_init,
                  bias_init=nn.initializers.zeros, name=name)


conv = functools.partial(nn.Conv, kernel_init=conv_kernel_init)
