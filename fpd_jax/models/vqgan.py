"""The VQGAN tokenizer of the released MaskGIT (DESIGN.md §1.1, §4).

A faithful re-implementation of google-research/maskgit's `VQVAE` with the `vq` quantizer, so that the
released `tokenizer_imagenet256_checkpoint` loads unchanged: the parameter tree is exactly
`params/encoder/...`, `params/decoder/...`, `params/quantizer/codebook`.

Quirks of the reference, reproduced on purpose:
  * GroupNorm(32 groups, eps 1e-6) and swish everywhere; no attention layers.
  * The encoder's first 3x3 conv has no bias; every ResBlock conv has no bias.
  * Downsampling is a 2x2 TF-style average pool (SAME padding, padded cells not counted); upsampling is
    nearest-neighbour x2 followed by a 3x3 conv.
  * When a ResBlock changes width, its 1x1 shortcut conv is applied to the block's OUTPUT (not its input),
    i.e. the block returns `h + conv1x1(h)`.
  * Images are in [0, 1]; the decoder output is returned raw (not clipped).

Differences that do not change float32 results: vector quantization (distances, argmin, losses) always runs in
float32 even when `dtype` is bfloat16, so tokens stay stable under reduced-precision compute.

Usage:
  model = VQGAN(filters=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2,
                embedding_dim=256, codebook_size=1024)
  variables = {'params': load_released_params('tokenizer_imagenet256_checkpoint')}
  ids = model.apply(variables, images, method=VQGAN.encode_to_indices)     # [B, 16, 16] int32
  images = model.apply(variables, ids, method=VQGAN.decode_from_indices)   # [B, 256, 256, 3]
"""

import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fpd_jax.errors import UserError

Array = jax.Array

RELEASED_NORM_GROUPS = 32  # GroupNorm groups of the reference; every width must be a multiple of it.
RELEASED_NORM_EPSILON = 1e-6  # GroupNorm epsilon of the reference.


# ---------------------------------------------------------------------------------------------------------------
# Resampling.


def downsample(x: Array) -> Array:
  """Halves the resolution with a 2x2, stride-2 average pool as TensorFlow computes it.

  With SAME padding, TF averages only over the cells inside the image (Flax's `avg_pool` would count the padding
  as zeros). The two agree on even sizes; odd sizes (e.g. 7 -> 4) need this version.

  Args:
    x: [B, H, W, C] features.

  Returns:
    [B, ceil(H/2), ceil(W/2), C] features.
  """
  window = (1, 2, 2, 1)
  pool_sum = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, 'SAME')
  counts = jax.lax.reduce_window(jnp.ones(x.shape[1:3], x.dtype), 0.0, jax.lax.add,
                                 window[1:3], window[1:3], 'SAME')
  return pool_sum / counts[None, :, :, None]


def upsample(x: Array) -> Array:
  """Doubles the resolution by nearest-neighbour repetition ([B, H, W, C] -> [B, 2H, 2W, C])."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ---------------------------------------------------------------------------------------------------------------
# Modules. Class names and creation order fix the parameter names (`ResBlock_3/Conv_1/kernel`, ...), so they
# follow the reference exactly.


def _group_norm(groups: int, epsilon: float, dtype: Any) -> nn.GroupNorm:
  """The reference's normalisation layer (auto-named `GroupNorm_<i>` in the calling module)."""
  return nn.GroupNorm(num_groups=groups, epsilon=epsilon, dtype=dtype)


class ResBlock(nn.Module):
  """Pre-activation residual block: (GroupNorm, swish, 3x3 conv) twice, convs without bias.

  Attributes:
    filters: Output width.
    norm_groups: GroupNorm groups.
    norm_epsilon: GroupNorm epsilon.
    dtype: Compute dtype.
  """
  filters: int
  norm_groups: int = RELEASED_NORM_GROUPS
  norm_epsilon: float = RELEASED_NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    input_width = x.shape[-1]
    residual = x
    h = nn.swish(_group_norm(self.norm_groups, self.norm_epsilon, self.dtype)(x))
    h = nn.Conv(self.filters, (3, 3), use_bias=False, dtype=self.dtype)(h)
    h = nn.swish(_group_norm(self.norm_groups, self.norm_epsilon, self.dtype)(h))
    h = nn.Conv(self.filters, (3, 3), use_bias=False, dtype=self.dtype)(h)
    if input_width != self.filters:
      # Quirk of the reference: the width-changing shortcut projects the block OUTPUT, not its input.
      residual = nn.Conv(self.filters, (1, 1), use_bias=False, dtype=self.dtype)(h)
    return h + residual


class Encoder(nn.Module):
  """Images [B, H, W, C] in [0, 1] -> continuous latents [B, H/2^(L-1), W/2^(L-1), embedding_dim].

  Attributes:
    filters: Base width.
    channel_multipliers: Width multiplier per resolution level; L levels give L-1 downsamplings.
    num_res_blocks: ResBlocks per level (plus as many again at the lowest resolution).
    embedding_dim: Latent (codebook vector) size D.
    norm_groups: GroupNorm groups.
    norm_epsilon: GroupNorm epsilon.
    dtype: Compute dtype.
  """
  filters: int
  channel_multipliers: tuple[int, ...]
  num_res_blocks: int
  embedding_dim: int
  norm_groups: int = RELEASED_NORM_GROUPS
  norm_epsilon: float = RELEASED_NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.filters, (3, 3), use_bias=False, dtype=self.dtype)(x)
    num_levels = len(self.channel_multipliers)
    for level, multiplier in enumerate(self.channel_multipliers):
      width = self.filters * multiplier
      for _ in range(self.num_res_blocks):
        x = ResBlock(width, self.norm_groups, self.norm_epsilon, dtype=self.dtype)(x)
      if level < num_levels - 1:
        x = downsample(x)
    for _ in range(self.num_res_blocks):
      x = ResBlock(width, self.norm_groups, self.norm_epsilon, dtype=self.dtype)(x)
    x = nn.swish(_group_norm(self.norm_groups, self.norm_epsilon, self.dtype)(x))
    return nn.Conv(self.embedding_dim, (1, 1), dtype=self.dtype)(x)


class Decoder(nn.Module):
  """Embeddings [B, h, w, D] -> images [B, h*2^(L-1), w*2^(L-1), output_channels] (raw, not clipped).

  Attributes:
    filters: Base width.
    channel_multipliers: Width multiplier per resolution level (walked from the last to the first).
    num_res_blocks: ResBlocks per level (plus as many again at the lowest resolution).
    output_channels: Image channels (3 for the released model).
    norm_groups: GroupNorm groups.
    norm_epsilon: GroupNorm epsilon.
    dtype: Compute dtype.
  """
  filters: int
  channel_multipliers: tuple[int, ...]
  num_res_blocks: int
  output_channels: int = 3
  norm_groups: int = RELEASED_NORM_GROUPS
  norm_epsilon: float = RELEASED_NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = self.filters * self.channel_multipliers[-1]
    x = nn.Conv(width, (3, 3), dtype=self.dtype)(x)
    for _ in range(self.num_res_blocks):
      x = ResBlock(width, self.norm_groups, self.norm_epsilon, dtype=self.dtype)(x)
    for level in reversed(range(len(self.channel_multipliers))):
      width = self.filters * self.channel_multipliers[level]
      for _ in range(self.num_res_blocks):
        x = ResBlock(width, self.norm_groups, self.norm_epsilon, dtype=self.dtype)(x)
      if level > 0:
        x = nn.Conv(width, (3, 3), dtype=self.dtype)(upsample(x))
    x = nn.swish(_group_norm(self.norm_groups, self.norm_epsilon, self.dtype)(x))
    return nn.Conv(self.output_channels, (3, 3), dtype=self.dtype)(x)


def squared_distances(x: Array, codebook: Array) -> Array:
  """Pairwise squared Euclidean distances [N, K] between rows of x [N, D] and codebook [K, D].

  Uses the expansion |x|^2 - 2 x.c + |c|^2, as the reference does, so that argmin ties break identically.
  """
  x_sq = jnp.sum(x**2, axis=1, keepdims=True)
  code_sq = jnp.sum(codebook**2, axis=1)[None, :]
  return x_sq - 2 * jnp.matmul(x, codebook.T) + code_sq


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry quantizer holding the `codebook` parameter [K, D].

  Attributes:
    codebook_size: Number of codes K.
    embedding_dim: Code vector size D.
    commitment_cost: Weight beta of the commitment loss.
  """
  codebook_size: int
  embedding_dim: int
  commitment_cost: float = 0.25

  def setup(self):
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')  # As the reference.
    self.codebook = self.param('codebook', init, (self.codebook_size, self.embedding_dim))

  def __call__(self, x: Array) -> tuple[Array, dict[str, Array]]:
    """Quantizes x [..., D] (in float32).

    Returns:
      (quantized, aux): quantized has the value of the nearest codes and the straight-through gradient of x
      (`x + stop_gradient(q - x)`); aux holds 'indices' (int32), 'quantizer_loss' (= codebook_loss +
      commitment_cost * commitment_loss), 'codebook_loss', 'commitment_loss' and 'raw' (= x).
    """
    x = x.astype(jnp.float32)
    flat = x.reshape(-1, self.embedding_dim)
    indices = jnp.argmin(squared_distances(flat, self.codebook), axis=-1).astype(jnp.int32)
    indices = indices.reshape(x.shape[:-1])
    q = self.embed(indices)
    codebook_loss = jnp.mean((q - jax.lax.stop_gradient(x))**2)
    commitment_loss = jnp.mean((jax.lax.stop_gradient(q) - x)**2)
    aux = {
        'indices': indices,
        'quantizer_loss': codebook_loss + self.commitment_cost * commitment_loss,
        'codebook_loss': codebook_loss,
        'commitment_loss': commitment_loss,
        'raw': x,
    }
    return x + jax.lax.stop_gradient(q - x), aux

  def embed(self, indices: Array) -> Array:
    """Codebook rows for integer ids [...] -> [..., D]."""
    return jnp.take(self.codebook, indices, axis=0)

  def get_codebook(self) -> Array:
    """The [K, D] codebook."""
    return self.codebook


class VQGAN(nn.Module):
  """The MaskGIT VQGAN tokenizer: encoder, vector quantizer, decoder.

  Defaults are the released ImageNet-256 model (256x256x3 -> 16x16 tokens, K=1024, D=256).

  Attributes:
    filters: Base width (every filters * multiplier must be a multiple of norm_groups).
    channel_multipliers: Width multiplier per resolution level; len-1 downsamplings by 2.
    num_res_blocks: ResBlocks per level.
    embedding_dim: Codebook vector size D.
    codebook_size: Number of codes K.
    output_channels: Decoded image channels (3 released; 1 for the grey MNIST demo).
    commitment_cost: beta of the commitment loss.
    norm_groups: GroupNorm groups (32 released; fewer lets small demo models use narrow layers).
    norm_epsilon: GroupNorm epsilon (1e-6 released). An all-black input (an empty tile) gives feature maps that are
      constant but for the zero-padded borders; a tiny epsilon blows those up to unit variance and the tokenizer's
      training diverges (tiled text-to-image canvases: reconstruction MSE 0.65 after 75 steps at 1e-6, 0.018 after
      50 at 1e-2).
    tiles_per_side: 1 (released): the encoder and decoder see the whole image. n > 1: the image is cut into n x n
      tiles that are encoded (and their token grids decoded) one by one, so each token depends on its tile only,
      not on the rest of the image through the convolutions and GroupNorm statistics (the text-to-image demo's
      2x2 cells: an empty cell then always gets the same tokens). Same parameters either way.
    dtype: Compute dtype of the convolutions (parameters stay float32; quantization runs in float32).
  """
  filters: int = 128
  channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  embedding_dim: int = 256
  codebook_size: int = 1024
  output_channels: int = 3
  commitment_cost: float = 0.25
  norm_groups: int = RELEASED_NORM_GROUPS
  norm_epsilon: float = RELEASED_NORM_EPSILON
  tiles_per_side: int = 1
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.filters, tuple(self.channel_multipliers), self.num_res_blocks,
                           self.embedding_dim, self.norm_groups, self.norm_epsilon, dtype=self.dtype)
    self.decoder = Decoder(self.filters, tuple(self.channel_multipliers), self.num_res_blocks,
                           self.output_channels, self.norm_groups, self.norm_epsilon, dtype=self.dtype)
    self.quantizer = VectorQuantizer(self.codebook_size, self.embedding_dim, self.commitment_cost)

  def encode(self, images: Array) -> tuple[Array, dict[str, Array]]:
    """Images [B, H, W, C] in [0, 1] -> (straight-through quantized [B, h, w, D], aux); see VectorQuantizer."""
    n = self.tiles_per_side
    return self.quantizer(from_tiles(self.encoder(to_tiles(images, n)), n))

  def encode_to_indices(self, images: Array) -> Array:
    """Images [B, H, W, C] in [0, 1] -> token ids [B, h, w] int32."""
    _, aux = self.encode(images)
    return aux['indices']

  def decode(self, embeddings: Array) -> Array:
    """Embeddings [B, h, w, D] -> images [B, H, W, output_channels] (raw decoder output, not clipped)."""
    n = self.tiles_per_side
    return from_tiles(self.decoder(to_tiles(embeddings, n)), n)

  def decode_from_indices(self, ids: Array) -> Array:
    """Token ids [B, h, w] -> images [B, H, W, output_channels]."""
    return self.decode(self.embed(ids))

  def embed(self, ids: Array) -> Array:
    """Codebook lookup: ids [...] -> [..., D]."""
    return self.quantizer.embed(ids)

  def codebook(self) -> Array:
    """The [K, D] codebook."""
    return self.quantizer.get_codebook()

  def __call__(self, images: Array) -> tuple[Array, dict[str, Array]]:
    """Training pass: images -> (reconstruction, aux with 'indices', 'quantizer_loss', ...)."""
    quantized, aux = self.encode(images)
    return self.decode(quantized), aux


def to_tiles(x: Array, n: int) -> Array:
  """[B, H, W, C] -> [B * n * n, H / n, W / n, C]: the n x n tiles of each image, row-major (n = 1: x itself)."""
  if n == 1:
    return x
  b, h, w, c = x.shape
  if h % n or w % n:
    raise ValueError(f'a {h}x{w} grid does not split into {n}x{n} equal tiles.')
  x = x.reshape(b, n, h // n, n, w // n, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * n * n, h // n, w // n, c)


def from_tiles(x: Array, n: int) -> Array:
  """The inverse of `to_tiles`: [B * n * n, h, w, C] -> [B, n * h, n * w, C]."""
  if n == 1:
    return x
  bnn, h, w, c = x.shape
  x = x.reshape(bnn // (n * n), n, n, h, w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(bnn // (n * n), n * h, n * w, c)


def from_config(cfg: ml_collections.ConfigDict, output_channels: int, dtype: Any = jnp.float32) -> VQGAN:
  """Builds a VQGAN from a tokenizer config section (e.g. `configs/demo.py`'s `c.tokenizer`).

  Args:
    cfg: Has filters, channel_multipliers, num_res_blocks, embedding_dim, codebook_size and optionally
      commitment_cost (default 0.25) and norm_groups (default 32, the released value).
    output_channels: Image channels.
    dtype: Compute dtype.

  Returns:
    The (unbound) VQGAN module.
  """
  return VQGAN(
      filters=int(cfg.filters),
      channel_multipliers=tuple(int(m) for m in cfg.channel_multipliers),
      num_res_blocks=int(cfg.num_res_blocks),
      embedding_dim=int(cfg.embedding_dim),
      codebook_size=int(cfg.codebook_size),
      output_channels=int(output_channels),
      commitment_cost=float(cfg.get('commitment_cost', 0.25)),
      norm_groups=int(cfg.get('norm_groups', RELEASED_NORM_GROUPS)),
      norm_epsilon=float(cfg.get('norm_epsilon', RELEASED_NORM_EPSILON)),
      tiles_per_side=int(cfg.get('tiles_per_side', 1)),
      dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Codebook health (pure, jittable).


def code_counts(indices: Array, codebook_size: int) -> Array:
  """How often each code occurs in `indices` (any shape) -> [K] int32."""
  return jnp.zeros((codebook_size,), jnp.int32).at[indices.reshape(-1)].add(1)


def codebook_usage(indices: Array, codebook_size: int) -> Array:
  """Fraction of the K codes that occur at least once in `indices` (float32 scalar in [0, 1])."""
  return jnp.mean((code_counts(indices, codebook_size) > 0).astype(jnp.float32))


def restart_dead_codes(codebook: Array, usage_counts: Array, encoder_outputs: Array, rng: Array) -> Array:
  """Re-seeds every unused code with a random encoder output (dead-code restart).

  Args:
    codebook: [K, D] codebook.
    usage_counts: [K] how often each code was chosen over recent steps (e.g. summed `code_counts`).
      Codes with count 0 are dead.
    encoder_outputs: Encoder latents [..., D] (e.g. `aux['raw']`), flattened to [M, D].
    rng: PRNG key.

  Returns:
    [K, D] codebook where dead rows are replaced by encoder outputs (distinct ones when M >= K) and live
    rows are unchanged.
  """
  num_codes, dim = codebook.shape
  candidates = encoder_outputs.reshape(-1, dim)
  num_candidates = candidates.shape[0]
  if num_candidates >= num_codes:
    picks = jax.random.permutation(rng, num_candidates)[:num_codes]
  else:
    picks = jax.random.randint(rng, (num_codes,), 0, num_candidates)
  replacements = candidates[picks].astype(codebook.dtype)
  dead = (usage_counts == 0)[:, None]
  return jnp.where(dead, jax.lax.stop_gradient(replacements), codebook)


# ---------------------------------------------------------------------------------------------------------------
# Released checkpoints.


def load_released_params(path: str) -> dict[str, Any]:
  """Reads a released-format tokenizer checkpoint (flax msgpack of `{'params': ...}`).

  Args:
    path: The checkpoint file, e.g. `tokenizer_imagenet256_checkpoint` of google-research/maskgit.

  Returns:
    The `params` pytree (nested dicts of numpy arrays).

  Raises:
    UserError: The file is missing, is not a flax msgpack, or holds no 'params'.
  """
  if not os.path.isfile(path):
    raise UserError(f'Tokenizer checkpoint {path!r} not found; download the released MaskGIT '
                    'tokenizer_imagenet256_checkpoint or fix the path.')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    restored = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on corrupt input.
    raise UserError(f'Tokenizer checkpoint {path!r} is not a valid flax msgpack file ({type(e).__name__}); '
                    'expected the released MaskGIT tokenizer format.') from e
  if not isinstance(restored, dict) or 'params' not in restored:
    raise UserError(f"Tokenizer checkpoint {path!r} has no 'params' entry; expected the released MaskGIT "
                    'tokenizer format ({"params": ...}).')
  return restored['params']
