"""Sampling and evaluation spread over 8 fake CPU devices give the numbers of one device (run through
tests/test_sharding.py, which sets XLA_FLAGS=--xla_force_host_platform_device_count=8 for a pytest subprocess)."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from configs import demo
from fpd_jax import batching
from fpd_jax import sampling
from fpd_jax import sharding
from fpd_jax.eval import fid
from fpd_jax.models import build
from fpd_jax.models import inception

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if jax.device_count() < 8:
  pytest.skip('needs 8 devices: run through tests/test_sharding.py (sets the fake-device XLA flag)',
              allow_module_level=True)


def _partitioner(num_devices: int) -> sharding.Partitioner:
  return sharding.Partitioner.from_config({}, jax.devices()[:num_devices])


@pytest.fixture(scope='module')
def generators(tiny_fpd):
  """Tiny teacher (2-step) and one-step student image samplers with random weights: `make(partitioner)`."""
  config = demo.get_config('tiny')
  models, frozen, _ = tiny_fpd(config)
  grid = build.token_grid(config)
  teacher_sample = sampling.teacher_image_sampler(models.teacher, models.tokenizer, grid, config)
  teacher = lambda *args: teacher_sample(*args, 2)
  student = sampling.student_image_sampler(models.teacher, models.tokenizer, grid, config.distill)
  host = jax.device_get((frozen['teacher'], frozen['tokenizer']))

  def make(partitioner):
    params, tokenizer_params = partitioner.replicate(host)
    return {name: (lambda labels, rng, fn=fn: fn(params, tokenizer_params, labels, rng))
            for name, fn in (('teacher', teacher), ('student', student))}
  return make


# 3 devices (batches that do not divide the devices) compile the samplers again (~14 s on 2 cores): the slow suite.
@pytest.mark.parametrize('num_devices', [8, pytest.param(3, marks=pytest.mark.slow)])
def test_sampled_images_equal_one_device(generators, num_devices):
  """13 labels in batches of 6 (6, 6, 1): padded to multiples of 8 (or 3), the padding dropped."""
  labels = np.arange(13, dtype=np.int32) % 10
  rng = jax.random.key(4)
  for name, generate in generators(_partitioner(1)).items():
    single = batching.sample_on_mesh(_partitioner(1), generate, labels, 6, rng)
    spread = batching.sample_on_mesh(_partitioner(num_devices), generators(_partitioner(num_devices))[name], labels,
                                    6, rng)
    assert single.shape == spread.shape == (13, 28, 28, 1), name
    chex.assert_trees_all_close(spread, single, atol=1e-5)


def test_rows_pads_to_the_device_count_and_gather_returns_every_row():
  partitioner = _partitioner(8)
  placed, n = partitioner.rows({'label': np.arange(13, dtype=np.int32)})
  assert n == 13 and placed['label'].shape == (16,) and len(placed['label'].sharding.device_set) == 8
  np.testing.assert_array_equal(partitioner.gather(placed)['label'], np.r_[np.arange(13), [12, 12, 12]])


@pytest.mark.slow  # Compiles InceptionV3 for one and for 8 devices (~26 s on 2 cores): the slow suite.
def test_inception_activations_on_8_devices_equal_one_device():
  params = inception.load_params()
  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
  single = fid.InceptionMetrics(params, batch_size=4).activations(images)
  spread = fid.InceptionMetrics(params, batch_size=4, partitioner=_partitioner(8)).activations(images)
  assert spread['pool'].shape == (5, 2048)
  chex.assert_trees_all_close(spread, single, atol=1e-4, rtol=1e-4)


def _run(*args, devices: int, timeout: int = 600):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def tiny_run_2x4(tmp_path_factory):
  """The tiny pipeline on a 2x4 mesh of the 8 fake devices (teacher rows: 2 steps)."""
  workdir = tmp_path_factory.mktemp('tiny2x4') / 'run'
  _run('fpd_jax.main', '--config=configs/demo.py:tiny', f'--workdir={workdir}', '--config.mesh.data=2',
       '--config.mesh.fsdp=4', '--config.evaluate.teacher_steps=(2,)', devices=8, timeout=900)
  return workdir


@pytest.mark.slow  # A whole tiny pipeline on 8 fake devices (minutes on 2 cores).
def test_tiny_pipeline_on_a_2x4_mesh(tiny_run_2x4):
  report = json.loads((tiny_run_2x4 / 'report.json').read_text())
  assert {'teacher_2step', 'student_1step'} <= set(report['models'])
  assert all(np.isfinite(row['fd']) for row in report['models'].values())


def _model_rows(workdir) -> dict:
  rows = json.loads((workdir / 'report.json').read_text())['models']
  return {name: {k: v for k, v in row.items() if k != 'images_per_sec'} for name, row in rows.items()}


@pytest.mark.slow  # A whole tiny pipeline on 8 fake devices (minutes on 2 cores).
def test_evaluate_stage_on_8_devices_equals_one_device(tiny_run_2x4):
  """The evaluate stage rerun on one device gives the report rows the 8-device run wrote."""
  spread = _model_rows(tiny_run_2x4)
  os.remove(tiny_run_2x4 / 'evaluate' / 'done.json')
  _run('fpd_jax.main', '--config=configs/demo.py:tiny', f'--workdir={tiny_run_2x4}',
       '--config.evaluate.teacher_steps=(2,)', devices=1)
  single = _model_rows(tiny_run_2x4)
  assert set(single) == {'teacher_2step', 'student_1step'}
  chex.assert_trees_all_close(spread, single, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # A whole tiny pipeline on 8 fake devices (minutes on 2 cores).
def test_sample_cli_on_8_devices_equals_one_device(tiny_run_2x4, tmp_path):
  """13 images in batches of 6: the batches of 6 and 1 do not divide 8 devices (padded, padding dropped)."""
  files = {}
  for devices in (8, 1):
    files[devices] = tmp_path / f'd{devices}.npz'
    _run('fpd_jax.sample', f'--workdir={tiny_run_2x4}', '--model=teacher', '--steps=2', '--num=13',
         '--batch_size=6', f'--out={files[devices]}', devices=devices)
  spread, single = np.load(files[8]), np.load(files[1])
  np.testing.assert_array_equal(spread['labels'], single['labels'])
  np.testing.assert_array_equal(spread['images'], single['images'])
