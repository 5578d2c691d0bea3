"""LeNet-style CNN of MultiBench's AV-MNIST encoders (G2D A.1.2, CPU runs)."""

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from g2d_jax.errors import ConfigError
from g2d_jax.models import initializers as inits

DOWNSAMPLE_KINDS = ("maxpool", "avgpool", "stride")


def lenet_channels(base: int = 6,
                   additional_layers: int = 3) -> tuple[int, ...]:
  """Channel widths of MultiBench's `LeNet(in, base, additional_layers)`.

  MultiBench's AV-MNIST encoders are `LeNet(1, 6, 3)` for the 28x28 digit
  (6-12-24-48) and `LeNet(1, 6, 5)` for the 112x112 spectrogram (6-...-192).
  """
  return tuple(base * 2**i for i in range(additional_layers + 1))


class SmallCNN(nn.Module):
  """LeNet-style CNN of MultiBench's AV-MNIST encoders (G2D A.1.2, CPU runs).

  The paper uses ResNet-18 on AV-MNIST (A.4.1); this is the MultiBench
  encoder family, small enough for CPU experiments. Each layer is
  conv -> [BatchNorm] -> ReLU -> downsample by 2. MultiBench's
  LeNet uses a 5x5 first conv, 3x3 convs after it, no conv bias (BN follows),
  and 2x2 max-pooling. `downsample="stride"` replaces conv + pool by a
  stride-2 conv, which is several times faster on CPU because XLA's max-pool
  backward is slow there (`experiments/conv_kernels.py` times it). The final
  map is averaged over space; MultiBench squeezes a 1x1 map, which is the
  same.

  Attributes:
    channels: output channels of each conv layer.
    first_kernel_size: kernel size of the first conv (5 in MultiBench).
    kernel_size: kernel size of the other convs (3 in MultiBench).
    downsample: "maxpool", "avgpool" (2x2, stride 2) or "stride" (a
      stride-2 conv instead of conv + pool).
    use_batchnorm: BatchNorm after each conv; convs have a bias only without it.
    patchify: if > 0, the first layer is a non-overlapping `patchify` x
      `patchify` conv with that stride (a ViT-style patch embedding, no
      padding; `first_kernel_size` and `downsample` do not apply to it). On
      the 112x112 spectrogram a 4x4 patchify layer costs a small fraction of
      a 5x5 conv at full resolution.
  """

  channels: Sequence[int] = lenet_channels(6, 3)
  first_kernel_size: int = 5
  kernel_size: int = 3
  downsample: str = "maxpool"
  use_batchnorm: bool = True
  patchify: int = 0

  def __post_init__(self) -> None:
    if self.downsample not in DOWNSAMPLE_KINDS:
      raise ConfigError(f"SmallCNN downsample must be one of "
                        f"{DOWNSAMPLE_KINDS}, got {self.downsample!r}.")
    if not self.channels:
      raise ConfigError("SmallCNN needs at least one conv layer "
                        "(channels=()).")
    super().__post_init__()

  @property
  def features_dim(self) -> int:
    """Size of the pooled feature vector (the last layer's channels)."""
    return self.channels[-1]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Encodes images [N, H, W, C] to features [N, channels[-1]]."""
    strides = 2 if self.downsample == "stride" else 1
    for i, features in enumerate(self.channels):
      patch = i == 0 and self.patchify > 0
      k = self.first_kernel_size if i == 0 else self.kernel_size
      if patch:
        conv = inits.conv(features, (self.patchify, self.patchify),
                          strides=self.patchify, padding="VALID",
                          use_bias=not self.use_batchnorm, name=f"conv{i}")
      else:
        conv = inits.conv(features, (k, k), strides=strides,
                          padding=((k // 2, k // 2), (k // 2, k // 2)),
                          use_bias=not self.use_batchnorm, name=f"conv{i}")
      x = conv(x)
      if self.use_batchnorm:
        x = inits.batch_norm(train, name=f"bn{i}")(x)
      x = nn.relu(x)
      if patch:
        continue
      if self.downsample == "maxpool":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      elif self.downsample == "avgpool":
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return jnp.mean(x, axis=(1, 2))
