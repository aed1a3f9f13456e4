"""`configs/t2i.py:smoke`: FPD steps of the released-MaskGen pipeline (TA-TiTok decoder, CLIP text tower, DINO) and
its evaluate stage (CLIP score, report.json) on the CPU with tiny random networks, and its checks."""

import json
import os
import pathlib

import numpy as np
import pytest

from configs import t2i
from fpd_jax import sharding
from fpd_jax import stages
from fpd_jax.errors import UserError
from fpd_jax.tools import compile_report
from fpd_jax.train import distill
from fpd_jax.train import maskgen as maskgen_stage

VOCAB = pathlib.Path(__file__).parent / 'fixtures' / 'maskgen_tiny' / 'bpe_simple_vocab_16e6.txt.gz'


def _config(tmp_path, prompts=('a red cube on a blue sphere', 'two dogs', 'a photo of a cat')):
  path = tmp_path / 'prompts.txt'
  path.write_text('\n'.join(prompts) + '\n')
  config = t2i.get_config('smoke')
  config.data.prompts_file = str(path)
  config.text_encoder.vocab = str(VOCAB)
  return config


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('smoke')
  config = _config(tmp_path)
  workdir = tmp_path / 'run'
  return config, workdir, stages.run_pipeline(config, str(workdir))


def test_smoke_runs_fpd_steps_and_exports_the_student(smoke_run):
  config, workdir, timings = smoke_run
  assert list(timings) == ['distill', 'evaluate']
  rows = [json.loads(line) for line in open(workdir / 'distill' / 'metrics.jsonl')]
  assert [r['step'] for r in rows][-1] == config.distill.num_steps
  assert all(np.isfinite(r['loss']) for r in rows) and 'fixed_point_gap' in rows[-1]
  assert os.path.isdir(workdir / 'distill' / 'export')


def test_smoke_evaluate_writes_clip_scores(smoke_run):
  config, workdir, _ = smoke_run
  result = json.loads((workdir / 'report.json').read_text())
  assert list(result['models']) == ['teacher_2step', 'student_1step']
  for row in result['models'].values():
    assert 0 <= row['clip_score'] <= 100 and row['images_per_sec'] > 0
    assert row['num_samples'] == 3 * config.evaluate.images_per_prompt  # 3 prompts.
  assert result['clip_score']['num_prompts'] == 3 and 'max(cos' in result['clip_score']['definition']
  assert 'timings_s' in result and '| student_1step | 1 |' in (workdir / 'report.md').read_text()
  assert sorted(os.listdir(workdir / 'samples')) == ['student_1step.png', 'teacher_2step.png']


@pytest.mark.parametrize('model, steps', [('student', 1), ('teacher', 2)])
def test_sampling_prompts_from_the_smoke_run(smoke_run, model, steps):
  _, workdir, _ = smoke_run
  images, captions = maskgen_stage.sample_prompts(str(workdir), model, steps, ['a cat', 'two dogs'], 2, 0, 4)
  assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
  assert captions == ['a cat', 'a cat', 'two dogs', 'two dogs']


def test_smoke_checks_name_the_fix(tmp_path):
  config = _config(tmp_path)
  config.data.prompts_file = str(tmp_path / 'missing.txt')
  with pytest.raises(UserError, match='prompts_file'):
    stages.validate(config)
  config = _config(tmp_path)
  config.tokenizer.num_tokens = 4
  with pytest.raises(UserError, match='num_tokens'):
    stages.validate(config)
  config = _config(tmp_path)
  config.evaluate.prompts_file = str(tmp_path / 'missing.jsonl')
  with pytest.raises(UserError, match='missing.jsonl'):
    stages.validate(config)


@pytest.mark.slow  # Compiles the smoke FPD step once more (~40 s on 2 cores) besides the smoke run's compile.
def test_compile_report_of_the_smoke_step(tmp_path):
  config = distill.with_random_weights(_config(tmp_path))
  assert config.text_encoder.pretrained == 'random'
  row = compile_report.compile_step(config, 4, sharding.Partitioner.from_config(config))
  assert row['flops_per_step'] > 0 and row['temporaries_gib'] > 0 and row['arguments_gib'] > 0
