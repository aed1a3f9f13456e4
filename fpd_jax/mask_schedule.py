"""Mask schedules gamma(r) and random training masks (DESIGN.md §1.1).

gamma maps a ratio r in [0, 1] to the fraction of tokens that stay masked: 1 at r = 0 (all masked), ~0 at r = 1.
Training masks `ceil(gamma(r) * N)` tokens for r ~ U[0, 1); decoding step t of T keeps
`floor(gamma((t + 1) / T) * N)` tokens masked.

Block masking (`block_mask`, the teacher's optional `mask_block_size` / `mask_block_prob`; BEiT-style, not in
MaskGIT or MaskGen): a row masks `ceil(gamma(r) * M)` of the M aligned `b x b` blocks of its token grid, whole, and
nothing else. Token-level masks almost never hide a whole region while its neighbours stay visible (all 16 tokens of
a 4x4 block at ratio 0.5: p = 1.5e-5), which is the situation of decoding once one region is drawn; block masks train
it.
"""

import math

import jax
import jax.numpy as jnp

METHODS = ('cosine', 'linear', 'square', 'cubic', 'arccos')


def gamma(ratio, method: str = 'cosine'):
  """Fraction of tokens masked at progress `ratio`, clipped to [1e-6, 1] like the reference."""
  if method == 'cosine':
    out = jnp.cos(math.pi / 2.0 * ratio)
  elif method == 'linear':
    out = 1.0 - ratio
  elif method == 'square':
    out = 1.0 - ratio ** 2
  elif method == 'cubic':
    out = 1.0 - ratio ** 3
  elif method == 'arccos':  # MaskGen's decoding and Di[M]O's re-masking schedule: arccos(r) / (pi / 2).
    out = jnp.arccos(jnp.clip(ratio, 0.0, 1.0)) / (math.pi / 2.0)
  else:
    raise ValueError(f'Unknown mask schedule {method!r}; choose one of {METHODS}.')
  return jnp.clip(out, 1e-6, 1.0)


def random_mask(rng: jax.Array, batch: int, num_tokens: int, method: str = 'cosine') -> jax.Array:
  """Boolean training mask `[batch, num_tokens]`: `ceil(gamma(r) * N)` random positions per row, r ~ U[0, 1)."""
  r_rng, pos_rng = jax.random.split(rng)
  ratio = jax.random.uniform(r_rng, (batch, 1))
  num_masked = jnp.ceil(gamma(ratio, method) * num_tokens)
  return mask_random_positions(pos_rng, num_masked, (batch, num_tokens))


def block_mask(rng: jax.Array, batch: int, num_tokens: int, block: int, method: str = 'cosine') -> jax.Array:
  """Boolean mask `[batch, num_tokens]` of a square token grid: `ceil(gamma(r) * M)` of its M aligned `block x block`
  blocks masked whole, r ~ U[0, 1); `block` must divide the grid side."""
  grid = math.isqrt(num_tokens)
  if grid * grid != num_tokens or grid % block:
    raise ValueError(f'Block masking needs a square token grid whose side is a multiple of the block: '
                     f'{num_tokens} tokens, block {block}.')
  per_side = grid // block
  r_rng, pos_rng = jax.random.split(rng)
  ratio = jax.random.uniform(r_rng, (batch, 1))
  blocks = mask_random_positions(pos_rng, jnp.ceil(gamma(ratio, method) * per_side ** 2), (batch, per_side ** 2))
  blocks = blocks.reshape(batch, per_side, 1, per_side, 1)
  return jnp.broadcast_to(blocks, (batch, per_side, block, per_side, block)).reshape(batch, num_tokens)


def mask_tokens(rng: jax.Array, tokens: jax.Array, mask_id: int, method: str = 'cosine', block: int = 0,
                block_prob: float = 0.0):
  """Masks `tokens [B, N]` with a `random_mask` of schedule `method`; returns (masked tokens, mask). With
  `block > 0` and `block_prob > 0`, each row takes a `block_mask` instead with probability `block_prob`."""
  if block <= 0 or block_prob <= 0:
    mask = random_mask(rng, *tokens.shape, method=method)
  else:
    rng, block_rng, pick_rng = jax.random.split(rng, 3)
    use_block = jax.random.uniform(pick_rng, (tokens.shape[0], 1)) < block_prob
    mask = jnp.where(use_block, block_mask(block_rng, *tokens.shape, block, method),
                     random_mask(rng, *tokens.shape, method=method))
  return jnp.where(mask, mask_id, tokens), mask


def mask_random_positions(rng: jax.Array, num_masked: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Boolean mask with exactly `num_masked[b]` uniformly chosen positions set in each row."""
  scores = jax.random.uniform(rng, shape)
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return ranks < jnp.broadcast_to(num_masked, (shape[0], 1))
