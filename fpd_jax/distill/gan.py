"""The optional unconditional GAN of FPD (DESIGN.md §1.3 step 7): discriminator and losses.

The discriminator sees decoded student images (fake) and real images, no condition. The generator's gradient
reaches the student logits through the frozen decoder and the straight-through lift.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fpd_jax.models import classifier

LOSSES = ('hinge', 'nonsat')


class Discriminator(nn.Module):
  """A small ConvNet with one output logit per image (real > 0)."""
  widths: tuple[int, ...] = (16, 32, 64)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    net = classifier.ConvNet(widths=tuple(self.widths), feature_dim=self.widths[-1], num_classes=1,
                             convs_per_stage=1, name='net')
    return net(images)[:, 0]


def _check(kind: str) -> None:
  if kind not in LOSSES:
    raise ValueError(f'Unknown distill.gan.loss {kind!r}; choose one of {LOSSES}.')


def generator_loss(fake_logits: jax.Array, kind: str) -> jax.Array:
  """Generator loss on the discriminator's logits of fake images."""
  _check(kind)
  if kind == 'hinge':
    return -jnp.mean(fake_logits)
  return jnp.mean(jax.nn.softplus(-fake_logits))  # Non-saturating: -log sigmoid(D(fake)).


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
  """Discriminator loss: real images high, fake images low."""
  _check(kind)
  if kind == 'hinge':
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
