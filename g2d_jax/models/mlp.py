"""MLP encoder for feature and tabular views (G2D 4.1.1, MIS-ME tabular)."""

from typing import Sequence

import jax
import flax.linen as nn

from g2d_jax.errors import ConfigError
from g2d_jax.models import initializers as inits


class MLP(nn.Module):
  """Fully connected encoder for tabular/feature views (G2D 4.1.1, MIS-ME).

  Each hidden layer is Dense -> [BatchNorm] -> ReLU -> [Dropout]; the output
  of the last hidden layer is the feature vector. Inputs with more than two
  dimensions are flattened to [N, -1] first.

  Attributes:
    hidden_dims: width of each hidden layer; the last one is the feature size.
    dropout_rate: dropout after each activation in train mode; when > 0,
      `apply(..., train=True)` needs a `"dropout"` rng.
    use_batchnorm: BatchNorm before each activation (Dense bias dropped then).
  """

  hidden_dims: Sequence[int] = (256, 128)
  dropout_rate: float = 0.0
  use_batchnorm: bool = False

  def __post_init__(self) -> None:
    if not self.hidden_dims:
      raise ConfigError("MLP needs at least one hidden layer "
                        "(hidden_dims=()).")
    super().__post_init__()

  @property
  def features_dim(self) -> int:
    """Size of the feature vector (the last hidden width)."""
    return self.hidden_dims[-1]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Encodes `x` [N, ...] to features [N, hidden_dims[-1]]."""
    x = x.reshape((x.shape[0], -1))
    for i, features in enumerate(self.hidden_dims):
      x = inits.dense(features, use_bias=not self.use_batchnorm,
                      name=f"dense{i}")(x)
      if self.use_batchnorm:
        x = inits.batch_norm(train, name=f"bn{i}")(x)
      x = nn.relu(x)
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x
