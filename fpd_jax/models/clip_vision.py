"""The CLIP image tower (open_clip's `VisionTransformer`, OpenAI layout), in Flax: the image half of the CLIP score.

    x = patches(image) @ conv1                              [B, grid^2, W]   (stride = patch size, no bias)
    x = [class_embedding; x] + positional_embedding         [B, grid^2 + 1, W]
    x = ln_pre(x);  x = resblock_i(x) for i < num_layers    pre-LN blocks, no mask, QuickGELU for OpenAI weights
    embedding = ln_post(x)[:, 0] @ proj                     [B, embed_dim]

open_clip 2.31.0 with the defaults its OpenAI models use: `pool_type='tok'` (the class token), `final_ln_after_pool`
False (ln_post normalises every token, then the class token is taken: the same as ln_post of the class token), no
attentional pooler, learnable positions, `ln_pre` present. `__call__(images)` reads images that are already
normalised, NHWC (`preprocess` makes them from images in [0, 1]); it returns `CLIP.encode_image` (unnormalised).

Parameter structure (the released open_clip ViT-L/14-336: image 336, patch 14, width 1024, 24 layers, 16 heads of
64, mlp 4, embed_dim 768). open_clip state_dict key (OpenAI's TorchScript archive uses the same names) -> our path:

  visual.conv1.weight [W, 3, p, p]                            conv1/kernel [p, p, 3, W]  (OIHW -> HWIO)
  visual.class_embedding [W]                                  class_embedding
  visual.positional_embedding [grid^2 + 1, W]                 positional_embedding
  visual.ln_pre.{weight,bias}                                 ln_pre/{scale,bias}
  visual.transformer.resblocks.{i}.ln_1.{weight,bias}         resblocks_{i}/ln_1/{scale,bias}
  visual.transformer.resblocks.{i}.attn.in_proj_weight [3W,W] resblocks_{i}/attn/in_proj/kernel  = weight.T
  visual.transformer.resblocks.{i}.attn.in_proj_bias          resblocks_{i}/attn/in_proj/bias
  visual.transformer.resblocks.{i}.attn.out_proj.{weight,bias} resblocks_{i}/attn/out_proj/{kernel (= .T), bias}
  visual.transformer.resblocks.{i}.ln_2.{weight,bias}         resblocks_{i}/ln_2/{scale,bias}
  visual.transformer.resblocks.{i}.mlp.c_fc.{weight,bias}     resblocks_{i}/mlp/c_fc/{kernel (= .T), bias}
  visual.transformer.resblocks.{i}.mlp.c_proj.{weight,bias}   resblocks_{i}/mlp/c_proj/{kernel (= .T), bias}
  visual.ln_post.{weight,bias}                                ln_post/{scale,bias}
  visual.proj [W, E]                                          proj (as is: pooled @ proj)

The blocks are `clip_text.ResidualAttentionBlock` without the causal mask (LayerNorm epsilon 1e-5).

`preprocess` stands for open_clip's inference transform (`image_transform(image_size, is_train=False)`: PIL bicubic
resize of the shorter side, centre crop, ToTensor, OpenAI mean/std) on square images given as floats in [0, 1]:
`jax.image.resize` bicubic (Keys cubic, a = -0.5, as PIL's; antialiased, i.e. the kernel widened when downsampling,
as PIL does) to `image_size`, clipped to [0, 1] (PIL clips its 8-bit output), then the mean/std. What differs: PIL
resizes 8-bit images in two passes (rows, then columns) and rounds and clips each pass to 8 bits, and its border
handling and fixed-point weights differ in the last bits; here floats stay floats. On random-noise images (every pixel
an edge, the worst case) a pixel differs by up to 4 grey levels (24 -> 16 px) or 7 (12 -> 16 px), 0.3 to 0.4 on
average (tests/test_import_maskgen.py); smooth images differ far less. A square image needs no crop.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpd_jax.models import clip_text

# open_clip/constants.py: OPENAI_DATASET_MEAN, OPENAI_DATASET_STD.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip ViT-L-14-336's vision tower (model_configs/ViT-L-14-336.json; heads = width / head_width 64).
VIT_L_14_336 = dict(image_size=336, patch_size=14, width=1024, num_layers=24, num_heads=16, mlp_ratio=4.0,
                    embed_dim=768, activation='quick_gelu')


class VisionTransformer(nn.Module):
  """The CLIP image tower: normalised images `[B, image_size, image_size, 3]` -> embeddings `[B, embed_dim]`.

  Attributes:
    image_size, patch_size: square images of (image_size / patch_size)^2 patches.
    width, num_layers, num_heads, mlp_ratio: transformer sizes.
    embed_dim: size of the projected class token (the text tower's `embed_dim`).
    activation: 'quick_gelu' (OpenAI weights) or 'gelu'.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  embed_dim: int = 512
  activation: str = 'quick_gelu'

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p, grid = self.patch_size, self.image_size // self.patch_size
    scale = self.width ** -0.5
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', use_bias=False, name='conv1')(images)
    x = x.reshape(x.shape[0], -1, self.width)  # Row-major patches, as torch's flatten of [B, W, grid, grid].
    cls = self.param('class_embedding', nn.initializers.normal(scale), (self.width,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x], axis=1)
    x = x + self.param('positional_embedding', nn.initializers.normal(scale), (grid * grid + 1, self.width))
    x = nn.LayerNorm(clip_text.LN_EPS, name='ln_pre')(x)
    for i in range(self.num_layers):
      x = clip_text.ResidualAttentionBlock(self.width, self.num_heads, self.mlp_ratio, self.activation, causal=False,
                                           name=f'resblocks_{i}')(x)
    pooled = nn.LayerNorm(clip_text.LN_EPS, name='ln_post')(x[:, 0])
    return pooled @ self.param('proj', nn.initializers.normal(scale), (self.width, self.embed_dim))


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """Images `[B, S, S, 3]` in [0, 1] (any square size S) -> the tower's input `[B, image_size, image_size, 3]`.

  Bicubic resize (antialiased when downsampling) and OpenAI mean/std; see the module docstring for what differs
  from open_clip's PIL transform.
  """
  b, h, w, c = images.shape
  if h != w or c != 3:
    raise ValueError(f'preprocess takes square RGB images [B, S, S, 3]; got {images.shape}.')
  x = images.astype(jnp.float32)
  if h != image_size:
    x = jnp.clip(jax.image.resize(x, (b, image_size, image_size, 3), method='bicubic', antialias=True), 0, 1)
  return (x - jnp.asarray(OPENAI_MEAN)) / jnp.asarray(OPENAI_STD)
