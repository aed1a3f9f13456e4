"""A small convolutional classifier for 28x28 grey images (DESIGN.md §3).

It serves two roles:
  * the evaluation network: trained on the real train split, its penultimate `features` are the space in which
    Fréchet distance and precision/recall are measured, and its logits give the class accuracy of samples;
  * a feature encoder for the drift loss (with its own architecture options and seed): `return_layers=True`
    exposes the feature map of every stage so several layers can be tapped.

GroupNorm is used (never BatchNorm), so the parameters are one plain pytree with no mutable collections and the
forward pass is the same in training and evaluation.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ('group', 'layer', 'none')


def num_groups(width: int, max_groups: int = 8) -> int:
  """Returns the largest group count <= `max_groups` that divides `width` (GroupNorm needs a divisor)."""
  for g in range(min(max_groups, width), 0, -1):
    if width % g == 0:
      return g
  return 1


def _norm(kind: str, width: int, name: str) -> nn.Module | None:
  """Builds the normalisation layer named by `kind` for `width` channels (None for 'none')."""
  if kind == 'group':
    return nn.GroupNorm(num_groups=num_groups(width), name=name)
  if kind == 'layer':
    return nn.LayerNorm(name=name)
  if kind == 'none':
    return None
  raise ValueError(f'Unknown norm {kind!r}; expected one of {NORMS}.')


class ConvNet(nn.Module):
  """A CNN classifier: stages of (conv3x3 -> norm -> swish) x convs_per_stage -> 2x2 avg pool, then an MLP head.

  With `widths=(32, 64, 128)` the resolution goes 28 -> 14 -> 7 -> 3; the last map is global-average pooled,
  projected to `feature_dim` (followed by swish: these are the "features"), then to `num_classes` logits.

  Attributes:
    widths: Conv channels of each stage; each stage halves the resolution (floor).
    feature_dim: Size of the penultimate feature vector.
    num_classes: Number of output logits.
    norm: 'group' (GroupNorm with `num_groups(width)` groups), 'layer' or 'none'.
    convs_per_stage: conv -> norm -> swish blocks per stage (2 in the evaluation network).
  """
  widths: Sequence[int] = (32, 64, 128)
  feature_dim: int = 128
  num_classes: int = 10
  norm: str = 'group'
  convs_per_stage: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False,
               return_layers: bool = False):
    """Classifies a batch of images.

    Args:
      x: Images [B, H, W, C] with values in [0, 1] (rescaled internally to [-1, 1]).
      train: Training mode. Unused today (no dropout or batch statistics); kept so call sites need not change
        if a stochastic layer is added.
      return_features: Also return the penultimate features [B, feature_dim].
      return_layers: Also return the list of per-stage feature maps: entry i is the activation of stage i
        after its last conv/norm/swish and before its pooling, shape [B, H_i, W_i, widths[i]] with
        H_0 = H, H_{i+1} = H_i // 2 (28, 14, 7 for three stages on 28x28 inputs).

    Returns:
      `logits` [B, num_classes] when no flag is set; otherwise a tuple that starts with `logits` and is followed,
      in this order, by `features` (if `return_features`) and `layers` (if `return_layers`).
    """
    del train  # No stochastic layers.
    h = x.astype(jnp.float32) * 2.0 - 1.0
    layers = []
    for i, width in enumerate(self.widths):
      for j in range(self.convs_per_stage):
        h = nn.Conv(width, (3, 3), padding='SAME', name=f'stage{i}_conv{j}')(h)
        norm = _norm(self.norm, width, name=f'stage{i}_norm{j}')
        if norm is not None:
          h = norm(h)
        h = nn.swish(h)
      layers.append(h)
      h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding='VALID')
    h = jnp.mean(h, axis=(1, 2))
    features = nn.swish(nn.Dense(self.feature_dim, name='feature_proj')(h))
    logits = nn.Dense(self.num_classes, name='head')(features)
    if not return_features and not return_layers:
      return logits
    out = (logits,)
    if return_features:
      out += (features,)
    if return_layers:
      out += (layers,)
    return out


def augment(rng: jax.Array, images: jax.Array, max_shift: int = 2) -> jax.Array:
  """Randomly translates each image by up to `max_shift` pixels in each direction (zero fill).

  Args:
    rng: PRNG key.
    images: [B, H, W, C] images (background 0, as MNIST in [0, 1]).
    max_shift: Largest shift in pixels, per axis; shifts are uniform in [-max_shift, max_shift].

  Returns:
    Shifted images with the same shape and dtype.
  """
  if max_shift <= 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)
