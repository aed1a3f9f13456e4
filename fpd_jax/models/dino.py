"""DINOv2 / DINOv3 vision transformers in Flax, and the DINO feature encoder of the drift loss.

The paper's feature encoder phi is DINOv3 ViT-B/16, tapped after blocks 2, 5, 8 and 11, each tap pooled to a
small grid (DESIGN.md §1.3 step 5). `VisionTransformer` reproduces the numerics of the official PyTorch models
(facebookresearch/dinov2 `dinov2/models/vision_transformer.py`, facebookresearch/dinov3
`dinov3/models/vision_transformer.py`) so that their released weights, imported with
`python -m fpd_jax.tools.import_dino`, give the same features:

- both: a patch convolution (kernel = stride = patch size), a cls token and optional register tokens
  (DINOv2 `register_tokens`, DINOv3 `storage_tokens`) placed right after it, pre-LN blocks
  `x + ls1(attn(norm1(x)))`, `x + ls2(mlp(norm2(x)))` with LayerScale, a fused qkv projection, exact (erf) GELU,
  and a final LayerNorm;
- DINOv2: a learned position embedding for a `pos_embed_grid` x `pos_embed_grid` patch grid (37 for the released
  518-pixel models), added to cls + patch tokens before the registers are inserted. Another input grid gets the
  embedding resized as the reference does (bicubic with A = -0.75 and a `+interpolate_offset` scale factor; or,
  for the register models, antialiased bicubic with A = -0.5), done here as two fixed interpolation matrices;
- DINOv3: no position embedding but 2-D RoPE on the patch tokens' queries and keys (the prefix tokens are not
  rotated): patch centres normalised to [-1, 1] per axis, periods `base ** (4 i / head_dim)` (or the
  `min_period`/`max_period` parametrisation), angles `2 pi coord / period` laid out [h-angles, w-angles] and
  tiled twice over the head dimension, rotation `x cos + rotate_half(x) sin`. The released models mask the key
  part of the qkv bias (`LinearKMaskedBias` with a `bias_mask` buffer): with `mask_k_bias` the key bias is never
  used.

Parameter tree (Flax names; the importer maps the official names onto it):

  patch_embed/proj/{kernel [p, p, C, D], bias}   cls_token [1, 1, D]   pos_embed [1, 1 + G*G, D] (DINOv2)
  register_tokens | storage_tokens [1, R, D]     norm/{scale, bias}
  blocks_<i>/{norm1, norm2}/{scale, bias}   blocks_<i>/attn/{qkv, proj}/{kernel [in, out], bias}
  blocks_<i>/{ls1, ls2}/gamma               blocks_<i>/mlp/{fc1, fc2}/{kernel, bias}

`DINOFeatures` wraps a model as a feature encoder (`fpd_jax.models.feature_encoder`): images in [0, 1] ->
antialiased bilinear resize to `image_size` -> ImageNet normalisation -> the ViT -> the patch tokens of each tapped
block (0-based) on the patch grid -> `pool_to_grid` -> `[B, grid * grid * D]`. It is differentiable with respect to
the images. `from_config` and `load_params` build both from a config section (see `from_config`).
"""

import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax.errors import UserError
from fpd_jax.models import attention
from fpd_jax.models.feature_encoder import pool_to_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAMILIES = ('dinov2', 'dinov3')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of a DINO ViT (the sizes and the reference's conventions; no weights).

  Attributes:
    family: 'dinov2' (learned position embedding) or 'dinov3' (RoPE).
    patch_size: Patch side in pixels (14 for DINOv2, 16 for DINOv3).
    dim: Token width D.
    depth: Number of blocks.
    heads: Attention heads (D must divide by it; DINOv3 needs D divisible by 4 * heads).
    mlp_ratio: MLP hidden width over D.
    num_registers: Extra tokens after cls (DINOv2 `register_tokens`, DINOv3 `storage_tokens`).
    layer_scale: LayerScale's initial value (1.0 in the DINOv2 releases, 1e-5 in DINOv3); None: no LayerScale.
    norm_eps: LayerNorm epsilon (1e-6 DINOv2; 1e-5 DINOv3, its 'layernormbf16').
    in_chans: Input channels.
    pos_embed_grid: DINOv2: side of the patch grid the position embedding was trained for (518 // 14 = 37).
    interpolate_antialias: DINOv2: resize the position embedding with antialiased bicubic (the register models).
    interpolate_offset: DINOv2: scale factor (grid + offset) / pos_embed_grid for the resize; 0: the exact size.
    rope_base: DINOv3: RoPE base (periods base ** (4 i / head_dim)); None to use min/max periods.
    rope_min_period: DINOv3: smallest period (with rope_max_period, instead of rope_base).
    rope_max_period: DINOv3: largest period.
    rope_normalize_coords: DINOv3: 'separate' (each axis by its own size), 'max' or 'min'.
    mask_k_bias: DINOv3: the key third of the qkv bias is masked out (the released models' `bias_mask`).
    cls_init_std: Std of the random init of cls/register tokens (1e-6 DINOv2, 0.02 DINOv3).
  """
  family: str
  patch_size: int
  dim: int
  depth: int
  heads: int
  mlp_ratio: float = 4.0
  num_registers: int = 0
  layer_scale: float | None = 1.0
  norm_eps: float = 1e-6
  in_chans: int = 3
  pos_embed_grid: int = 0
  interpolate_antialias: bool = False
  interpolate_offset: float = 0.1
  rope_base: float | None = 100.0
  rope_min_period: float | None = None
  rope_max_period: float | None = None
  rope_normalize_coords: str = 'separate'
  mask_k_bias: bool = False
  cls_init_std: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.dim // self.heads

  @property
  def num_prefix_tokens(self) -> int:
    """cls + registers: the tokens before the patch tokens."""
    return 1 + self.num_registers

  @property
  def mlp_hidden(self) -> int:
    return int(self.dim * self.mlp_ratio)

  def validate(self) -> None:
    """Raises UserError for an inconsistent architecture."""
    if self.family not in FAMILIES:
      raise UserError(f'unknown DINO family {self.family!r}; use one of {FAMILIES}.')
    for name in ('patch_size', 'dim', 'depth', 'heads', 'in_chans'):
      if getattr(self, name) <= 0:
        raise UserError(f'DINO {name} must be > 0 (got {getattr(self, name)}); fix the feature encoder config.')
    if self.dim % self.heads:
      raise UserError(f'DINO dim {self.dim} is not divisible by heads {self.heads}; change one of them.')
    if self.family == 'dinov2' and self.pos_embed_grid <= 0:
      raise UserError('a DINOv2 model needs pos_embed_grid > 0 (the patch grid of its position embedding, 37 for '
                      'the released 518-pixel models).')
    if self.family == 'dinov3':
      if self.dim % (4 * self.heads):
        raise UserError(f'DINOv3 RoPE needs dim divisible by 4 * heads (dim {self.dim}, heads {self.heads}); '
                        'change one of them.')
      periods_given = self.rope_min_period is not None and self.rope_max_period is not None
      if (self.rope_base is None) == (not periods_given):
        raise UserError('DINOv3 RoPE needs either rope_base or both rope_min_period and rope_max_period (not '
                        'both); fix the feature encoder config.')
      if self.rope_normalize_coords not in ('separate', 'max', 'min'):
        raise UserError(f"rope_normalize_coords must be 'separate', 'max' or 'min' (got "
                        f'{self.rope_normalize_coords!r}).')


def _dinov2(dim: int, depth: int, heads: int, registers: bool, **kw) -> ViTConfig:
  """A released DINOv2 layout (hub `dinov2_vit*14[_reg]`: img_size 518, init_values 1.0)."""
  kw = {'pos_embed_grid': 37, **kw}
  if registers:  # The `_reg` hub models: 4 registers, antialiased resize without offset.
    kw = {'num_registers': 4, 'interpolate_antialias': True, 'interpolate_offset': 0.0, **kw}
  return ViTConfig(family='dinov2', patch_size=14, dim=dim, depth=depth, heads=heads, **kw)


def _dinov3(dim: int, depth: int, heads: int, **kw) -> ViTConfig:
  """A released DINOv3 ViT layout (hub `dinov3_vit*16`: RoPE base 100 'separate', 4 storage tokens, masked
  key bias, LayerScale 1e-5, LayerNorm eps 1e-5, MLP FFN)."""
  kw = {'num_registers': 4, 'layer_scale': 1e-5, 'norm_eps': 1e-5, 'mask_k_bias': True, 'cls_init_std': 0.02,
        'rope_base': 100.0, 'rope_normalize_coords': 'separate', **kw}
  return ViTConfig(family='dinov3', patch_size=16, dim=dim, depth=depth, heads=heads, **kw)


# Layout name (the hub entry point's name) -> architecture. The tiny ones are for tests and smoke runs.
LAYOUTS: dict[str, ViTConfig] = {
    'dinov2_vits14': _dinov2(384, 12, 6, registers=False),
    'dinov2_vitb14': _dinov2(768, 12, 12, registers=False),
    'dinov2_vitl14': _dinov2(1024, 24, 16, registers=False),
    'dinov2_vits14_reg': _dinov2(384, 12, 6, registers=True),
    'dinov2_vitb14_reg': _dinov2(768, 12, 12, registers=True),
    'dinov2_vitl14_reg': _dinov2(1024, 24, 16, registers=True),
    'dinov3_vits16': _dinov3(384, 12, 6),
    'dinov3_vitb16': _dinov3(768, 12, 12),
    'dinov3_vitl16': _dinov3(1024, 24, 16),
    'dinov2_tiny14': _dinov2(64, 3, 4, registers=False, pos_embed_grid=5),
    'dinov2_tiny14_reg': _dinov2(64, 3, 4, registers=True, pos_embed_grid=3),
    'dinov3_tiny16': _dinov3(64, 3, 4),
}


def layout(name: str) -> ViTConfig:
  """The architecture of a named layout (UserError listing the known ones otherwise)."""
  if name not in LAYOUTS:
    raise UserError(f'unknown DINO layout {name!r}; use one of {", ".join(LAYOUTS)}.')
  return LAYOUTS[name]


def vit_config(cfg) -> ViTConfig:
  """The architecture of a config section: `LAYOUTS[cfg.layout]` with any ViTConfig field of `cfg` overriding it.

  Args:
    cfg: a ConfigDict (or dict) with `layout` and optionally fields of `ViTConfig` (e.g. `depth`, `dim`).

  Returns:
    The validated ViTConfig.
  """
  base = layout(cfg['layout'])
  overrides = {f.name: cfg[f.name] for f in dataclasses.fields(ViTConfig) if f.name in cfg}
  if 'mlp_ratio' in overrides:
    overrides['mlp_ratio'] = float(overrides['mlp_ratio'])
  config = dataclasses.replace(base, **overrides)
  config.validate()
  return config


# ---------------------------------------------------------------------------------------------------------------
# Position encodings (static: computed with numpy from the shapes, exactly as the references do).


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a` (PyTorch: -0.75 plain bicubic, -0.5 antialiased)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, scale: float, antialias: bool) -> np.ndarray:
  """`[out_size, in_size]` weights of PyTorch's 1-D bicubic resize (`F.interpolate(mode='bicubic',
  align_corners=False)`), float64.

  Args:
    in_size: Input length.
    out_size: Output length.
    scale: Source step per output step: `1 / scale_factor` when a scale factor is given, else in/out.
    antialias: PyTorch's antialiased kernel (PIL's: a = -0.5, support widened by `scale` when downsampling,
      weights renormalised, no index clamping) instead of the plain one (a = -0.75, 4 taps, edge indices clamped;
      its source positions rounded to float32 as PyTorch's CPU kernel does, which moves weights by ~1e-6).
  """
  w = np.zeros((out_size, in_size))
  if not antialias:
    f32 = np.float32  # The reference computes source positions in float32 (its `opmath_t` for float inputs),
    for i in range(out_size):  # with a fused multiply-add: one rounding of the exact value.
      real = f32(float(f32(scale)) * (i + 0.5) - 0.5)
      x0 = math.floor(real)
      t = f32(real - f32(x0))
      taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t], np.float32), f32(-0.75))
      for k in range(4):
        w[i, min(max(x0 - 1 + k, 0), in_size - 1)] += taps[k]
    return w
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
    total = taps.sum()
    w[i, lo:hi] = taps / total if total != 0 else taps
  return w


def pos_embed_matrices(config: ViTConfig, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray] | None:
  """(rows `[grid_h, G]`, cols `[grid_w, G]`) resizing DINOv2's G x G position embedding, or None when the
  grid is G x G (the reference then uses the embedding as is)."""
  g = config.pos_embed_grid
  if (grid_h, grid_w) == (g, g):
    return None
  mats = []
  for n in (grid_h, grid_w):
    if config.interpolate_offset:
      factor = float(n + config.interpolate_offset) / g
      if math.floor(g * factor) != n:
        raise UserError(f'interpolate_offset {config.interpolate_offset} makes the position-embedding resize '
                        f'{g} -> {n} give {math.floor(g * factor)} rows, as in the reference; use an offset in '
                        '[0, 0.5).')
      scale = 1.0 / factor
    else:
      scale = g / n
    mats.append(bicubic_matrix(g, n, np.float32(scale), config.interpolate_antialias).astype(np.float32))
  return mats[0], mats[1]


def rope_periods(config: ViTConfig) -> np.ndarray:
  """DINOv3's `rope_embed.periods` buffer `[head_dim // 4]`, float32, computed as the reference does."""
  n = config.head_dim // 4
  if config.rope_base is not None:
    exponents = (2 * np.arange(n, dtype=np.float32) / np.float32(config.head_dim // 2)).astype(np.float32)
    return np.power(np.float32(config.rope_base), exponents).astype(np.float32)
  base = np.float32(config.rope_max_period / config.rope_min_period)
  exponents = np.linspace(0, 1, n, dtype=np.float32)
  return ((np.power(base, exponents) / base) * np.float32(config.rope_max_period)).astype(np.float32)


def rope_sin_cos(config: ViTConfig, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
  """DINOv3's eval-mode RoPE tables `(sin, cos)`, each `[grid_h * grid_w, head_dim]` float32 (row-major patches)."""
  dt = np.float32
  if config.rope_normalize_coords == 'max':
    div_h = div_w = max(grid_h, grid_w)
  elif config.rope_normalize_coords == 'min':
    div_h = div_w = min(grid_h, grid_w)
  else:
    div_h, div_w = grid_h, grid_w
  coords_h = (np.arange(0.5, grid_h, dtype=dt) / dt(div_h)).astype(dt)
  coords_w = (np.arange(0.5, grid_w, dtype=dt) / dt(div_w)).astype(dt)
  coords = np.stack(np.meshgrid(coords_h, coords_w, indexing='ij'), axis=-1).reshape(-1, 2)
  coords = (dt(2.0) * coords - dt(1.0)).astype(dt)
  angles = (dt(2 * math.pi) * coords[:, :, None] / rope_periods(config)[None, None, :]).astype(dt)
  angles = np.tile(angles.reshape(angles.shape[0], -1), (1, 2))  # [HW, head_dim]: [h..., w..., h..., w...]
  return np.sin(angles).astype(dt), np.cos(angles).astype(dt)


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates the last `sin.shape[0]` tokens of `x` `[B, N, heads, head_dim]` (in float32, as the reference's
  float32 RoPE), leaving the prefix tokens as they are."""
  prefix = x.shape[1] - sin.shape[0]
  head, tail = x[:, :prefix], x[:, prefix:].astype(jnp.float32)
  tail = tail * cos[None, :, None, :] + _rotate_half(tail) * sin[None, :, None, :]
  return jnp.concatenate([head, tail.astype(x.dtype)], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Modules.


def _trunc_normal(std: float):
  """Normal(0, std) truncated at +-2 std, for random init (the references' `trunc_normal_(std=0.02)` truncates at
  +-2 in absolute terms, i.e. hardly at all; only random weights differ)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * std
  return init


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_trunc_normal(0.02), name=name)


def _layer_norm(config: ViTConfig, dtype: Any, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch.nn.LayerNorm (the one-pass E[x^2] - E[x]^2 loses digits on DINO's large tokens).
  return nn.LayerNorm(epsilon=config.norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class LayerScale(nn.Module):
  """`x * gamma` (per channel)."""
  init_value: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param('gamma', nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class QKV(nn.Module):
  """The fused qkv projection `[.., D] -> [.., 3D]`; with `mask_k_bias` the key third of the bias is not added
  (DINOv3's `LinearKMaskedBias` with its bias_mask [1, 0, 1])."""
  dim: int
  mask_k_bias: bool
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _trunc_normal(0.02), (x.shape[-1], 3 * self.dim))
    bias = self.param('bias', nn.initializers.zeros, (3 * self.dim,))
    if self.mask_k_bias:
      bias = bias * jnp.repeat(jnp.array([1.0, 0.0, 1.0], bias.dtype), self.dim)
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv (`[B, N, 3, heads, head_dim]` layout) and optional RoPE."""
  config: ViTConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    c = self.config
    b, n, d = x.shape
    qkv = QKV(d, c.mask_k_bias, self.dtype, name='qkv')(x).reshape(b, n, 3, c.heads, c.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attention.dot_product_attention(q, k, v)  # Scale head_dim ** -0.5; cuDNN's kernel on GPU in bf16.
    return _dense(d, self.dtype, 'proj')(out.reshape(b, n, d))


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  config: ViTConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _dense(self.config.mlp_hidden, self.dtype, 'fc1')(x)
    return _dense(x.shape[-1], self.dtype, 'fc2')(nn.gelu(h, approximate=False))


class Block(nn.Module):
  """Pre-LN transformer block with LayerScale: `x + ls1(attn(norm1 x))`, then `x + ls2(mlp(norm2 x))`."""
  config: ViTConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    c = self.config
    h = Attention(c, self.dtype, name='attn')(_layer_norm(c, self.dtype, 'norm1')(x), rope)
    if c.layer_scale is not None:
      h = LayerScale(c.layer_scale, name='ls1')(h)
    x = x + h
    h = Mlp(c, self.dtype, name='mlp')(_layer_norm(c, self.dtype, 'norm2')(x))
    if c.layer_scale is not None:
      h = LayerScale(c.layer_scale, name='ls2')(h)
    return x + h


class VisionTransformer(nn.Module):
  """A DINOv2 or DINOv3 ViT (see the module docstring).

  Attributes:
    config: the architecture.
    dtype: compute dtype (e.g. jnp.bfloat16; parameters stay float32; RoPE and LayerNorm statistics in float32).
  """
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, taps: tuple[int, ...] = ()) -> dict[str, Any]:
    """Runs the ViT on normalised images.

    Args:
      x: `[B, H, W, in_chans]` images, already normalised (ImageNet mean/std); H and W multiples of the patch.
      taps: 0-based indices of blocks whose outputs to return.

    Returns:
      {'blocks': tuple of `[B, N, D]` outputs of the tapped blocks (in the order of `taps`), 'blocks_norm': the
      same through the final LayerNorm (the reference's `get_intermediate_layers(norm=True)`), 'x_norm': the
      final LayerNorm of the last block's output `[B, N, D]`, 'grid': (h, w) patch grid}. N = 1 + registers + h * w,
      tokens ordered cls, registers, patches (row-major). Unused outputs cost nothing under jit.
    """
    c = self.config
    for t in taps:
      if not 0 <= t < c.depth:
        raise UserError(f'DINO block {t} does not exist: the model has blocks 0..{c.depth - 1}; fix the tapped '
                        'layers.')
    b = x.shape[0]
    x = _PatchEmbed(c, self.dtype, name='patch_embed')(x)
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(b, gh * gw, c.dim)
    cls = self.param('cls_token', nn.initializers.normal(c.cls_init_std), (1, 1, c.dim))
    registers = None
    if c.num_registers:
      name = 'register_tokens' if c.family == 'dinov2' else 'storage_tokens'
      registers = self.param(name, nn.initializers.normal(c.cls_init_std), (1, c.num_registers, c.dim))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.dim))
    rope = None
    if c.family == 'dinov2':
      pos = self.param('pos_embed', _trunc_normal(0.02), (1, 1 + c.pos_embed_grid ** 2, c.dim))
      mats = pos_embed_matrices(c, gh, gw)
      if mats is not None:
        patch_pos = pos[0, 1:].reshape(c.pos_embed_grid, c.pos_embed_grid, c.dim)
        patch_pos = jnp.einsum('hi,wj,ijd->hwd', mats[0], mats[1], patch_pos,
                               precision=jax.lax.Precision.HIGHEST).reshape(1, gh * gw, c.dim)
        pos = jnp.concatenate([pos[:, :1], patch_pos], axis=1)
      x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
      parts = [x[:, :1], x[:, 1:]]
    else:
      sin, cos = rope_sin_cos(c, gh, gw)
      rope = (jnp.asarray(sin), jnp.asarray(cos))
      parts = [cls, x]
    if registers is not None:
      parts.insert(1, jnp.broadcast_to(registers.astype(x.dtype), (b, c.num_registers, c.dim)))
    x = jnp.concatenate(parts, axis=1)
    tapped = {}
    for i in range(c.depth):
      x = Block(c, self.dtype, name=f'blocks_{i}')(x, rope)
      if i in taps:
        tapped[i] = x
    norm = _layer_norm(c, self.dtype, 'norm')
    return {'blocks': tuple(tapped[t] for t in taps), 'blocks_norm': tuple(norm(tapped[t]) for t in taps),
            'x_norm': norm(x), 'grid': (gh, gw)}


class _PatchEmbed(nn.Module):
  """`patch_embed/proj`: a conv with kernel = stride = patch size (init U(+-1/sqrt(fan_in)), as torch's)."""
  config: ViTConfig
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.config.patch_size
    bound = 1.0 / math.sqrt(p * p * self.config.in_chans)

    def uniform(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.Conv(self.config.dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                   kernel_init=uniform, bias_init=uniform, name='proj')(x)


# ---------------------------------------------------------------------------------------------------------------
# The feature encoder.


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """`[B, H, W, 1 or 3]` images in [0, 1] -> `[B, image_size, image_size, 3]` float32, ImageNet-normalised.

  Grey images are repeated over three channels; the resize is antialiased bilinear (skipped at the same size).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise UserError(f'DINO features need [B, H, W, 1 or 3] images, got shape {tuple(images.shape)}.')
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, 3), method='linear', antialias=True)
  return (x - jnp.array(IMAGENET_MEAN, jnp.float32)) / jnp.array(IMAGENET_STD, jnp.float32)


@dataclasses.dataclass(frozen=True)
class DINOFeatures:
  """Pooled patch tokens of chosen DINO blocks: the feature-encoder interface `(params, images) -> [[B, S_j]]`.

  Attributes:
    model: the ViT.
    layers: 0-based blocks to tap (the paper: 2, 5, 8, 11 of ViT-B/16).
    grid: each tap's patch grid is pooled to grid x grid (`feature_encoder.pool_to_grid`).
    image_size: images are resized to image_size x image_size (a multiple of the patch size).
    final_norm: pass the taps through the model's final LayerNorm first (the reference's
      `get_intermediate_layers(norm=True)`); off by default: the raw block outputs.
  """
  model: VisionTransformer
  layers: tuple[int, ...]
  grid: int
  image_size: int = 224
  final_norm: bool = False

  def __post_init__(self):
    c = self.model.config
    if self.image_size % c.patch_size:
      raise UserError(f'DINO image_size {self.image_size} is not a multiple of the patch size {c.patch_size}; '
                      f'use e.g. {c.patch_size * max(1, round(self.image_size / c.patch_size))}.')
    if not self.layers:
      raise UserError('the DINO feature encoder needs at least one tapped block (layers).')
    for t in self.layers:
      if not 0 <= t < c.depth:
        raise UserError(f'DINO block {t} does not exist: the model has blocks 0..{c.depth - 1}; fix the tapped '
                        'layers.')
    side = self.image_size // c.patch_size
    if not 0 < self.grid <= side:
      raise UserError(f'DINO feature grid {self.grid} must be in 1..{side} (the patch grid at image_size '
                      f'{self.image_size}).')

  @property
  def feature_sizes(self) -> list[int]:
    """S_j of each tapped layer: grid * grid * D."""
    return [self.grid * self.grid * self.model.config.dim] * len(self.layers)

  def __call__(self, params, images: jax.Array) -> list[jax.Array]:
    x = preprocess(images, self.image_size)
    out = self.model.apply({'params': params}, x, taps=tuple(self.layers))
    taps = out['blocks_norm'] if self.final_norm else out['blocks']
    gh, gw = out['grid']
    prefix = self.model.config.num_prefix_tokens
    features = []
    for tap in taps:
      patches = tap[:, prefix:].reshape(tap.shape[0], gh, gw, tap.shape[-1]).astype(jnp.float32)
      features.append(pool_to_grid(patches, self.grid).reshape(tap.shape[0], -1))
    return features


_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def from_config(cfg) -> DINOFeatures:
  """The DINO feature encoder of a config section.

  Args:
    cfg: a ConfigDict (or dict) with
      layout: a name of `LAYOUTS` (e.g. 'dinov3_vitb16');
      layers: tapped blocks (default (2, 5, 8, 11));
      grid: pooled grid side (default 4);
      image_size: input resize (default 224);
      dtype: 'float32' (default) or 'bfloat16' compute;
      final_norm: normalise the taps with the final LayerNorm (default False);
      any `ViTConfig` field to override the layout's (e.g. depth, dim);
      weights: 'random' or the directory `import_dino` wrote (read by `load_params`, not here).

  Returns:
    The encoder (call it as `encoder(params, images)`).
  """
  dtype = cfg.get('dtype', 'float32')
  if dtype not in _DTYPES:
    raise UserError(f'DINO dtype {dtype!r} is not supported; use one of {list(_DTYPES)}.')
  model = VisionTransformer(vit_config(cfg), dtype=_DTYPES[dtype])
  return DINOFeatures(model, tuple(int(t) for t in cfg.get('layers', (2, 5, 8, 11))), int(cfg.get('grid', 4)),
                      int(cfg.get('image_size', 224)), bool(cfg.get('final_norm', False)))


def _init_images(config: ViTConfig) -> jax.ShapeDtypeStruct:
  """The smallest input (one patch): `init` runs a forward pass, whose size does not change the parameters."""
  return jax.ShapeDtypeStruct((1, config.patch_size, config.patch_size, config.in_chans), jnp.float32)


def abstract_params(config: ViTConfig):
  """ShapeDtypeStructs of the parameter tree of a ViT (no computation)."""
  model = VisionTransformer(config)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x)['params'], _init_images(config))


@functools.lru_cache(maxsize=8)
def _init_fn(config: ViTConfig):
  model = VisionTransformer(config)
  images = _init_images(config)
  return jax.jit(lambda key: model.init(key, jnp.zeros(images.shape, images.dtype))['params'])


def init_params(config: ViTConfig, seed: int = 0):
  """Randomly initialised parameters (the references' init schemes; for tests, smoke runs and benchmarks).

  The key is an 'rbg' key: XLA compiles its random bits about twice as fast as threefry's for this many arrays.
  """
  return _init_fn(config)(jax.random.key(seed, impl='rbg'))


EXPORT = 'export'  # OUT/export (Orbax) + OUT/export_meta.json, as written by `fpd_jax.tools.import_dino`.


def load_params(cfg):
  """The parameters `from_config(cfg)` needs: random (`cfg.weights == 'random'`, seed `cfg.seed`, default 0) or
  the Orbax export in the directory `cfg.weights` written by `python -m fpd_jax.tools.import_dino`.

  Raises:
    UserError: no weights given, a missing or incomplete directory, or an export of another architecture (the
      first differing field or parameter is named).
  """
  config = vit_config(cfg)
  weights = cfg.get('weights', None)
  if not weights:
    raise UserError("the DINO feature encoder needs weights: set its `weights` to the directory written by "
                    "`python -m fpd_jax.tools.import_dino`, or to 'random'.")
  if weights == 'random':
    return init_params(config, int(cfg.get('seed', 0)))
  directory = os.path.join(weights, EXPORT)
  what = f'the DINO weights ({cfg["layout"]})'
  meta = ckpt_lib.load_export_meta(directory, what)
  stored = meta.get('vit', {})
  for f in dataclasses.fields(ViTConfig):
    if f.name == 'cls_init_std':  # Random init only.
      continue
    if f.name in stored and stored[f.name] != getattr(config, f.name):
      raise UserError(f'{what} at {weights} were imported as layout {meta.get("layout")!r} with {f.name}='
                      f'{stored[f.name]!r}, but the config asks for {f.name}={getattr(config, f.name)!r}; set the '
                      'layout (and overrides) the weights were imported with, or import them again.')
  return ckpt_lib.load_export(directory, abstract_params(config), what)
