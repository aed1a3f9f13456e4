"""Image datasets from TFDS in array_record format (e.g. `imagenet2012`, manual download): real images for the
optional GAN and for FID reference statistics.

TFDS decodes `tfds.features.Image` with TensorFlow, which this project does not install, so image features are
read with `SkipDecoding` (the encoded JPEG/PNG bytes) and decoded here with Pillow; datasets storing pixels as
`tfds.features.Tensor` (the demo's MNIST) are read as they are. Images are resized and center-cropped the way the
ADM evaluation suite prepares reference images (`center_crop_resize`). Preparing a dataset is the user's one-time
step (the error message names it).
"""

import functools
import io

import grain
import numpy as np

from fpd_jax import sharding
from fpd_jax.errors import UserError

IMAGENET = 'imagenet2012'


def data_source(name: str, split: str, data_dir: str | None = None):
  """Random-access records `{'image': encoded bytes or uint8 pixels, 'label': int, ...}` of a prepared TFDS split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Slow import, only when used.
  manual = ''
  if name.split(':')[0] == IMAGENET:
    manual = (' ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
              '~/tensorflow_datasets/downloads/manual/, then')
  build = f'tfds build {name} --file_format=array_record' + (f' --data_dir={data_dir}' if data_dir else '')
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
    image = builder.info.features['image'] if 'image' in builder.info.features else None
    decoders = {'image': tfds.decode.SkipDecoding()} if isinstance(image, tfds.features.Image) else None
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False, decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises several types for "not prepared".
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise UserError(f'TFDS dataset {name} split {split!r} is not available as array_record ({type(e).__name__}: '
                    f'{first}).{manual} run `{build}` (or set the TFDS data_dir where it was built).') from e


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's reference preprocessing of one uint8 image [H, W, C] to [size, size, C].

  While the short side is at least 2 x size, halve the image with a box filter; then resize (bicubic) so that the
  short side is `size`; then take the central size x size crop.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top  # Pillow only where images are decoded.
  grey = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if grey else image)
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(s // 2 for s in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(s * scale) for s in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  arr = arr[top:top + size, left:left + size]
  return arr[..., None] if grey else arr


def decode_image(data, size: int | None = None) -> np.ndarray:
  """Encoded image bytes (JPEG/PNG, decoded to RGB) or uint8 pixels -> uint8 [H, W, C]; ADM-cropped to
  [size, size, C] when `size` is given and differs."""
  if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim in (2, 3):
    image = data if data.ndim == 3 else data[..., None]
  else:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    raw = data.item() if isinstance(data, np.ndarray) else data
    image = np.asarray(Image.open(io.BytesIO(raw)).convert('RGB'))
  if size is None or image.shape[:2] == (size, size):
    return image
  return center_crop_resize(image, size)


class _Decode(grain.transforms.Map):
  """A record -> {'image': float32 [size, size, C] in [0, 1], 'label': int32}."""

  def __init__(self, size: int):
    self.size = size

  def map(self, record):
    image = decode_image(record['image'], self.size).astype(np.float32) / 255.0
    return {'image': image, 'label': np.int32(record['label'])}


def batch_dataset(source, batch_size: int, seed: int, size: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
  """Shuffled, repeated, decoded batches; `ds[step]` is this host's rows of the batch of step `step` (random
  access: exact resume).

  Unlike the MNIST pipeline nothing is read into memory: the global batch of a step is a list of record indices
  (a function of `seed` and the step only), and host `i` of `shard_count` reads and decodes only its rows of it,
  `[i * B/n, (i + 1) * B/n)` (`sharding.host_rows`), so any number of hosts trains on the same batches.
  """
  if batch_size % shard_count:
    raise UserError(f'batch size {batch_size} is not divisible by the {shard_count} hosts; use a multiple.')
  shuffle_seed = int(np.random.SeedSequence([seed, 0x494E]).generate_state(1)[0])
  ds = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed).repeat().batch(batch_size, drop_remainder=True)
  decode = _Decode(size)

  def read(indices):
    records = [decode.map(source[int(i)]) for i in indices]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}
  return ds.map(functools.partial(sharding.host_rows, index=shard_index, count=shard_count)).map(read)
