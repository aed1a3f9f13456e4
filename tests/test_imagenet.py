"""configs/imagenet.py: the smoke variant runs FPD steps on the CPU; shapes, reports and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import imagenet
from fpd_jax import sharding
from fpd_jax import stages
from fpd_jax.errors import UserError
from fpd_jax.tools import compile_report
from fpd_jax.train import distill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # Compiles the ImageNet-shaped FPD step, samplers and Inception: minutes on 2 cores.
def test_smoke_config_runs_fpd_steps_on_cpu_and_reports_fid(tmp_path):
  """The smoke variant (tiny shapes, random weights): 3 FPD steps, then Inception FID against an images .npz."""
  workdir = tmp_path / 'smoke'
  reference = tmp_path / 'reference.npz'
  np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
  proc = subprocess.run([sys.executable, '-m', 'fpd_jax.main', '--config=configs/imagenet.py:smoke',
                         f'--workdir={workdir}', "--config.stages=('distill','evaluate')",
                         f'--config.evaluate.reference={reference}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / 'report.json').read_text())
  assert set(report['models']) == {'teacher_2step', 'student_1step'}
  for row in report['models'].values():
    assert row['fid'] > 0 and np.isfinite(row['fid']) and row['num_samples'] == 16
  assert report['reference']['num_images'] == 12
  assert '| fid |' in (workdir / 'report.md').read_text()
  assert (workdir / 'samples' / 'student_1step.png').exists()
  rows = [json.loads(line) for line in (workdir / 'distill' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r['loss']) and r['loss'] > 0 for r in rows)
  assert {'drift_0', 'drift_1', 'fixed_point_gap', 'grad_norm'} <= set(rows[0])  # Two DINO taps.
  assert (workdir / 'distill' / 'export').is_dir() and (workdir / 'distill' / 'done.json').exists()


def test_default_config_validates_and_names_missing_imports(tmp_path):
  config = imagenet.get_config()
  stages.validate(config)
  assert distill.batch_size(config.distill) == 32
  config.distill.compute_dtype = 'bf16'
  with pytest.raises(UserError, match='compute_dtype'):
    stages.validate(config)
  config.distill.compute_dtype = 'bfloat16'
  config.teacher.pretrained = str(tmp_path / 'nothing')
  with pytest.raises(UserError, match='import_maskgit'):
    distill.load_frozen_params(config, str(tmp_path))


def test_remote_workdir_is_refused_with_the_fix():
  with pytest.raises(UserError, match='gcsfuse'):
    stages.run_pipeline(imagenet.get_config('smoke'), 'gs://bucket/run')


@pytest.mark.slow  # Compiles the smoke FPD step for its memory plan (~20 s on 2 cores): the slow suite.
def test_compile_report_of_the_smoke_step():
  config = distill.with_random_weights(imagenet.get_config('smoke'))
  partitioner = sharding.Partitioner.from_config(config)
  row = compile_report.compile_step(config, 8, partitioner)
  assert row['flops_per_step'] > 0 and row['temporaries_gib'] > 0 and row['arguments_gib'] > 0
  assert row['total_gib'] <= row['arguments_gib'] + row['outputs_gib'] + row['temporaries_gib']
  with pytest.raises(UserError, match='samples_per_group'):
    compile_report.compile_step(config, 6, partitioner)
  assert '| 1 |' in compile_report.table([row])


def test_gan_without_prepared_imagenet_names_the_manual_download(tmp_path):
  from fpd_jax import data  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config('smoke')
  config.distill.gan.enabled = True
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  with pytest.raises(UserError, match='manual download.*tfds build imagenet2012'):
    data.real_images(config, str(tmp_path), 8, seed=0)


def test_jpeg_records_decode_to_cropped_batches():
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from fpd_jax.data import tfds_images  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  records = []
  for label in range(6):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (90 + label, 140, 3), dtype=np.uint8)).save(buf, format='JPEG')
    records.append({'image': np.array(buf.getvalue(), dtype=object), 'label': label})
  assert tfds_images.decode_image(records[0]['image'], 32).shape == (32, 32, 3)
  ds = tfds_images.batch_dataset(records, batch_size=4, seed=0, size=32, shard_index=1, shard_count=2)
  batch = ds[0]
  assert batch['image'].shape == (2, 32, 32, 3) and batch['image'].dtype == np.float32
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  whole = tfds_images.batch_dataset(records, batch_size=4, seed=0, size=32)[0]
  np.testing.assert_array_equal(batch['label'], whole['label'][2:])  # Host 1 of 2 reads rows 2:4 of the batch.
  np.testing.assert_array_equal(ds[3]['image'], ds[3]['image'])  # Random access: a step's batch is fixed.
