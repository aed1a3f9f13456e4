"""The pipeline: its stages by name, checks of a config before any of them runs, and the runner.

Stages run in the order of `config.stages`, except that up to `config.concurrent_stages` of them run at once in
threads when none reads what another is writing (`DEPENDS_ON`): on the demo the evaluation and feature networks
train beside the tokenizer and the teacher. XLA:CPU keeps only about 1.2 of 2 cores busy with one small model, so
two stages side by side finish sooner; every stage computes exactly what it computes alone.
"""

import concurrent.futures
import json
import os
import threading
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from fpd_jax import sampling
from fpd_jax import sharding
from fpd_jax.data import mnist
from fpd_jax.errors import UserError
from fpd_jax.eval import evaluate
from fpd_jax.eval import report
from fpd_jax.models import build
from fpd_jax.models import maskgen as maskgen_model
from fpd_jax.train import distill
from fpd_jax.train import eval_net
from fpd_jax.train import loop
from fpd_jax.train import teacher
from fpd_jax.train import tokenizer


def _data(config, workdir: str) -> dict:
  if jax.process_index() == 0:  # One process writes the dataset to the shared workdir; the others wait for it.
    mnist.build_dataset(os.path.join(workdir, 'data'))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('fpd_jax:data_stage')
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

# The stages each stage reads, per `config.task` (those of them in `config.stages` must be done first). A stage not
# listed here, `evaluate`, and every stage of another task wait for every stage before them in `config.stages`.
DEPENDS_ON = {
    'class': {
        'data': (),
        'tokenizer': ('data',),
        'teacher': ('data', 'tokenizer'),
        'eval_net': ('data',),
        'feature_net': ('data',),
        'distill': ('data', 'tokenizer', 'teacher', 'feature_net'),
    },
    't2i': {  # The text-to-image demo (fpd_jax/train/t2i.py): the teacher also reads the frozen text encoder.
        'data': (),
        'tokenizer': ('data',),
        'text_encoder': ('data',),
        'teacher': ('data', 'tokenizer', 'text_encoder'),
        'eval_net': ('data',),
        'feature_net': ('data',),
        'distill': ('data', 'tokenizer', 'text_encoder', 'teacher', 'feature_net'),
    },
}


def dependencies(name: str, stages: tuple[str, ...], task: str = 'class', config=None) -> tuple[str, ...]:
  """The stages of `stages` that stage `name` must wait for (all earlier ones unless `DEPENDS_ON` says less); a
  text-to-image teacher with REPA (`config.teacher.repa.weight` > 0) also reads the feature network."""
  reads = DEPENDS_ON.get(task, {})
  if name not in reads:
    return tuple(stages[:stages.index(name)])
  extra = ('feature_net',) if name == 'teacher' and config is not None and _teacher_repa(config) else ()
  return tuple(s for s in reads[name] + extra if s in stages)


def _teacher_repa(config) -> bool:
  return config.get('task', 'class') == 't2i' and teacher.repa_weight(config.teacher) > 0


# The stages a distillation reads (teacher, tokenizer, evaluation and drift feature networks, and their data).
DISTILL_INPUTS = ('data', 'tokenizer', 'teacher', 'eval_net', 'feature_net')


def stages_of(config) -> dict:
  """The stage functions of the config's pipeline: `config.task` 'class' (default), 't2i' (the text-to-image demo)
  or 'maskgen' (the released MaskGen-L teacher, `configs/t2i.py`)."""
  from fpd_jax.train import maskgen  # pylint: disable=g-import-not-at-top
  from fpd_jax.train import t2i  # pylint: disable=g-import-not-at-top
  task = config.get('task', 'class')
  if task not in ('class', 't2i', 'maskgen'):
    raise UserError(f"config.task={task!r}; choose 'class', 't2i' or 'maskgen'.")
  return {'class': STAGES, 't2i': t2i.STAGES, 'maskgen': maskgen.STAGES}[task]


def validate(config) -> None:
  """Fails fast, with the fix named, on config values no stage can run with."""
  known = stages_of(config)
  unknown = [s for s in config.stages if s not in known]
  if unknown:
    raise UserError(f'unknown stage(s) {unknown} in config.stages; known stages: {list(known)}.')
  if config.get('task', 'class') == 'maskgen':  # Imported networks, prompts only: its own checks.
    from fpd_jax.train import maskgen  # pylint: disable=g-import-not-at-top
    maskgen.validate(config)
    check_batch_split(config, {'distill.groups_per_batch * distill.samples_per_group':
                               distill.batch_size(config.distill)})
    return
  grid = build.token_grid(config)  # Image size divisible by the tokenizer's downsampling.
  sampling.validate(config)
  tokenizer.validate(config)
  block, block_prob = config.teacher.get('mask_block_size', 0), config.teacher.get('mask_block_prob', 0.0)
  if not 0.0 <= block_prob <= 1.0 or (block_prob > 0 and (block <= 0 or grid % block)):
    raise UserError(f'config.teacher.mask_block_prob={block_prob} with mask_block_size={block}: the probability '
                    f'must be in [0, 1] and, when > 0, the block side a divisor of the {grid}x{grid} token grid.')
  embedding_init = config.teacher.get('embedding_init', 'random')
  if embedding_init not in maskgen_model.EMBEDDING_INITS:  # Class configs have no such field: 'random'.
    raise UserError(f'config.teacher.embedding_init={embedding_init!r}: choose one of '
                    f'{maskgen_model.EMBEDDING_INITS}.')
  if _teacher_repa(config):
    repa, order = config.teacher.repa, list(config.stages)
    if not 0 <= repa.layer < config.teacher.num_layers:
      raise UserError(f'config.teacher.repa.layer={repa.layer}: the teacher has blocks 0..'
                      f'{config.teacher.num_layers - 1}.')
    if 'teacher' in order and 'feature_net' in order and order.index('feature_net') > order.index('teacher'):
      raise UserError("config.teacher.repa.weight > 0: the teacher reads the feature network, so list "
                      "'feature_net' before 'teacher' in config.stages.")
  if 'distill' in config.stages:
    distill.validate(config)
  trained = [s for s in ('tokenizer', 'teacher', 'eval_net', 'feature_net') if s in config.stages]
  for section in trained:
    for key in ('num_steps', 'batch_size'):
      if config[section][key] <= 0:
        raise UserError(f'config.{section}.{key} must be > 0 (got {config[section][key]}).')
  batches = {f'{section}.batch_size': config[section].batch_size for section in trained}
  if 'distill' in config.stages:
    batches['distill.groups_per_batch * distill.samples_per_group'] = distill.batch_size(config.distill)
  check_batch_split(config, batches)
  if config.get('concurrent_stages', 1) < 1:
    raise UserError(f'config.concurrent_stages must be >= 1 (got {config.concurrent_stages}).')
  if config.evaluate.num_samples <= 0 or any(s <= 0 for s in config.evaluate.teacher_steps):
    raise UserError('config.evaluate.num_samples and every config.evaluate.teacher_steps must be > 0.')


def check_batch_split(config, batches: dict) -> None:
  """Each `{name: global batch size}` must split evenly over the devices of `config.mesh`."""
  mesh = sharding.mesh_shape(config.mesh, jax.device_count()) if 'mesh' in config else (jax.device_count(),)
  data_parallel = int(np.prod(mesh))  # The batch is split over every mesh axis.
  for name, size in batches.items():
    if size % data_parallel:
      raise UserError(f'config.{name} = {size} is not divisible by the {data_parallel} devices the batch is split '
                      'over (config.mesh; a CPU host is split into config.cpu_devices devices); use a multiple.')


def use_cpu_devices(count: int) -> None:
  """Splits a CPU host into `count` JAX devices (`jax_num_cpu_devices`) when the process has not used JAX yet.

  XLA:CPU runs the operations of one program one after another, so a stage on one CPU device keeps about 1.2
  cores busy however many the host has. On `count` CPU devices the mesh's data axis splits every batch over them
  and the shards run at once, but the stages then run one at a time (`run_pipeline`). On the 2-core demo host, 2
  devices made single stages 1.07x (teacher) to 1.43x (8-step sampling) faster, about what running two 1-device
  stages side by side gains, so the demos keep one device; hosts with more cores gain more. Sampling and metrics do
  not depend on the split (`fpd_jax/sharding.py`); training only by float rounding.

  Left as it is: `count <= 0`, a device count already given in XLA_FLAGS (`launch/local.sh --fake-devices`), a
  multi-process run, and a process whose JAX backends already started (e.g. a test that ran JAX before).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if (count <= 0 or 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
      or xla_bridge.backends_are_initialized()):
    return
  jax.config.update('jax_num_cpu_devices', int(count))


def use_compilation_cache(setting: str, workdir: str) -> None:
  """Keeps compiled XLA programs in `setting` ('' = `DIR/jax_cache`; 'off' = nowhere) for later runs."""
  if setting == 'off' or jax.config.jax_compilation_cache_dir:  # The first pipeline of a process sets it.
    return
  jax.config.update('jax_compilation_cache_dir', setting or os.path.join(workdir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def run_concurrently(names, run_one, max_running: int, finished: set | None = None,
                     ready=lambda name, finished: True) -> None:
  """Calls `run_one(name)` for each of `names`, up to `max_running` at once in threads. They start in the order
  given, each once `ready(name, finished)` holds (`finished`: the names done so far, updated here): a name that is
  not ready holds back the ones after it, so the order decides what runs beside what.

  The first error starts nothing new; the calls still running finish (a SIGTERM or Ctrl-C makes training loops
  stop after their current step, saved), then the error is raised.
  """
  pending, finished = list(names), set() if finished is None else finished
  errors = []
  with loop.SIGTERM, concurrent.futures.ThreadPoolExecutor(max(1, max_running)) as pool:
    running = {}
    try:
      while pending or running:
        while pending and len(running) < max_running and ready(pending[0], finished):
          name = pending.pop(0)
          running[pool.submit(run_one, name)] = name
        if not running:
          raise UserError(f'stages {pending} wait for stages that are not in config.stages.')
        # A timeout, so that this (main) thread runs the SIGTERM handler soon: the OS may deliver the signal to
        # a worker thread, which never interrupts a blocking wait here.
        done, _ = concurrent.futures.wait(running, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          name = running.pop(future)
          if future.exception() is not None:
            errors.append(future.exception())
            pending.clear()  # Start nothing new; the calls still running finish (or stop on SIGTERM).
          else:
            finished.add(name)
    except KeyboardInterrupt:
      loop.SIGTERM.event.set()  # The running loops save their step and stop, like on SIGTERM.
      raise
  if errors:
    raise errors[0]


def concurrent_slots(requested: int) -> int:
  """How many stages (or comparison runs) may run at once in threads: `requested` on a single device, else 1.

  They share the process's devices. Several processes run the stages one by one, in the same order (their
  collectives must match); so does one process with several devices: two programs whose collectives span the same
  devices can each hold a device the other waits for (XLA:CPU aborts such a stalled all-reduce after 40 s).
  """
  return requested if jax.device_count() == 1 else 1


def run_pipeline(config, workdir: str) -> dict:
  """Runs every stage of `config.stages` not yet done; returns `{stage: seconds}` in the order of the config.

  Stages start in the order of `config.stages`, each when its `dependencies` are done; on a single device up to
  `config.concurrent_stages` run at once (in threads). The first error ends the pipeline once the stages still
  running have finished (a SIGTERM or Ctrl-C stops them after their current step, saved).
  """
  if not config.get('distributed', False):
    use_cpu_devices(config.get('cpu_devices', 0))  # Before validate(), which counts the devices.
  validate(config)
  if '://' in workdir:
    raise UserError(f'--workdir={workdir}: remote paths are not written directly; mount the bucket (e.g. gcsfuse '
                    '--implicit-dirs BUCKET /mnt/gcs) on every host and pass the mounted path.')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{os.getpid()}')  # Per process: processes of a run share workdir.
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f'workdir {workdir} is not writable ({e.strerror}); pass another --workdir.') from e
  use_compilation_cache(config.get('compilation_cache', 'off'), workdir)
  max_running = concurrent_slots(config.get('concurrent_stages', 1))
  timings = {}
  lock = threading.Lock()

  def run_stage(name):
    print(f'[{name}] starting')
    start, started_at = time.perf_counter(), time.time()
    summary = stages_of(config)[name](config, workdir) or {}
    seconds = time.perf_counter() - start
    if jax.process_index() == 0:  # Every process ran the stage; one records it.
      done_path = os.path.join(workdir, name, 'done.json')
      os.makedirs(os.path.dirname(done_path), exist_ok=True)
      with open(done_path, 'w') as f:
        json.dump({'seconds': seconds, 'started_at': started_at, 'finished_at': time.time(), **summary}, f,
                  indent=1)
    with lock:
      timings[name] = seconds
    print(f'[{name}] done in {seconds:.1f} s')

  pipeline_start = time.perf_counter()
  finished, pending = set(), []
  for name in config.stages:
    done_path = os.path.join(workdir, name, 'done.json')
    if os.path.exists(done_path):
      with open(done_path) as f:
        timings[name] = json.load(f)['seconds']
      print(f'[{name}] already done, skipping ({timings[name]:.1f} s)')
      finished.add(name)
    else:
      pending.append(name)
  run_concurrently(pending, run_stage, max_running, finished,
                   ready=lambda name, finished: set(dependencies(name, tuple(config.stages),
                                                                 config.get('task', 'class'), config)) <= finished)
  if 'evaluate' in config.stages and jax.process_index() == 0:
    report.add_timings(workdir, timings, time.perf_counter() - pipeline_start,
                       {'count': jax.device_count(), 'kind': jax.devices()[0].device_kind,
                        'processes': jax.process_count()})
  return {name: timings[name] for name in config.stages}


def run_distill_inputs(config, workdir: str) -> dict:
  """Runs the stages a distillation reads (`DISTILL_INPUTS`; the text demo adds its text encoder) not yet done,
  for commands that distil several students of one teacher."""
  task = config.get('task', 'class')
  needed = set(DISTILL_INPUTS) | set(DEPENDS_ON.get(task, {}).get('distill', ()))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.stages = tuple(s for s in config.stages if s in needed)
  return run_pipeline(config, workdir)
