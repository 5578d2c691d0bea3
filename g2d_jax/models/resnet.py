"""ResNet-18 encoder as in the official G2D / OGM-GE code (G2D A.4.1)."""

import jax
import jax.numpy as jnp
import flax.linen as nn

from g2d_jax.errors import DataError
from g2d_jax.models import conv as conv_lib
from g2d_jax.models import initializers as inits

_PAD1 = ((1, 1), (1, 1))


def _conv(features, kernel_size, *, impl, **kwargs):
  return conv_lib.Conv(features, kernel_size,
                       kernel_init=inits.conv_kernel_init, impl=impl, **kwargs)


class BasicBlock(nn.Module):
  """ResNet BasicBlock: two 3x3 convs, BN and a shortcut (G2D A.4.1)."""

  features: int
  strides: int = 1
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    impl = self.conv_impl
    y = _conv(self.features, (3, 3), strides=self.strides, padding=_PAD1,
              use_bias=False, impl=impl, name="conv1")(x)
    y = nn.relu(inits.batch_norm(train, name="bn1")(y))
    y = _conv(self.features, (3, 3), padding=_PAD1, use_bias=False,
              impl=impl, name="conv2")(y)
    y = inits.batch_norm(train, name="bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      # torchvision's downsample branch: 1x1 strided conv then BN.
      shortcut = _conv(self.features, (1, 1), strides=self.strides,
                       use_bias=False, impl=impl, name="downsample_conv")(x)
      shortcut = inits.batch_norm(train, name="downsample_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """The official G2D ResNet-18 encoder, globally average-pooled (G2D A.4.1).

  BasicBlock [2, 2, 2, 2], stage widths `width * (1, 2, 4, 8)` (64-512 by
  default), a 7x7/2 stem without bias, BN, ReLU and a 3x3/2 max-pool. Input
  channels are taken from the input: 1 for spectrograms and AV-MNIST digits,
  3 for video frames.

  Inputs are channels-last. Rank 4 `[N, H, W, C]` is the image path. Rank 5
  `[N, T, H, W, C]` (video) folds the frames into the batch, so BatchNorm sees
  N*T images, and averages the final feature map over time and space together,
  like the official `adaptive_avg_pool3d` over `(T, h, w)`.

  Attributes:
    width: channels of the first stage; 64 is the official network, smaller
      values give the narrow variants CPU experiments need.
    conv_impl: "xla", "im2col" or "auto" (`g2d_jax.models.conv`): the same
      function, computed with the kernels that are fastest on CPU ("auto").
    pool_impl: "xla" or "fast" (the stem max-pool's gradient without
      select-and-scatter; same values).
  """

  width: int = 64
  conv_impl: str = "xla"
  pool_impl: str = "xla"

  @property
  def features_dim(self) -> int:
    """Size of the pooled feature vector, `8 * width` (512 by default)."""
    return 8 * self.width

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Encodes x ([N, H, W, C] or [N, T, H, W, C]) to features [N, 8*width]."""
    if x.ndim == 5:
      n, t = x.shape[:2]
      x = x.reshape((n * t,) + x.shape[2:])
    elif x.ndim == 4:
      n, t = x.shape[0], None
    else:
      raise DataError(
          f"ResNet18 expects [N, H, W, C] or [N, T, H, W, C], got {x.shape}.")

    y = _conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)),
              use_bias=False, impl=self.conv_impl, name="conv1")(x)
    y = nn.relu(inits.batch_norm(train, name="bn1")(y))
    # Pads with -inf, matching PyTorch's MaxPool2d(3, 2, 1).
    y = conv_lib.max_pool(y, 3, 2, 1, impl=self.pool_impl)
    for stage, multiplier in enumerate((1, 2, 4, 8)):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        y = BasicBlock(self.width * multiplier, strides=strides,
                       conv_impl=self.conv_impl,
                       name=f"layer{stage + 1}_{block}")(y, train=train)

    if t is None:
      return jnp.mean(y, axis=(1, 2))
    y = y.reshape((n, t) + y.shape[1:])
    return jnp.mean(y, axis=(1, 2, 3))
