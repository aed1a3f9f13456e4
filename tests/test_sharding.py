"""Partition rules and mesh sizes (here, on one device), and the multi-device suite on 8 fake CPU devices."""

import os
import subprocess
import sys

import jax
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from configs import demo
from fpd_jax import sharding
from fpd_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = AbstractMesh((2, 4), sharding.AXES)
RULES = tuple(demo.mesh_config().rules)


@pytest.mark.parametrize('name,shape,spec', [
    ('TransformerLayer_3/Mlp_0/intermediate_output/kernel', (768, 3072), P('fsdp', None)),
    ('opt_state/0/mu/TransformerLayer_3/Mlp_0/layer_output/kernel', (3072, 768), P(None, 'fsdp')),
    ('TransformerLayer_0/Attention_0/self_attention/query/kernel', (768, 16, 48), P('fsdp', None, None)),
    ('Embed_0/word_embeddings/embedding', (2025, 768), P(None, 'fsdp')),
    ('decoder/ResBlock_0/Conv_0/kernel', (3, 3, 512, 512), P(None, None, None, 'fsdp')),
    ('TransformerLayer_0/Mlp_0/layer_output/bias', (768,), P()),
    ('MlmLayer_0/mlm_dense/kernel', (30, 768), P(None, None)),  # 30 rows: not divisible by 4, replicated.
])
def test_partition_rules(name, shape, spec):
  assert sharding.spec_for(name, shape, RULES, MESH) == spec


def test_mesh_shape_resolves_minus_one_and_names_bad_sizes():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 4}, 8) == (2, 4)
  assert sharding.mesh_shape({'data': 1, 'fsdp': -1}, 8) == (1, 8)
  with pytest.raises(UserError, match='needs 6 devices but 8'):
    sharding.mesh_shape({'data': 2, 'fsdp': 3}, 8)
  with pytest.raises(UserError, match='at most one axis'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 8)


def test_bad_rule_regex_is_a_user_error():
  config = ml_collections.ConfigDict({'mesh': {'data': -1, 'fsdp': 1, 'rules': (('(unclosed', ('fsdp',)),)}})
  with pytest.raises(UserError, match='bad regular expression'):
    sharding.Partitioner.from_config(config)


def test_single_device_partitioner_places_batches_and_states():
  partitioner = sharding.Partitioner.from_config(demo.get_config('tiny'))
  assert partitioner.data_parallel == jax.device_count()
  batch = partitioner.batch({'x': np.ones((4, 3), np.float32)})['x']
  assert batch.shape == (4, 3) and batch.sharding.spec == P(sharding.BATCH_AXES)


def _multidevice_suite(*select: str) -> None:
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-o', 'addopts=', *select,
                         'tests/multidevice'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert ' passed' in proc.stdout and 'skipped' not in proc.stdout, proc.stdout[-2000:]


def test_multidevice_suite_on_8_fake_devices():
  """Runs tests/multidevice but its slow tests on 8 fake devices: the core checks, an FPD step on a 2x4 mesh equals
  the 1-device step (and shards the student's parameters and Adam states as the rules say), and images sampled on 8
  devices equal those of one device (and rows padded to the device count gather back)."""
  _multidevice_suite('-m', 'not slow')


@pytest.mark.slow  # Minutes on 2 cores: the tiny pipeline, evaluate stage and sample CLI on 8 fake devices, and
# checkpoint restore across meshes, sampling on 3 devices and Inception activations on 8 devices.
def test_whole_multidevice_suite_on_8_fake_devices():
  _multidevice_suite()


_COUNT_DEVICES = ('import sys; from fpd_jax import stages; import jax; '
                  '{before}stages.use_cpu_devices(int(sys.argv[1])); print(jax.device_count())')


@pytest.mark.parametrize('count,xla_flags,jax_ran_first,expected', [
    (3, '', False, 3),  # A fresh process is split.
    (0, '', False, 1),  # 0 keeps JAX's default.
    (3, '--xla_force_host_platform_device_count=5', False, 5),  # launch/local.sh --fake-devices wins.
    (3, '', True, 1),  # JAX already ran (e.g. a test process): left as it is, no error.
])
def test_use_cpu_devices_splits_a_fresh_cpu_host(count, xla_flags, jax_ran_first, expected):
  code = _COUNT_DEVICES.format(before='jax.numpy.zeros(1).block_until_ready(); ' if jax_ran_first else '')
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', code, str(count)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-1] == str(expected)
