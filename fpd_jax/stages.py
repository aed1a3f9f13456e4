"""The pipeline: its stages by name, checks of a config before any of them runs, and the runner."""

import json
import os
import time

import jax
import numpy as np

from fpd_jax import sharding
from fpd_jax.data import mnist
from fpd_jax.errors import UserError
from fpd_jax.eval import evaluate
from fpd_jax.eval import report
from fpd_jax.models import build
from fpd_jax.train import distill
from fpd_jax.train import eval_net
from fpd_jax.train import teacher
from fpd_jax.train import tokenizer


def _data(config, workdir: str) -> dict:
  mnist.build_dataset(os.path.join(workdir, 'data'))
  return {}


# name -> fn(config, workdir) -> summary dict (stored in DIR/<stage>/done.json).
STAGES = {
    'data': _data,
    'tokenizer': tokenizer.run,
    'teacher': teacher.run,
    'eval_net': eval_net.run,
    'feature_net': eval_net.run_feature_net,
    'distill': distill.run,
    'evaluate': evaluate.run,
}


def stages_of(config) -> dict:
  """The stage functions of the config's pipeline: `config.task` 'class' (default) or 't2i' (text-to-image)."""
  from fpd_jax.train import t2i  # pylint: disable=g-import-not-at-top
  task = config.get('task', 'class')
  if task not in ('class', 't2i'):
    raise UserError(f"config.task={task!r}; choose 'class' or 't2i'.")
  return t2i.STAGES if task == 't2i' else STAGES


def validate(config) -> None:
  """Fails fast, with the fix named, on config values no stage can run with."""
  known = stages_of(config)
  unknown = [s for s in config.stages if s not in known]
  if unknown:
    raise UserError(f'unknown stage(s) {unknown} in config.stages; known stages: {list(known)}.')
  build.token_grid(config)  # Image size divisible by the tokenizer's downsampling.
  if 'distill' in config.stages:
    distill.validate(config)
  trained = [s for s in ('tokenizer', 'teacher', 'eval_net', 'feature_net') if s in config.stages]
  for section in trained:
    for key in ('num_steps', 'batch_size'):
      if config[section][key] <= 0:
        raise UserError(f'config.{section}.{key} must be > 0 (got {config[section][key]}).')
  mesh = sharding.mesh_shape(config.mesh, jax.device_count()) if 'mesh' in config else (jax.device_count(),)
  data_parallel = int(np.prod(mesh))  # The batch is split over every mesh axis.
  batches = {f'{section}.batch_size': config[section].batch_size for section in trained}
  if 'distill' in config.stages:
    batches['distill.groups_per_batch * distill.samples_per_group'] = distill.batch_size(config.distill)
  for name, size in batches.items():
    if size % data_parallel:
      raise UserError(f'config.{name} = {size} is not divisible by the {data_parallel} devices the batch is split '
                      'over (config.mesh); use a multiple.')
  if config.evaluate.num_samples <= 0 or any(s <= 0 for s in config.evaluate.teacher_steps):
    raise UserError('config.evaluate.num_samples and every config.evaluate.teacher_steps must be > 0.')


def run_pipeline(config, workdir: str) -> dict:
  """Runs every stage of `config.stages` not yet done; returns `{stage: seconds}`."""
  validate(config)
  if '://' in workdir:
    raise UserError(f'--workdir={workdir}: remote paths are not written directly; mount the bucket (e.g. gcsfuse '
                    '--implicit-dirs BUCKET /mnt/gcs) on every host and pass the mounted path.')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir} is not writable ({e.strerror}); pass another --workdir.') from e
  timings = {}
  for name in config.stages:
    done_path = os.path.join(workdir, name, 'done.json')
    if os.path.exists(done_path):
      with open(done_path) as f:
        timings[name] = json.load(f)['seconds']
      print(f'[{name}] already done, skipping ({timings[name]:.1f} s)')
      continue
    print(f'[{name}] starting')
    start = time.perf_counter()
    summary = stages_of(config)[name](config, workdir) or {}
    timings[name] = time.perf_counter() - start
    if jax.process_index() == 0:  # Every process ran the stage; one records it.
      os.makedirs(os.path.dirname(done_path), exist_ok=True)
      with open(done_path, 'w') as f:
        json.dump({'seconds': timings[name], **summary}, f, indent=1)
    print(f'[{name}] done in {timings[name]:.1f} s')
  if 'evaluate' in config.stages and jax.process_index() == 0:
    report.add_timings(workdir, timings)
  return timings
