"""`python -m fpd_jax.compare` on the tiny demo config: tuning, both budgets, tables, plot, resume."""

import json
import os
import subprocess
import sys

import numpy as np
import optax
from PIL import Image
import pytest

from configs import demo
from configs import t2i
from configs import t2i_demo
from fpd_jax import compare
from fpd_jax.errors import UserError
from fpd_jax.train import distill
from fpd_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_setting_and_bad_settings():
  assert compare.parse_setting('learning_rate=1e-4, dimo.mask_fraction=0.5,lift=soft') == {
      'learning_rate': 1e-4, 'dimo.mask_fraction': 0.5, 'lift': 'soft'}
  with pytest.raises(UserError, match='not KEY=VALUE'):
    compare.parse_setting('learning_rate')
  config = demo.get_config('tiny')
  with pytest.raises(UserError, match='unknown config.distill key'):
    compare.method_config(config, 'dimo', {'dimo.no_such_knob': 1}, 0)
  with pytest.raises(UserError, match='mask_fraction'):
    compare.method_config(config, 'dimo', {'dimo.mask_fraction': 2.0}, 0)
  cfg = compare.method_config(config, 'dimo', {'dimo.learning_rate': 3e-4}, 4, num_steps=9)
  assert (cfg.distill.method, cfg.distill.seed, cfg.distill.num_steps, cfg.distill.dimo.learning_rate) == (
      'dimo', 4, 9, 3e-4)
  assert config.distill.method == 'fpd'  # The base config is untouched.


@pytest.mark.parametrize('get_config', [demo.get_config, t2i_demo.get_config], ids=['demo', 't2i_demo'])
def test_every_tuning_setting_of_the_real_configs_applies(get_config):
  config = get_config()
  for method in ('fpd', 'dimo'):
    settings = config.compare[f'tune_{method}']
    assert 1 <= len(settings) <= compare.MAX_SETTINGS
    for setting in settings:
      cfg = compare.method_config(config, method, compare.parse_setting(setting), 0)
      assert cfg.distill.method == method
  # The text demo's Di[M]O default is its first tuning setting (the one --tune chose), so the README's table runs
  # are the untuned ones.
  if get_config is t2i_demo.get_config:
    assert compare.leaves_distill_as_is(config, 'dimo', compare.parse_setting(config.compare.tune_dimo[0]))
    assert not compare.leaves_distill_as_is(config, 'dimo', compare.parse_setting(config.compare.tune_dimo[1]))


@pytest.mark.slow  # About 5 minutes on 2 cores; run with -m slow.
def test_tiny_compare_with_tuning_writes_tables_and_plot(tmp_path):
  args = [sys.executable, '-m', 'fpd_jax.compare', '--config=configs/demo.py:tiny', f'--workdir={tmp_path}',
          '--seeds=1', '--tune']
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'compare.json') as f:
    out = json.load(f)
  assert set(out) >= {'seeds', 'settings', 'tuning', 'time_budget', 'cost', 'results', 'teacher_1step', 'runs'}
  assert set(out['results']) == {'steps', 'time'}
  for budget in ('steps', 'time'):
    for method in ('fpd', 'dimo'):
      row = out['results'][budget][method]
      for key in ('fd', 'accuracy', 'precision', 'recall'):
        assert set(row[key]) == {'mean', 'std', 'values'} and len(row[key]['values']) == 1
        assert np.isfinite(row[key]['mean'])
  budget = out['time_budget']
  faster = 'fpd' if budget['slower'] == 'dimo' else 'dimo'
  assert budget['steps'][budget['slower']] == out['num_steps'] and budget['steps'][faster] >= out['num_steps']
  for method in ('fpd', 'dimo'):
    cost = out['cost'][method]
    assert cost['peak_memory_mib'] > 0 and cost['flops_per_step'] > 0 and cost['images_per_sec'] > 0
    assert out['tuning'][method][0]['overrides'] and out['settings'][method]['index'] == 0
  # FPD's one setting is the config's own learning rate: its report runs are the untuned names; Di[M]O's is not.
  assert out['settings']['fpd']['same_as_config'] and not out['settings']['dimo']['same_as_config']
  # Di[M]O trains two copies of the student's trainable parameters; FPD one full student.
  assert out['cost']['dimo']['trained_params'] < 2 * out['cost']['fpd']['trained_params']
  assert os.path.isdir(tmp_path / 'compare' / 'dimo_tune0_seed0' / 'export')
  assert os.path.isdir(tmp_path / 'compare' / 'fpd_steps_seed1' / 'snapshots')
  assert os.path.isdir(tmp_path / 'compare' / 'dimo_steps_set0_seed1' / 'snapshots')
  with open(tmp_path / 'compare' / 'fpd_tune0_seed0' / 'eval.json') as f:
    assert json.load(f)['curve'] == []  # Tuning reads the final FD only: no snapshot curve is measured.
  text = open(tmp_path / 'compare.md').read()
  assert '| fpd | steps |' in text and '| dimo | time |' in text and '## Tuning' in text
  image = Image.open(tmp_path / 'compare.png')
  assert image.size[0] > 100 and len(set(image.getdata())) > 3
  # Rerun: every run is skipped, the same budgets are kept.
  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert '[compare] training' not in again.stdout
  with open(tmp_path / 'compare.json') as f:
    assert json.load(f)['time_budget'] == budget


def test_wrong_task_or_selection_metric_fails_before_any_stage_runs(tmp_path):
  with pytest.raises(UserError, match="config.task='maskgen'.*configs/t2i.py"):
    compare.run(t2i.get_config('smoke'), str(tmp_path), [3])
  config = t2i_demo.get_config('tiny')
  config.compare.select_by = 'accuracy'  # A class-demo metric.
  with pytest.raises(UserError, match="select_by='accuracy'.*geneval_lite"):
    compare.run(config, str(tmp_path), [3])
  assert not os.listdir(tmp_path)


@pytest.mark.slow  # About 4 minutes on 2 cores (the tiny text pipeline first); run with -m slow.
def test_tiny_text_compare_with_tuning(tmp_path):
  args = [sys.executable, '-m', 'fpd_jax.compare', '--config=configs/t2i_demo.py:tiny', f'--workdir={tmp_path}',
          '--seeds=1', '--tune', '--budgets=steps']
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'compare.json') as f:
    out = json.load(f)
  assert out['task'] == 't2i' and out['metrics'] == ['geneval_lite', 'held_out', 'fd']
  assert out['select_by'] == 'geneval_lite' and out['num_samples'] == 24 and out['time_budget'] is None
  for method in ('fpd', 'dimo'):
    row = out['results']['steps'][method]
    for key in out['metrics']:
      assert len(row[key]['values']) == 1 and np.isfinite(row[key]['mean'])
    assert out['cost'][method]['flops_per_step'] > 0 and out['cost'][method]['trained_params'] > 0
    assert set(out['teacher_1step']) == set(out['metrics'])
  assert out['cost']['dimo']['trained_params'] < 2 * out['cost']['fpd']['trained_params']  # Frozen embeddings.
  # The Di[M]O student is a MaskGen generator sampled with Di[M]O's one-step settings (embedding noise on).
  with open(tmp_path / 'compare' / 'dimo_steps_set0_seed1' / 'export_meta.json') as f:
    meta = json.load(f)
  assert meta['config']['distill']['method'] == 'dimo' and meta['config']['task'] == 't2i'
  text = open(tmp_path / 'compare.md').read()
  assert '| GenEval-lite | GenEval-lite held-out | FD |' in text and 'highest chosen' in text
  assert (tmp_path / 'compare.png').exists()


def test_budgets_must_include_steps(tmp_path):
  for budgets in (('time',), ('steps', 'hours')):
    with pytest.raises(UserError, match='--budgets='):
      compare.run(demo.get_config('tiny'), str(tmp_path), [3], budgets=budgets)


def test_bad_seeds_get_one_line_error(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'fpd_jax.compare', '--config=configs/demo.py:tiny',
                           f'--workdir={tmp_path}', '--seeds=a'], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2 and result.stderr.strip().count('\n') == 0, result.stderr
  assert 'seeds must be integers' in result.stderr


def test_dimo_updates_do_not_depend_on_num_steps_so_its_time_run_continues_its_steps_run(tmp_path):
  config = demo.get_config('tiny')
  grads = {'w': np.asarray([0.5, -1.0, 2.0], np.float32)}

  def params_after(method, num_steps, steps=25):  # Past the warmup (20 steps), which must fit in the shorter run.
    cfg = compare.method_config(config, method, {}, 0, num_steps=num_steps)
    tx = distill.dimo_optimizers(cfg)[0] if method == 'dimo' else optim.make_optimizer(cfg.distill, 1.0)
    params = {'w': np.ones(3, np.float32)}
    state = tx.init(params)
    for _ in range(steps):
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return np.asarray(params['w'])

  assert compare.CONTINUABLE == ('dimo',)
  np.testing.assert_array_equal(params_after('dimo', 25), params_after('dimo', 250))
  assert not np.array_equal(params_after('fpd', 25), params_after('fpd', 250))  # Cosine: FPD trains afresh.
  # The continued run starts with the shorter run's checkpoints, snapshots and metrics, not its results.
  short = tmp_path / 'dimo_steps_seed3'
  for sub in ('checkpoints/6', 'snapshots/3', 'export'):
    (short / sub).mkdir(parents=True)
  for f in ('metrics.jsonl', 'done.json', 'eval.json', 'export_meta.json'):
    (short / f).write_text('{}')
  compare.continue_run(str(tmp_path), 'dimo_steps_seed3', 'dimo_time_seed3')
  copied = {str(p.relative_to(tmp_path / 'dimo_time_seed3')) for p in (tmp_path / 'dimo_time_seed3').rglob('*')}
  assert copied == {'checkpoints', 'checkpoints/6', 'snapshots', 'snapshots/3', 'metrics.jsonl'}
  (short / 'metrics.jsonl').write_text('changed')
  compare.continue_run(str(tmp_path), 'dimo_steps_seed3', 'dimo_time_seed3')  # Exists: left as it is.
  assert (tmp_path / 'dimo_time_seed3' / 'metrics.jsonl').read_text() == '{}'
