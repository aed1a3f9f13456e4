"""The MaskGen-VQ generator (bytedance/1d-tokenizer `modeling/maskgen.py`, DESIGN.md §1.6) in Flax.

    c = text_embed_proj(text_states)                         text stream [B, L, D] (frozen encoder's token states)
    y = cond_pooled_proj([pooled, sinusoid(aesthetic * 100)]) the adaLN condition [B, D] (pooled text + micro-cond)
    x = embeddings[tokens] + pos_embed                        image stream [B, N, D] (learned positions)
    c, x = JointBlock_i(x, c, y)                              SD3 MMDiT blocks; the last is `context_pre_only`
    x = AdaLayerNormContinuous(x, y)                          LN without affine, * (1 + scale) + shift
    logits = x @ embeddings[:K].T                             head tied to the codebook rows, no bias

Joint block (diffusers' `JointTransformerBlock`): each stream has its own adaLN-Zero modulation from silu(y)
(shift/scale/gate for attention and MLP), its own q/k/v projections (`to_q/k/v` for the image stream,
`add_q/k/v_proj` for the text stream); attention runs over the concatenation [image; text]; each stream adds its
gated output projection (`to_out`, `to_add_out`) and gated MLP (`ff`, `ff_context`). A `context_pre_only` block
modulates the text with AdaLayerNormContinuous and returns no text stream. Every modulation is zero-initialised
(adaLN-Zero): at init each block is the identity on both streams.

Token layout: ids 0..K-1 are codebook entries, K is the mask token (as MaskGen's `mask_token_id`).

`MaskGenModel` has the interface of `MaskGITModel` (`logits`, `guided_logits`, `init`, `mask_id`,
`codebook_size`), so the sampler, the teacher trainer and the FPD step use it unchanged. A condition is the caption
ids `[B, L]` (`conditioning.TextConditioner`); the frozen text encoder runs inside `logits` with its parameters held
by the model (never trained by the generator's optimizer).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpd_jax import conditioning as cond_lib
from fpd_jax.models import clip_text
from fpd_jax.models.maskgit import truncated_normal

LN_EPS = 1e-6


def _ln(x):
  """LayerNorm without affine parameters (diffusers' `elementwise_affine=False`)."""
  return nn.LayerNorm(epsilon=LN_EPS, use_scale=False, use_bias=False)(x)


def sinusoidal_embedding(values: jax.Array, dim: int, max_period: float = 1000.0) -> jax.Array:
  """diffusers' timestep embedding as MaskGen calls it: [sin, cos] of values * exp(-log(P) * i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = values.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class FeedForward(nn.Module):
  dim: int
  mlp_ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = truncated_normal(0.02)
    h = nn.Dense(int(self.dim * self.mlp_ratio), kernel_init=init, dtype=self.dtype, name='fc1')(x)
    return nn.Dense(self.dim, kernel_init=init, dtype=self.dtype, name='fc2')(jax.nn.gelu(h, approximate=True))


def modulation(y: jax.Array, dim: int, chunks: int, name: str, dtype) -> list[jax.Array]:
  """adaLN(-Zero) parameters: `chunks` vectors [B, 1, dim] from Dense(silu(y)), zero-initialised."""
  out = nn.Dense(chunks * dim, kernel_init=nn.initializers.zeros, dtype=dtype, name=name)(jax.nn.silu(y))
  return jnp.split(out[:, None, :], chunks, axis=-1)


class JointBlock(nn.Module):
  """One MMDiT block over the image stream x [B, N, D] and the text stream c [B, L, D], conditioned on y [B, D]."""
  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  context_pre_only: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, y):
    dense = lambda name: nn.Dense(self.dim, kernel_init=truncated_normal(0.02), dtype=self.dtype, name=name)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(y, self.dim, 6, 'norm1', self.dtype)
    nx = _ln(x) * (1 + scale_msa) + shift_msa
    if self.context_pre_only:  # AdaLayerNormContinuous: scale first, then shift.
      c_scale, c_shift = modulation(y, self.dim, 2, 'norm1_context', self.dtype)
      nc = _ln(c) * (1 + c_scale) + c_shift
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = modulation(
          y, self.dim, 6, 'norm1_context', self.dtype)
      nc = _ln(c) * (1 + c_scale_msa) + c_shift_msa
    b, n, _ = x.shape
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_heads, self.dim // self.num_heads)
    q = jnp.concatenate([heads(dense('to_q')(nx)), heads(dense('add_q_proj')(nc))], axis=1)
    k = jnp.concatenate([heads(dense('to_k')(nx)), heads(dense('add_k_proj')(nc))], axis=1)
    v = jnp.concatenate([heads(dense('to_v')(nx)), heads(dense('add_v_proj')(nc))], axis=1)
    attn = jax.nn.dot_product_attention(q, k, v).reshape(b, q.shape[1], self.dim)
    attn_x, attn_c = attn[:, :n], attn[:, n:]
    x = x + gate_msa * dense('to_out')(attn_x)
    x = x + gate_mlp * FeedForward(self.dim, self.mlp_ratio, self.dtype, name='ff')(
        _ln(x) * (1 + scale_mlp) + shift_mlp)
    if self.context_pre_only:
      return None, x
    c = c + c_gate_msa * dense('to_add_out')(attn_c)
    c = c + c_gate_mlp * FeedForward(self.dim, self.mlp_ratio, self.dtype, name='ff_context')(
        _ln(c) * (1 + c_scale_mlp) + c_shift_mlp)
    return c, x


class MaskGenTransformer(nn.Module):
  """Image tokens [B, N] + text states [B, L, T] + pooled text [B, E] + aesthetic score [B] -> logits [B, N, K]."""
  codebook_size: int
  num_tokens: int
  hidden_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  micro_condition_dim: int = 256  # Size of the aesthetic score's sinusoidal embedding (0 = no micro-condition).
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, text_states, pooled, aesthetic):
    init = truncated_normal(0.02)
    table = self.param('embeddings', init, (self.codebook_size + 1, self.hidden_size))  # + the mask token.
    pos = self.param('pos_embed', init, (1, self.num_tokens, self.hidden_size))
    x = (jnp.take(table, tokens.astype(jnp.int32), axis=0) + pos[:, :tokens.shape[1]]).astype(self.dtype)
    c = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name='text_embed_proj')(text_states)
    if self.micro_condition_dim:
      pooled = jnp.concatenate([pooled, sinusoidal_embedding(aesthetic * 100.0, self.micro_condition_dim)], -1)
    y = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name='cond_pooled_proj')(pooled)
    for i in range(self.num_layers):
      c, x = JointBlock(self.hidden_size, self.num_heads, self.mlp_ratio, i == self.num_layers - 1, self.dtype,
                        name=f'blocks_{i}')(x, c, y)
    scale, shift = modulation(y, self.hidden_size, 2, 'norm_out', self.dtype)
    x = _ln(x) * (1 + scale) + shift
    return (x @ table[:self.codebook_size].T.astype(x.dtype)).astype(jnp.float32)


class MaskGenModel:
  """The generator behind the conditioning interface, with its frozen text encoder (see module docstring)."""

  def __init__(self, net: MaskGenTransformer, conditioner: 'cond_lib.TextConditioner',
               text_encoder: clip_text.TextTransformer, text_params, aesthetic_score: float = 6.0):
    self.net = net
    self.conditioner = conditioner
    self.text_encoder = text_encoder
    self.text_params = text_params
    self.aesthetic_score = aesthetic_score
    self.codebook_size = net.codebook_size
    self.mask_id = net.codebook_size

  def encode_text(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(token states, pooled vector) of caption ids from the frozen encoder."""
    states, pooled = self.text_encoder.apply({'params': self.text_params}, ids)
    return jax.lax.stop_gradient(states), jax.lax.stop_gradient(pooled)

  def _apply(self, fn, params_or_rng, tokens, ids):
    states, pooled = self.encode_text(ids)
    aesthetic = jnp.full((tokens.shape[0],), self.aesthetic_score, jnp.float32)
    return fn(params_or_rng, tokens.astype(jnp.int32), states, pooled, aesthetic)

  def init(self, rng: jax.Array, num_tokens: int, example_cond) -> dict:
    """Initial parameters `{'params': ...}` for `num_tokens` image tokens."""
    tokens = jnp.zeros((1, num_tokens), jnp.int32)
    return self._apply(self.net.init, rng, tokens, jnp.asarray(example_cond)[:1])

  def logits(self, params, tokens: jax.Array, cond, *, deterministic: bool = True,
             dropout_rng: jax.Array | None = None) -> jax.Array:
    """Logits `[B, N, K]` (MaskGen has no dropout: `deterministic` and `dropout_rng` are accepted and unused)."""
    del deterministic, dropout_rng
    return self._apply(lambda p, *a: self.net.apply({'params': p}, *a), params, tokens, cond)

  def guided_logits(self, params, tokens: jax.Array, cond, cfg_scale) -> jax.Array:
    """(1 + w) * cond - w * uncond with the empty caption as uncond; `cfg_scale` may be traced (guidance ramps)."""
    if isinstance(cfg_scale, (int, float)) and cfg_scale == 0:
      return self.logits(params, tokens, cond)
    both = jnp.concatenate([cond, self.conditioner.null(cond)])
    c, u = jnp.split(self.logits(params, jnp.concatenate([tokens, tokens]), both), 2)
    return (1.0 + cfg_scale) * c - cfg_scale * u


def from_config(cfg, conditioner, codebook_size: int, num_tokens: int, text_encoder, text_params,
                dtype: Any = jnp.float32) -> MaskGenModel:
  """The generator of a config section like `configs/t2i_demo.py`'s `teacher`."""
  net = MaskGenTransformer(codebook_size=codebook_size, num_tokens=num_tokens, hidden_size=cfg.hidden_size,
                           num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                           micro_condition_dim=cfg.micro_condition_dim, dtype=dtype)
  return MaskGenModel(net, conditioner, text_encoder, text_params, cfg.aesthetic_score)
