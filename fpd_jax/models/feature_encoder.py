"""Frozen feature encoders phi for the drift loss: images -> a list of per-layer feature vectors.

Pluggable: anything with `__call__(params, images) -> list of [B, S_j]` works (the ImageNet config will plug DINO
in here). Two encoders ship:

- `ConvNetFeatures`: taps stages of a trained `classifier.ConvNet` (the demo's `feature_net` stage, a network of
  another architecture and seed than the evaluation network) and pools each to a small grid (DESIGN.md §1.3
  step 5: several layers, each pooled to e.g. 4x4).
- `PixelFeatures`: the pixels themselves, pooled to a grid (the "drift in pixel space" ablation).
"""

import dataclasses

import jax

from fpd_jax.models import classifier


def pool_to_grid(x: jax.Array, grid: int) -> jax.Array:
  """Average-pools `[B, H, W, C]` to `[B, grid, grid, C]` (exact block means when grid divides H, W)."""
  b, h, w, c = x.shape
  if h % grid == 0 and w % grid == 0:
    return x.reshape(b, grid, h // grid, grid, w // grid, c).mean(axis=(2, 4))
  return jax.image.resize(x, (b, grid, grid, c), method='linear', antialias=True)


@dataclasses.dataclass(frozen=True)
class ConvNetFeatures:
  """Features of chosen stages of a ConvNet, each pooled to `grid` x `grid` and flattened.

  Attributes:
    net: the (trained, frozen) classifier.
    layers: stage indices to tap; the index `len(net.widths)` means the penultimate feature vector.
    grid: pooled spatial size of each tapped stage.
  """
  net: classifier.ConvNet
  layers: tuple[int, ...]
  grid: int

  def __call__(self, params, images: jax.Array) -> list[jax.Array]:
    _, features, maps = self.net.apply({'params': params}, images, return_features=True, return_layers=True)
    taps = list(maps) + [features]
    out = []
    for j in self.layers:
      tap = taps[j]
      if tap.ndim == 4:
        tap = pool_to_grid(tap, self.grid)
      out.append(tap.reshape(tap.shape[0], -1))
    return out


@dataclasses.dataclass(frozen=True)
class PixelFeatures:
  """The image itself, pooled to `grid` x `grid` (no network: the pixel-space ablation)."""
  grid: int

  def __call__(self, params, images: jax.Array) -> list[jax.Array]:
    del params
    return [pool_to_grid(images, self.grid).reshape(images.shape[0], -1)]
