"""The MaskGIT transformer, with the released checkpoint's parameter names and numerics.

A bidirectional post-LN BERT over the sequence `[cond, z_1 .. z_N]` (DESIGN.md §1.1, §4). Quirks reproduced
from google-research/maskgit so that released checkpoints load and give the same logits:

- post-LN blocks (LayerNorm after each residual add), LayerNorm epsilon 1e-12, tanh-approximate GELU;
- embeddings: word + learned position, then LayerNorm (`Embed_0/embeddings_ln`), then dropout;
- output head: gelu(Dense) -> LayerNorm -> matmul with the word-embedding matrix + a separate bias
  (`MlmLayer_0/mlm_bias/bias`), i.e. weight tying; logits cover the whole vocabulary;
- the reference mask id is -1, which reads the last row (`vocab_size - 1`) of the embedding.

Token layout (also in README): ids `0..K-1` are codebook tokens, `K + c` is the class token of class `c`, and the
last id `vocab_size - 1` is the mask token. So `vocab_size = K + num_class_tokens + 1`.

`MaskGITModel` wraps the raw transformer with the conditioning interface (`fpd_jax.conditioning`): callers pass
image tokens `[B, N]` and a condition; it builds the sequence and returns logits over the K codebook entries only.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpd_jax import conditioning as cond_lib
from fpd_jax.models import attention
from fpd_jax.models import layers

LAYERNORM_EPSILON = 1e-12  # BERT's.


def truncated_normal(stddev: float):
  """Truncated (±2σ) normal initializer, as the reference."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * stddev

  return init


class SelfAttention(nn.Module):
  """Multi-head self-attention with the parameter names of flax's `SelfAttention` (`query/key/value/out`)."""
  num_heads: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    init = truncated_normal(0.02)
    qkv = [nn.DenseGeneral((self.num_heads, head_dim), kernel_init=init, dtype=self.dtype, name=name,
                           dot_general=layers.matmul_dot_general)(x)
           for name in ('query', 'key', 'value')]
    if deterministic or self.dropout == 0.0:
      out = attention.dot_product_attention(*qkv)  # cuDNN's fused kernel on GPU in bf16, else XLA's.
    else:
      q, k, v = qkv
      logits = jnp.einsum('bqhd,bkhd->bhqk', q * head_dim ** -0.5, k).astype(jnp.float32)
      weights = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic=False)
      out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)
    return nn.DenseGeneral(hidden, axis=(-2, -1), kernel_init=init, dtype=self.dtype, name='out',
                           dot_general=layers.matmul_dot_general)(out)


class Attention(nn.Module):
  """Self-attention + dropout + residual + post-LN (`TransformerLayer_i/Attention_0`)."""
  num_heads: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    h = SelfAttention(self.num_heads, self.dropout, self.dtype, name='self_attention')(x, deterministic)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name='attention_output_ln')(h + x)


class Mlp(nn.Module):
  """Dense -> tanh-GELU -> Dense + dropout + residual + post-LN (`TransformerLayer_i/Mlp_0`)."""
  hidden_size: int
  mlp_dim: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    init = truncated_normal(0.02)
    h = nn.Dense(self.mlp_dim, kernel_init=init, dtype=self.dtype, name='intermediate_output',
                 dot_general=layers.matmul_dot_general)(x)
    h = jax.nn.gelu(h, approximate=True)
    h = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name='layer_output',
                 dot_general=layers.matmul_dot_general)(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name='layer_output_ln')(h + x)


class TransformerLayer(nn.Module):
  """One post-LN block: attention then MLP."""
  hidden_size: int
  num_heads: int
  mlp_dim: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    x = Attention(self.num_heads, self.dropout, self.dtype)(x, deterministic)
    return Mlp(self.hidden_size, self.mlp_dim, self.dropout, self.dtype)(x, deterministic)


class Embed(nn.Module):
  """Word + position embeddings -> LayerNorm -> dropout (`Embed_0`).

  Optional embedding noise (Di[M]O's one-step generator input, DESIGN.md §1.5): the word embeddings e of the
  positions from `noise_from` on (the image tokens, mask tokens included) become `sigma * eps + sqrt(1 - sigma^2)
  * e`, eps ~ N(0, I) from the `'embedding_noise'` RNG stream, before the position embeddings are added.
  """
  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array, deterministic: bool, embedding_noise: float = 0.0,
               noise_from: int = 0) -> jax.Array:
    init = truncated_normal(0.02)
    # The reference's mask id -1 reads the last row; normalise negative ids explicitly.
    ids = jnp.where(ids < 0, ids + self.vocab_size, ids)
    words = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=init, dtype=self.dtype,
                     name='word_embeddings')(ids)
    if embedding_noise > 0:
      eps = jax.random.normal(self.make_rng('embedding_noise'), words.shape, words.dtype)
      noisy = embedding_noise * eps + (1.0 - embedding_noise ** 2) ** 0.5 * words
      words = jnp.where((jnp.arange(ids.shape[-1]) >= noise_from)[None, :, None], noisy, words)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size, embedding_init=init,
                         dtype=self.dtype, name='position_embeddings')(jnp.arange(ids.shape[-1])[None])
    x = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name='embeddings_ln')(words + positions)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class MlmLayer(nn.Module):
  """Output head: gelu(Dense) -> LayerNorm -> tied word embeddings + bias (`MlmLayer_0`)."""
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    h = nn.Dense(self.hidden_size, kernel_init=truncated_normal(0.02), dtype=self.dtype, name='mlm_dense',
                 dot_general=layers.matmul_dot_general)(x)
    h = nn.LayerNorm(epsilon=LAYERNORM_EPSILON, dtype=self.dtype, name='mlm_ln')(jax.nn.gelu(h))
    logits = layers.matmul_dot_general(h, word_embeddings.T.astype(h.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return MlmBias(name='mlm_bias')(logits)


class MlmBias(nn.Module):
  """The head's separate bias (`MlmLayer_0/mlm_bias/bias`)."""

  @nn.compact
  def __call__(self, logits: jax.Array) -> jax.Array:
    bias = self.param('bias', nn.initializers.zeros, (logits.shape[-1],))
    return logits + bias.astype(logits.dtype)


class Transformer(nn.Module):
  """The released MaskGIT transformer: full sequence ids `[B, L]` -> logits `[B, L, vocab_size]` (float32)."""
  vocab_size: int
  hidden_size: int = 768
  num_layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 3072
  max_position_embeddings: int = 257
  dropout: float = 0.1
  dtype: Any = jnp.float32  # Compute dtype (bf16 on accelerators); parameters stay float32.

  @nn.compact
  def __call__(self, ids: jax.Array, deterministic: bool = True, embedding_noise: float = 0.0,
               noise_from: int = 0) -> jax.Array:
    """`embedding_noise` sigma > 0 perturbs the word embeddings of positions >= `noise_from` (see `Embed`)."""
    x = Embed(self.vocab_size, self.hidden_size, self.max_position_embeddings, self.dropout, self.dtype)(
        ids.astype(jnp.int32), deterministic, embedding_noise, noise_from)
    for _ in range(self.num_layers):
      x = TransformerLayer(self.hidden_size, self.num_heads, self.mlp_dim, self.dropout, self.dtype)(
          x, deterministic)
    word_embeddings = self.variables['params']['Embed_0']['word_embeddings']['embedding']
    return MlmLayer(self.hidden_size, self.dtype)(x, word_embeddings).astype(jnp.float32)


class MaskGITModel:
  """The transformer behind the conditioning interface: image tokens + condition -> logits over K codes.

  Callers (trainers, the sampler, FPD) never build sequences or assume a class id: they pass `tokens [B, N]`
  (codebook ids, or `mask_id`) and a condition pytree that `conditioner` understands.
  """

  def __init__(self, transformer: Transformer, conditioner: 'cond_lib.Conditioner', codebook_size: int):
    self.transformer = transformer
    self.conditioner = conditioner
    self.codebook_size = codebook_size
    self.mask_id = transformer.vocab_size - 1

  def init(self, rng: jax.Array, num_tokens: int, example_cond) -> dict:
    """Initial parameters `{'params': ...}` for sequences of `num_tokens` image tokens."""
    tokens = jnp.zeros((1, num_tokens), jnp.int32)
    ids = self.conditioner.sequence(jax.tree.map(lambda c: c[:1], example_cond), tokens)
    return self.transformer.init(rng, ids, deterministic=True)

  def logits(self, params, tokens: jax.Array, cond, *, deterministic: bool = True,
             dropout_rng: jax.Array | None = None, embedding_noise: float = 0.0,
             noise_rng: jax.Array | None = None) -> jax.Array:
    """Logits `[B, N, K]` over codebook entries for each image position.

    `embedding_noise` sigma > 0 (with `noise_rng`) perturbs the image tokens' word embeddings as
    `sigma * eps + sqrt(1 - sigma^2) * e` (Di[M]O's generator input); the condition's embeddings are untouched.
    """
    ids = self.conditioner.sequence(cond, tokens)
    rngs = {} if dropout_rng is None else {'dropout': dropout_rng}
    if embedding_noise > 0:
      rngs['embedding_noise'] = noise_rng
    out = self.transformer.apply({'params': params}, ids, deterministic=deterministic, rngs=rngs or None,
                                 embedding_noise=embedding_noise, noise_from=ids.shape[1] - tokens.shape[1])
    # float32 logits whatever the compute dtype: softmaxes, sampling and the STE mixture stay exact.
    return out[:, ids.shape[1] - tokens.shape[1]:, :self.codebook_size].astype(jnp.float32)

  def guided_logits(self, params, tokens: jax.Array, cond, cfg_scale: float) -> jax.Array:
    """Classifier-free guidance: (1 + w) * cond - w * uncond (one batched pass); w = 0 is plain logits."""
    if cfg_scale == 0:
      return self.logits(params, tokens, cond)
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, self.conditioner.null(cond))
    out = self.logits(params, jnp.concatenate([tokens, tokens]), both)
    c, u = jnp.split(out, 2)
    return (1.0 + cfg_scale) * c - cfg_scale * u


def from_config(cfg, conditioner: 'cond_lib.Conditioner', codebook_size: int, num_tokens: int,
                dtype: Any = jnp.float32) -> MaskGITModel:
  """Builds the conditioned model from a config section like `configs/demo.py`'s `teacher`."""
  transformer = Transformer(
      vocab_size=codebook_size + conditioner.num_cond_tokens + 1,
      hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
      max_position_embeddings=num_tokens + conditioner.prefix_length, dropout=cfg.dropout, dtype=dtype)
  return MaskGITModel(transformer, conditioner, codebook_size)
