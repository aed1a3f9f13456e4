"""Applying a jitted function to a large array of images in fixed-size batches (on one device, or split over a
mesh)."""

import time

import jax
import numpy as np
from tqdm import tqdm


def pad_rows(x, multiple: int) -> np.ndarray:
  """`x` with rows appended, copies of its last, up to a multiple of `multiple` rows (drop them from the output):
  whole batches or device shards, so every batch runs one compiled program."""
  x = np.asarray(x)
  pad = -len(x) % multiple
  return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x


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


def sample_on_mesh(partitioner, generate, labels: np.ndarray, batch_size: int, rng: jax.Array,
                   desc: str = 'sampling', timed: bool = False):
  """Images of `labels` on every process (numpy): `generate(labels, rng)` on batch `i` of `batch_size` labels with
  key `fold_in(rng, i)`, each batch split over the devices of a `sharding.Partitioner` (`rows`, `gather`).

  With `timed`, returns `(images, images_per_sec)`: the first batch runs (and compiles `generate`) before the clock
  starts, so the rate is that of the compiled sampler on the other batches and no batch is sampled only to warm
  up (a single batch is run once more, timed).
  """
  placed = [partitioner.rows(labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]
  bar = tqdm(total=len(placed), desc=desc, disable=len(placed) < 4 or jax.process_index())
  first = generate(placed[0][0], jax.random.fold_in(rng, 0))
  if timed:
    jax.block_until_ready(first)  # Compiled and run before the clock starts.
  bar.update()
  start = time.perf_counter()
  images = [(first, placed[0][1])]
  for i, (b, n) in enumerate(placed[1:], 1):
    images.append((generate(b, jax.random.fold_in(rng, i)), n))
    bar.update()
  out = np.concatenate([partitioner.gather(x)[:n] for x, n in images])
  seconds = time.perf_counter() - start
  bar.close()
  if not timed:
    return out
  if len(placed) == 1:  # Time one more call of the compiled sampler on the only batch.
    start = time.perf_counter()
    jax.block_until_ready(generate(placed[0][0], jax.random.fold_in(rng, 0)))
    return out, placed[0][1] / (time.perf_counter() - start)
  return out, (len(labels) - placed[0][1]) / seconds
