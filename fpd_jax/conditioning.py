"""The conditioning interface: how a condition enters the transformer's sequence.

Trainers, the sampler and the FPD step only call the four methods of `Conditioner` (plus `num_cond_tokens` and
`prefix_length`), never assume what a condition is. Today's implementation is `ClassConditioner` (one class token
`label + K` in front of the image tokens, as the released MaskGIT); a text conditioner will plug in here.

A condition is a pytree whose leaves have the batch as leading axis (for classes: int32 labels `[B]`).
"""

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp


class Conditioner(Protocol):
  """What the rest of the code may assume about a condition."""
  num_cond_tokens: int  # Vocabulary ids reserved for conditions (between codebook ids and the mask id).
  prefix_length: int  # Sequence positions in front of the image tokens.

  def sequence(self, cond: Any, tokens: jax.Array) -> jax.Array:
    """Full transformer input ids `[B, prefix_length + N]`."""

  def null(self, cond: Any) -> Any:
    """The unconditional ("null") condition with the same batch shape (for CFG)."""

  def drop(self, cond: Any, rng: jax.Array, p: float) -> Any:
    """Replaces each example's condition by the null one with probability p (CFG training)."""

  def group_key(self, cond: Any) -> jax.Array:
    """An int per example; examples with equal keys share a condition (drift-loss groups)."""


@dataclasses.dataclass(frozen=True)
class ClassConditioner:
  """Class-conditional: the class token id is `label + codebook_size`; the null class is `num_classes`.

  Attributes:
    codebook_size: K, the number of image-token ids before the class ids.
    num_classes: real classes; ids `K .. K+num_classes-1`.
    with_null_class: reserve one more id (`K + num_classes`) for the null class used by CFG. The released
      ImageNet MaskGIT has none (its vocabulary is K + 1000 + 1), so CFG is unavailable there.
  """
  codebook_size: int
  num_classes: int
  with_null_class: bool = True
  prefix_length: int = 1

  @property
  def num_cond_tokens(self) -> int:
    return self.num_classes + int(self.with_null_class)

  def sequence(self, cond: jax.Array, tokens: jax.Array) -> jax.Array:
    class_ids = cond.astype(jnp.int32)[:, None] + self.codebook_size
    return jnp.concatenate([class_ids, tokens.astype(jnp.int32)], axis=1)

  def null(self, cond: jax.Array) -> jax.Array:
    if not self.with_null_class:
      raise ValueError('This model has no null class, so classifier-free guidance is unavailable; '
                       'set the CFG scale to 0.')
    return jnp.full_like(cond, self.num_classes)

  def drop(self, cond: jax.Array, rng: jax.Array, p: float) -> jax.Array:
    if p == 0:
      return cond
    return jnp.where(jax.random.bernoulli(rng, p, cond.shape), self.null(cond), cond)

  def group_key(self, cond: jax.Array) -> jax.Array:
    return cond.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TextConditioner:
  """Text-conditional (MaskGen): a condition is the caption's token ids `[B, L]` int32 (`fpd_jax.data.captions`).

  The captions enter the generator as a separate stream (`fpd_jax.models.maskgen`), not as prefix ids, so
  `sequence` is the image tokens alone. The null condition is the empty caption `<bos> <eos>` (text CFG); `drop`
  replaces whole captions by it (caption dropout); `group_key` hashes each caption's ids (equal captions, equal keys).

  Attributes:
    bos_id, eos_id: ids of `<bos>` and `<eos>` (`<pad>` is 0).
  """
  bos_id: int
  eos_id: int
  num_cond_tokens: int = 0
  prefix_length: int = 0

  def sequence(self, cond: jax.Array, tokens: jax.Array) -> jax.Array:
    del cond
    return tokens.astype(jnp.int32)

  def null(self, cond: jax.Array) -> jax.Array:
    row = jnp.zeros(cond.shape[1:], jnp.int32).at[0].set(self.bos_id).at[1].set(self.eos_id)
    return jnp.broadcast_to(row, cond.shape)

  def drop(self, cond: jax.Array, rng: jax.Array, p: float) -> jax.Array:
    if p == 0:
      return cond
    return jnp.where(jax.random.bernoulli(rng, p, cond.shape[:1])[:, None], self.null(cond), cond)

  def group_key(self, cond: jax.Array) -> jax.Array:
    """A polynomial hash of the ids (mod 2^31 - 1); distinct demo captions do not collide (tested)."""
    key = jnp.zeros(cond.shape[:1], jnp.int32)
    for i in range(cond.shape[1]):
      key = (key * 131 + cond[:, i].astype(jnp.int32) + 1) % 2147483647
    return key
