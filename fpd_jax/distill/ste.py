"""The straight-through lift from student logits to codebook embeddings (DESIGN.md §1.3 step 4).

The student's one-step draft is a hard token grid ẑ (sampled from its logits ℓ), which has no gradient. To train
the student through the frozen decoder and feature encoder, the draft is lifted to codebook embeddings with a
straight-through estimator:

  e = E[ẑ] + (p·E − stop_gradient(p·E)),   p = softmax(ℓ).

The forward value is exactly the hard embedding E[ẑ] (the correction term is `b − b = 0` bitwise), so the decoder
sees the very tokens the student would emit at inference; the backward pass differentiates the soft mixture p·E,
so the gradient reaches ℓ. Feeding the soft mixture p·E forward instead ("soft embedding") is the paper's
ablation (GenEval 0.38 vs 0.43 for STE) and is kept as `mode='soft'`.
"""

import jax
import jax.numpy as jnp

LIFT_MODES = ('ste', 'soft')


def _check_shapes(logits: jax.Array, codebook: jax.Array) -> None:
  """Raises ValueError unless `logits [..., K]` matches `codebook [K, D]`."""
  if codebook.ndim != 2:
    raise ValueError(f'codebook must be [K, D], got shape {codebook.shape}.')
  if logits.shape[-1] != codebook.shape[0]:
    raise ValueError(
        f'logits have {logits.shape[-1]} classes but the codebook has {codebook.shape[0]} entries; '
        'slice the logits to the first K (codebook) entries.')


@jax.jit
def soft_embed(logits: jax.Array, codebook: jax.Array) -> jax.Array:
  """The soft embedding p·E with p = softmax(logits) (the ablation; also the STE's backward path).

  Args:
    logits: Student logits over the codebook, `[B, N, K]` (any leading shape).
    codebook: Codebook embeddings `E`, `[K, D]`.

  Returns:
    `[B, N, D]` float32 expected embeddings under the student's token distribution.
  """
  _check_shapes(logits, codebook)
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.einsum('...k,kd->...d', p, codebook.astype(jnp.float32))


@jax.jit
def straight_through_embed(logits: jax.Array, tokens: jax.Array, codebook: jax.Array) -> jax.Array:
  """Hard embedding E[tokens] in the forward pass, gradient of the soft embedding p·E in the backward pass.

  Args:
    logits: Student logits over the codebook, `[B, N, K]` (any leading shape).
    tokens: The hard draft ẑ, integer `[B, N]` in `[0, K)` (same leading shape as `logits`).
    codebook: Codebook embeddings `E`, `[K, D]` (frozen tokenizer's).

  Returns:
    `[B, N, D]` embeddings in the codebook's dtype whose value is bitwise `codebook[tokens]` and whose
    gradient w.r.t. `logits` equals that of `soft_embed(logits, codebook)`.
  """
  _check_shapes(logits, codebook)
  if tokens.shape != logits.shape[:-1]:
    raise ValueError(f'tokens shape {tokens.shape} must equal the logits shape without K, {logits.shape[:-1]}.')
  hard = jnp.take(codebook, tokens, axis=0)
  soft = soft_embed(logits, codebook)
  # Forward: soft − soft is exactly 0 (same value, finite), so `hard + 0` is bitwise `hard`.
  correction = (soft - jax.lax.stop_gradient(soft)).astype(hard.dtype)
  return hard + correction


def lift(logits: jax.Array, tokens: jax.Array, codebook: jax.Array, mode: str = 'ste') -> jax.Array:
  """Lifts the student's draft to codebook embeddings for the decoder.

  Args:
    logits: Student logits over the codebook, `[B, N, K]`.
    tokens: The hard draft ẑ, integer `[B, N]` (ignored by `mode='soft'`).
    codebook: Codebook embeddings `E`, `[K, D]`.
    mode: `'ste'` (the method: straight-through, `straight_through_embed`) or `'soft'` (the ablation:
      `soft_embed`).

  Returns:
    `[B, N, D]` embeddings.

  Raises:
    ValueError: For any other `mode`.
  """
  if mode == 'ste':
    return straight_through_embed(logits, tokens, codebook)
  if mode == 'soft':
    return soft_embed(logits, codebook)
  raise ValueError(f'Unknown lift mode {mode!r}; expected one of {LIFT_MODES}.')
