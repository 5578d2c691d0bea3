"""MobileNetV2 image encoder, the paper's MIS-ME image branch (G2D 4.1.1)."""

import jax
import jax.numpy as jnp
import flax.linen as nn

from g2d_jax.models import initializers as inits

# (expansion t, output channels c, repeats n, first stride s) of Sandler et al.
INVERTED_RESIDUAL_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of `divisor`, as torchvision does."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  # Never round down by more than 10%.
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def _conv_bn(x: jax.Array, features: int, kernel: int, *, train: bool,
             name: str, strides: int = 1, groups: int = 1,
             activate: bool = True) -> jax.Array:
  pad = kernel // 2
  x = inits.conv(features, (kernel, kernel), strides=strides,
                 padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                 use_bias=False, name=f"{name}_conv")(x)
  x = inits.batch_norm(train, name=f"{name}_bn")(x)
  return jax.nn.relu6(x) if activate else x


class InvertedResidual(nn.Module):
  """MobileNetV2 inverted residual: expand, depthwise, project (G2D 4.1.1)."""

  features: int
  strides: int
  expansion: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    hidden = int(round(in_features * self.expansion))
    y = x
    if self.expansion != 1:
      y = _conv_bn(y, hidden, 1, train=train, name="expand")
    y = _conv_bn(y, hidden, 3, train=train, name="depthwise",
                 strides=self.strides, groups=hidden)
    y = _conv_bn(y, self.features, 1, train=train, name="project",
                 activate=False)
    if self.strides == 1 and in_features == self.features:
      return x + y
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 feature extractor, globally average-pooled (G2D 4.1.1).

  The standard (torchvision) layout: a 3x3/2 stem of 32 channels, the seven
  inverted-residual stages of `INVERTED_RESIDUAL_CONFIG`, a 1x1 conv to 1280
  channels, ReLU6 activations, then a mean over space. Channel counts are
  scaled by `width_multiplier` and rounded to multiples of 8; the last conv
  keeps at least 1280 channels, as torchvision does. Inits follow the rest of
  the library (Kaiming fan-out convs, BN 1/0).

  Attributes:
    width_multiplier: scales every channel count (1.0 is the standard network).
  """

  width_multiplier: float = 1.0

  @property
  def features_dim(self) -> int:
    """Size of the pooled feature vector (1280 for multipliers <= 1)."""
    return make_divisible(1280 * max(1.0, self.width_multiplier))

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Encodes images [N, H, W, C] to features [N, features_dim]."""
    x = _conv_bn(x, make_divisible(32 * self.width_multiplier), 3,
                 train=train, name="stem", strides=2)
    block = 0
    for expansion, channels, repeats, strides in INVERTED_RESIDUAL_CONFIG:
      features = make_divisible(channels * self.width_multiplier)
      for i in range(repeats):
        x = InvertedResidual(features, strides if i == 0 else 1, expansion,
                             name=f"block{block}")(x, train=train)
        block += 1
    x = _conv_bn(x, self.features_dim, 1, train=train, name="last")
    return jnp.mean(x, axis=(1, 2))
