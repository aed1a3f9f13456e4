"""Softmax attention of the transformers (MaskGIT, DINO): the one place that picks the kernel.

`jax.nn.dot_product_attention` with its default `implementation=None` runs XLA's unfused version on every backend
(this JAX's default; it does not pick cuDNN by itself), so the fused flash-attention kernel has to be asked for.
"""

from absl import logging
import jax
import jax.numpy as jnp

FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's flash attention takes these (not float32).


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v for `[B, T, heads, head_dim]` queries, keys and values.

  On a GPU backend with bf16/fp16 inputs: cuDNN's fused flash attention, unless cuDNN is missing or refuses the
  shapes (then a warning and XLA's). Everywhere else (CPU, TPU, float32): XLA's, which keeps float32 results
  exactly those of the unfused formula.
  """
  if q.dtype in FUSED_DTYPES and jax.default_backend() == 'gpu':
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
    except (NotImplementedError, RuntimeError, ValueError) as e:  # Raised while tracing: no cuDNN, shapes.
      logging.warning('cuDNN attention unavailable for q %s %s (%s); using XLA attention.', q.shape, q.dtype, e)
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')
