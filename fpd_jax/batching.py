"""Applying a jitted function to a large array of images in fixed-size batches."""

import jax
import numpy as np


def as_float_images(images) -> np.ndarray:
  """uint8 images in 0..255 -> float32 in [0, 1]; float images pass through."""
  images = np.asarray(images)
  return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images


def map_batches(fn, images, batch_size: int = 500):
  """`fn` over `images` in batches of `batch_size` (uint8 converted to [0,1] floats); outputs concatenated.

  `fn` may return any pytree of arrays with the batch as leading axis.
  """
  outs = [jax.device_get(fn(as_float_images(images[i:i + batch_size])))
          for i in range(0, len(images), batch_size)]
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
