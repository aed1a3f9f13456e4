"""Mask schedules gamma(r) and random training masks (DESIGN.md §1.1).

gamma maps a ratio r in [0, 1] to the fraction of tokens that stay masked: 1 at r = 0 (all masked), ~0 at r = 1.
Training masks `ceil(gamma(r) * N)` tokens for r ~ U[0, 1); decoding step t of T keeps
`floor(gamma((t + 1) / T) * N)` tokens masked.
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


def mask_tokens(rng: jax.Array, tokens: jax.Array, mask_id: int, method: str = 'cosine'):
  """Masks `tokens [B, N]` with a `random_mask` of schedule `method`; returns (masked tokens, mask)."""
  mask = random_mask(rng, *tokens.shape, method=method)
  return jnp.where(mask, mask_id, tokens), mask


def mask_random_positions(rng: jax.Array, num_masked: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Boolean mask with exactly `num_masked[b]` uniformly chosen positions set in each row."""
  scores = jax.random.uniform(rng, shape)
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return ranks < jnp.broadcast_to(num_masked, (shape[0], 1))
