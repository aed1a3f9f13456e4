"""The TA-TiTok VQ decoder (bytedance/1d-tokenizer `modeling/tatitok.py`, `TATiTokDecoder`, non-legacy) in Flax.

MaskGen's tokenizer: 1-D token ids `[B, N]` (N = 128 for `tatitok_bl128_vq`) and the caption's CLIP text states
`[B, 77, 768]` (the `ln_final` output of every position) -> RGB images `[B, H, W, 3]`, about [0, 1] (the released
demo clamps to [0, 1]; so does `decode_images`). `TextConditionedTokenizer` pairs it with the CLIP text tower as the
tokenizer of the FPD step (decoding the lifted embeddings of a draft).

    z = codebook[ids]                                                   [B, N, 64] (no l2-normalisation)
    x = [class_embedding; mask_token x G^2] + positional_embedding      [B, 1 + G^2, W]   (G = 256 / 16)
    x = [x; decoder_embed(z) + latent_token_positional_embedding]
    x = [x; text_guidance_proj(text) + text_guidance_positional_embedding]
    x = resblock_i(ln_pre(x))                     pre-LN ViT blocks: packed `in_proj` attention, exact GELU, no mask
    p = ln_post(x[:, 1:1 + G^2]) -> 1x1 conv (`ffn.0`) to 16*16*3 per patch -> depth-to-space 16x16 -> 3x3 conv

Official state dict name -> our path (tokenizer file; the encoder, `latent_tokens` and the quantizer's training
buffers are not needed to decode):

  quantize.embedding.weight [K, 64]                  codebook
  decoder.decoder_embed.{weight,bias}                decoder_embed/{kernel (= weight.T), bias}
  decoder.class_embedding [1, W]                     class_embedding
  decoder.positional_embedding [1 + G^2, W]          positional_embedding
  decoder.mask_token [1, 1, W]                       mask_token
  decoder.latent_token_positional_embedding [N, W]   latent_token_positional_embedding
  decoder.text_guidance_proj.{weight,bias}           text_guidance_proj/{kernel (= weight.T), bias}
  decoder.text_guidance_positional_embedding [77, W] text_guidance_positional_embedding
  decoder.ln_pre / ln_post.{weight,bias}             ln_pre / ln_post/{scale,bias}
  decoder.transformer.{i}.<as open_clip's block>     transformer_{i}/<as clip_text.ResidualAttentionBlock>
  decoder.ffn.0.{weight [p*p*3, W, 1, 1], bias}      ffn/{kernel [W, p*p*3], bias}
  decoder.conv_out.{weight [3, 3, 3, 3], bias}       conv_out/{kernel (HWIO), bias}

The 1x1 conv's output channel c' = (p1 * p + p2) * 3 + c lands at pixel (h * p + p1, w * p + p2), channel c
(einops 'b (p1 p2 c) h w -> b c (h p1) (w p2)'). LayerNorm epsilon 1e-5 (torch's default).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpd_jax.models import clip_text

LN_EPS = 1e-5
# tatitok_bl128_vq (configs/infer/TA-TiTok/tatitok_bl128_vq.yaml): a ViT-L decoder, 16-pixel patches at 256x256.
TATITOK_BL128_VQ = dict(codebook_size=8192, token_size=64, num_tokens=128, image_size=256, patch_size=16, width=1024,
                        num_layers=24, num_heads=16, text_length=77, text_dim=768)


class TATiTokDecoder(nn.Module):
  """Token ids `[B, N]` + text states `[B, text_length, text_dim]` -> images `[B, H, W, 3]` (see module doc)."""
  codebook_size: int = 8192
  token_size: int = 64
  num_tokens: int = 128
  image_size: int = 256
  patch_size: int = 16
  width: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  text_length: int = 77
  text_dim: int = 768
  dtype: Any = jnp.float32

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, tokens: jax.Array, text: jax.Array, embedded: bool = False) -> jax.Array:
    """Images of token ids `[B, N]`, or of codebook embeddings `[B, N, token_size]` when `embedded` (FPD's lift)."""
    w, g, p = self.width, self.grid, self.patch_size
    scale = nn.initializers.normal(w ** -0.5)
    codebook = self.param('codebook', nn.initializers.uniform(2.0 / self.codebook_size),
                          (self.codebook_size, self.token_size))
    z = tokens if embedded else jnp.take(codebook, tokens.astype(jnp.int32), axis=0)
    x = nn.Dense(w, dtype=self.dtype, name='decoder_embed')(z.astype(self.dtype))
    b = x.shape[0]
    cls = self.param('class_embedding', scale, (1, w))
    pos = self.param('positional_embedding', scale, (g * g + 1, w))
    mask = self.param('mask_token', scale, (1, 1, w))
    latent_pos = self.param('latent_token_positional_embedding', scale, (self.num_tokens, w))
    text_pos = self.param('text_guidance_positional_embedding', scale, (self.text_length, w))
    queries = jnp.concatenate([jnp.broadcast_to(cls[None], (b, 1, w)), jnp.broadcast_to(mask, (b, g * g, w))], 1)
    queries = queries + pos
    x = x + latent_pos[:x.shape[1]]
    text = nn.Dense(w, dtype=self.dtype, name='text_guidance_proj')(text) + text_pos
    x = jnp.concatenate([queries.astype(x.dtype), x, text.astype(x.dtype)], axis=1)
    x = nn.LayerNorm(LN_EPS, dtype=self.dtype, name='ln_pre')(x)
    for i in range(self.num_layers):
      x = clip_text.ResidualAttentionBlock(w, self.num_heads, 4.0, 'gelu', causal=False, name=f'transformer_{i}')(x)
    x = nn.LayerNorm(LN_EPS, dtype=self.dtype, name='ln_post')(x[:, 1:1 + g * g])
    x = nn.Dense(p * p * 3, dtype=self.dtype, name='ffn')(x)  # The 1x1 conv.
    x = x.reshape(b, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, 3)
    x = nn.Conv(3, (3, 3), padding=1, dtype=self.dtype, name='conv_out')(x)
    return x.astype(jnp.float32)


def decode_images(decoder: TATiTokDecoder, params, ids: jax.Array, text: jax.Array) -> jax.Array:
  """Images in [0, 1] `[B, H, W, 3]`, clamped as the released demo does."""
  return jnp.clip(decoder.apply({'params': params}, ids, text), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class TextConditionedTokenizer:
  """The decoder with the CLIP text tower that feeds it, as the FPD step's tokenizer (`fpd.decode_embeddings`).

  Parameters: `{'decoder': TATiTokDecoder params, 'text_encoder': TextTransformer params}` (both frozen). The
  condition is the caption ids `[B, L]`; the decoder reads the text tower's `ln_final` states of them.
  """
  decoder: TATiTokDecoder
  text_encoder: clip_text.TextTransformer

  def codebook(self, params) -> jax.Array:
    return params['decoder']['codebook']

  def text_states(self, params, ids: jax.Array) -> jax.Array:
    return self.text_encoder.apply({'params': params['text_encoder']}, ids, with_final=True)[2]

  def decode_embeddings(self, params, embeddings: jax.Array, ids: jax.Array) -> jax.Array:
    """Codebook embeddings `[B, N, token_size]` + caption ids -> raw images `[B, H, W, 3]` (gradients pass)."""
    text = jax.lax.stop_gradient(self.text_states(params, ids))
    return self.decoder.apply({'params': params['decoder']}, embeddings, text, embedded=True)

  def decode_tokens(self, params, tokens: jax.Array, ids: jax.Array) -> jax.Array:
    """Token ids + caption ids -> images in [0, 1], clamped as the released demo does."""
    return decode_images(self.decoder, params['decoder'], tokens, self.text_states(params, ids))
