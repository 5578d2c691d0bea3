"""Transformer sequence encoder of UR-Funny/IEMOCAP features (G2D A.4.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from g2d_jax.errors import ConfigError
from g2d_jax.models import initializers as inits

POSITIONAL_KINDS = ("sinusoidal", "learned")


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
  """Fixed sin/cos position table [length, dim] of Vaswani et al. (2017)."""
  positions = np.arange(length, dtype=np.float64)[:, None]
  rates = np.exp(-np.log(10000.0) * np.arange(0, dim, 2) / dim)
  table = np.zeros((length, dim), dtype=np.float64)
  table[:, 0::2] = np.sin(positions * rates)
  table[:, 1::2] = np.cos(positions * rates[: dim // 2])
  return table.astype(np.float32)


class TransformerLayer(nn.Module):
  """One Transformer encoder layer, pre- or post-norm (G2D A.4.1)."""

  num_heads: int
  mlp_dim: int
  norm_first: bool = True
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array | None, *,
               train: bool) -> jax.Array:
    """Maps x [B, L, D] to [B, L, D]; attention_mask is [B, 1, L, L]."""
    dropout = lambda y: nn.Dropout(self.dropout_rate,
                                   deterministic=not train)(y)

    def attention(y):
      return nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, kernel_init=inits.dense_kernel_init,
          dropout_rate=self.dropout_rate, deterministic=not train,
          name="attention")(y, mask=attention_mask)

    def feed_forward(y):
      y = nn.relu(inits.dense(self.mlp_dim, name="mlp_in")(y))
      return inits.dense(x.shape[-1], name="mlp_out")(dropout(y))

    norm1, norm2 = nn.LayerNorm(name="norm1"), nn.LayerNorm(name="norm2")
    if self.norm_first:
      x = x + dropout(attention(norm1(x)))
      return x + dropout(feed_forward(norm2(x)))
    x = norm1(x + dropout(attention(x)))
    return norm2(x + dropout(feed_forward(x)))


class TransformerEncoder(nn.Module):
  """Transformer encoder of feature sequences, masked mean pool (G2D A.4.1).

  The paper's encoder (after AGM): input features projected to `hidden_dim`
  by a 1-D convolution (no bias, Kaiming fan-out like every conv here), 4
  layers, 8 heads, hidden 768. Positions are added after the projection:
  fixed sinusoidal by default, or a learned table of `max_len` rows
  (normal(0.02) init). `norm_first=True` is pre-norm with a final LayerNorm
  (stable under plain SGD without warm-up); `False` is the post-norm layer of
  the original Transformer and PyTorch's default. The feed-forward block is
  Dense -> ReLU -> Dense of width `mlp_dim` (4 * hidden by default).

  Padded steps (mask False) are zeroed before the projection, excluded as
  attention keys and excluded from the mean pool, so their content cannot
  change the features.

  Attributes:
    hidden_dim: model width and feature size.
    num_layers: number of encoder layers.
    num_heads: attention heads; must divide `hidden_dim`.
    mlp_dim: feed-forward width; None means 4 * hidden_dim.
    conv_kernel_size: temporal kernel of the input projection ("SAME" padding).
    positional: "sinusoidal" or "learned".
    max_len: rows of the learned position table (learned positions only).
    norm_first: pre-norm (True) or post-norm (False).
    dropout_rate: dropout on attention weights and residual branches; when
      > 0, `apply(..., train=True)` needs a `"dropout"` rng.
  """

  hidden_dim: int = 768
  num_layers: int = 4
  num_heads: int = 8
  mlp_dim: int | None = None
  conv_kernel_size: int = 1
  positional: str = "sinusoidal"
  max_len: int = 512
  norm_first: bool = True
  dropout_rate: float = 0.0

  def __post_init__(self) -> None:
    if self.positional not in POSITIONAL_KINDS:
      raise ConfigError(f"TransformerEncoder positional must be one of "
                        f"{POSITIONAL_KINDS}, got {self.positional!r}.")
    if self.hidden_dim % self.num_heads:
      raise ConfigError(f"TransformerEncoder hidden_dim={self.hidden_dim} is "
                        f"not divisible by num_heads={self.num_heads}.")
    super().__post_init__()

  @property
  def features_dim(self) -> int:
    """Size of the pooled feature vector (`hidden_dim`)."""
    return self.hidden_dim

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               mask: jax.Array | None = None) -> jax.Array:
    """Encodes x [B, L, F] (mask [B, L], True = valid) to [B, hidden_dim]."""
    length = x.shape[1]
    if mask is None:
      mask = jnp.ones(x.shape[:2], dtype=bool)
    mask = mask.astype(bool)
    x = jnp.where(mask[..., None], x, 0.0)

    x = inits.conv(self.hidden_dim, (self.conv_kernel_size,), padding="SAME",
                   use_bias=False, name="input_projection")(x)
    if self.positional == "sinusoidal":
      x = x + sinusoidal_positions(length, self.hidden_dim)
    else:
      if length > self.max_len:
        raise ConfigError(f"Sequence length {length} exceeds max_len="
                          f"{self.max_len} of the learned position table.")
      table = self.param("position_embedding",
                         nn.initializers.normal(stddev=0.02),
                         (self.max_len, self.hidden_dim))
      x = x + table[:length]
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

    attention_mask = nn.make_attention_mask(mask, mask)
    mlp_dim = self.mlp_dim or 4 * self.hidden_dim
    for i in range(self.num_layers):
      x = TransformerLayer(self.num_heads, mlp_dim, norm_first=self.norm_first,
                           dropout_rate=self.dropout_rate,
                           name=f"layer{i}")(x, attention_mask, train=train)
    if self.norm_first:
      x = nn.LayerNorm(name="final_norm")(x)

    weights = mask.astype(x.dtype)[..., None]
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return jnp.sum(x * weights, axis=1) / count
