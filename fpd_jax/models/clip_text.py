"""A CLIP-style text transformer (the text tower of open_clip), in Flax.

    x = token_embedding[ids] + positional_embedding
    x = resblock_i(x) for i < num_layers       pre-LN: x + attn(ln_1(x), causal mask); x + mlp(ln_2(x))
    pooled = ln_final(x)[argmax(ids)] @ text_projection        (the end-of-text token has the largest id)

`__call__(ids)` returns `(states, pooled)`: `states` [B, L, width] is the output of block `state_layer` (default -2:
the penultimate block, before `ln_final`, as MaskGen reads its text condition), `pooled` [B, embed_dim].
`__call__(ids, with_final=True)` adds the `ln_final` output of every position [B, L, width] (the TA-TiTok decoder's
text guidance). open_clip's `attn_mask` is the causal mask; `pooled` is taken at the argmax of the ids, open_clip's
'argmax' pooling (the end-of-text id is the largest), after `ln_final`, times `text_projection`.

Parameter structure (so the released open_clip ViT-L/14 text tower can load: width 768, 12 layers, 12 heads,
context 77, QuickGELU for OpenAI weights, embed_dim 768). open_clip state_dict key -> this module's path:

  token_embedding.weight                               token_embedding/embedding
  positional_embedding [77, W]                         positional_embedding
  transformer.resblocks.{i}.ln_1.{weight,bias}         resblocks_{i}/ln_1/{scale,bias}
  transformer.resblocks.{i}.attn.in_proj_weight [3W,W] resblocks_{i}/attn/in_proj/kernel  = weight.T (q, k, v)
  transformer.resblocks.{i}.attn.in_proj_bias          resblocks_{i}/attn/in_proj/bias
  transformer.resblocks.{i}.attn.out_proj.{weight,bias} resblocks_{i}/attn/out_proj/{kernel (= weight.T), bias}
  transformer.resblocks.{i}.ln_2.{weight,bias}         resblocks_{i}/ln_2/{scale,bias}
  transformer.resblocks.{i}.mlp.c_fc.{weight,bias}     resblocks_{i}/mlp/c_fc/{kernel (= weight.T), bias}
  transformer.resblocks.{i}.mlp.c_proj.{weight,bias}   resblocks_{i}/mlp/c_proj/{kernel (= weight.T), bias}
  ln_final.{weight,bias}                               ln_final/{scale,bias}
  text_projection [W, E]                               text_projection (as is: pooled @ text_projection)

LayerNorm epsilon 1e-5 (torch's default). `VIT_L_14_336` holds the released text tower's sizes (open_clip
`ViT-L-14-336`, OpenAI weights: QuickGELU, 49,408 ids, 77 positions).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5
# open_clip ViT-L-14-336's text tower with OpenAI weights (model_configs/ViT-L-14-336.json, quick_gelu=True).
VIT_L_14_336 = dict(vocab_size=49408, context_length=77, width=768, num_layers=12, num_heads=12, mlp_ratio=4.0,
                    embed_dim=768, activation='quick_gelu', state_layer=-2)


def quick_gelu(x):
  """OpenAI CLIP's activation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
  """torch.nn.MultiheadAttention's layout: one `in_proj` for q, k, v, then `out_proj`; causal mask (or none)."""
  num_heads: int
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    b, length, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, name='in_proj')(x).reshape(b, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal).reshape(b, length, width)
    return nn.Dense(width, name='out_proj')(out)


class Mlp(nn.Module):
  width: int
  mlp_ratio: float
  activation: str

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(int(self.width * self.mlp_ratio), name='c_fc')(x)
    h = quick_gelu(h) if self.activation == 'quick_gelu' else jax.nn.gelu(h, approximate=False)
    return nn.Dense(self.width, name='c_proj')(h)


class ResidualAttentionBlock(nn.Module):
  """open_clip's pre-LN block (also TiTok's `ResidualAttentionBlock`, non-causal with exact GELU)."""
  width: int
  num_heads: int
  mlp_ratio: float
  activation: str
  causal: bool = True

  @nn.compact
  def __call__(self, x):
    x = x + CausalSelfAttention(self.num_heads, self.causal, name='attn')(nn.LayerNorm(LN_EPS, name='ln_1')(x))
    return x + Mlp(self.width, self.mlp_ratio, self.activation, name='mlp')(nn.LayerNorm(LN_EPS, name='ln_2')(x))


class TextTransformer(nn.Module):
  """The CLIP text tower: ids `[B, L]` -> (states of block `state_layer` [B, L, width], pooled [B, embed_dim]).

  Attributes:
    vocab_size: token ids are 0..vocab_size-1; the end-of-text id must be the largest id in use (pooling).
    context_length: positions (77 for open_clip).
    width, num_layers, num_heads, mlp_ratio: transformer sizes.
    embed_dim: size of the pooled, projected vector.
    activation: 'quick_gelu' (OpenAI weights) or 'gelu' (exact GELU, as open_clip's LAION models).
    state_layer: which block's output `states` is (-1 last, -2 penultimate, ...; Python indexing over blocks).
  """
  vocab_size: int
  context_length: int = 77
  width: int = 512
  num_layers: int = 12
  num_heads: int = 8
  mlp_ratio: float = 4.0
  embed_dim: int = 512
  activation: str = 'quick_gelu'
  state_layer: int = -2

  @nn.compact
  def __call__(self, ids: jax.Array, with_final: bool = False) -> tuple[jax.Array, ...]:
    ids = ids.astype(jnp.int32)
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name='token_embedding')(ids)
    pos = self.param('positional_embedding', nn.initializers.normal(0.01), (self.context_length, self.width))
    x = x + pos[:ids.shape[1]]
    outputs = []
    for i in range(self.num_layers):
      x = ResidualAttentionBlock(self.width, self.num_heads, self.mlp_ratio, self.activation,
                                 name=f'resblocks_{i}')(x)
      outputs.append(x)
    states = outputs[self.state_layer]
    x = nn.LayerNorm(LN_EPS, name='ln_final')(x)
    eot = jnp.argmax(ids, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    proj = self.param('text_projection', nn.initializers.normal(self.width ** -0.5), (self.width, self.embed_dim))
    return (states, pooled @ proj, x) if with_final else (states, pooled @ proj)


def from_config(cfg, vocab_size: int, context_length: int) -> TextTransformer:
  """The text tower of a config section like `configs/t2i_demo.py`'s `text_encoder`."""
  return TextTransformer(vocab_size=vocab_size, context_length=context_length, width=cfg.width,
                         num_layers=cfg.num_layers, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                         embed_dim=cfg.embed_dim, activation=cfg.activation, state_layer=cfg.state_layer)
