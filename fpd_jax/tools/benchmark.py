r"""FPD training speed on 1, 2, 4 and 8 devices: steps/s and images/s of the configured distill step; or, with
`--measure=sampling`, images/s of evaluation sampling (teacher `--sampling_steps`-step decoding + tokenizer decoder,
batches of `evaluate.batch_size` split over the devices as the evaluate stage does).

  python -m fpd_jax.tools.benchmark                                   # demo config, 1/2/4/8 devices
  python -m fpd_jax.tools.benchmark --config=configs/imagenet.py:gpu --devices=1 --steps=20
  python -m fpd_jax.tools.benchmark --measure=sampling --sampling_steps=8 --steps=4

Frozen models have random weights of the configured shapes (speed does not depend on the values), so no earlier
stage is needed. For each device count n the mesh is `data=n/fsdp, fsdp=--fsdp` over the first n devices and the
global batch is the config's. The step is compiled and run twice before `--steps` timed steps. On a machine without
accelerators the devices are fake CPU devices (this module sets `--xla_force_host_platform_device_count=8`
before JAX starts): they share the same cores, so the table shows partitioning overhead, not speed-up.
"""

import os
import sys

if 'jax' not in sys.modules and 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from fpd_jax import batching  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax import sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.models import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.train import distill  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.train import eval_net  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file (default: the demo).',
                                          lock_config=True)
_DEVICES = flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'Device counts to measure.')
_FSDP = flags.DEFINE_integer('fsdp', 1, 'Size of the fsdp mesh axis (the data axis takes the rest).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per device count (after 2 warm-up steps).')
_OUT = flags.DEFINE_string('out', None, 'Optional JSON file for the rows.')
_MEASURE = flags.DEFINE_enum('measure', 'train', ['train', 'sampling'], 'train: the FPD step; sampling: teacher '
                             'image sampling of the evaluate stage (timed batches = --steps).')
_SAMPLING_STEPS = flags.DEFINE_integer('sampling_steps', 8, 'Teacher decoding steps of --measure=sampling.')


def random_frozen_params(config) -> dict:
  """Frozen parameters of the configured shapes with random values (teacher, tokenizer, feature encoder)."""
  config = distill.with_random_weights(config)
  cfg = config.distill
  if cfg.drift_space == 'features' and cfg.get('feature_encoder', 'feature_net') == 'feature_net':
    with config.unlocked():
      cfg.drift_space = 'pixels'  # Load the others; the feature_net has no 'random' option: init it here.
    frozen = distill.load_frozen_params(config, workdir='')
    net = eval_net.build_net(config.feature_net, config.data.num_classes)
    frozen['features'] = eval_net.init_params(net, config, jax.random.key(config.feature_net.seed))
    return frozen
  return distill.load_frozen_params(config, workdir='')


def measure(config, frozen, devices: list, fsdp: int, steps: int) -> dict:
  """Steps/s and images/s of the FPD step on `devices`."""
  if len(devices) % fsdp:
    raise UserError(f'--fsdp={fsdp} does not divide {len(devices)} devices.')
  mesh_config = config.copy_and_resolve_references()
  mesh_config.mesh.data, mesh_config.mesh.fsdp = len(devices) // fsdp, fsdp
  partitioner = sharding.Partitioner.from_config(mesh_config, devices)
  train = distill.trainer(config)
  state = partitioner.init(lambda: train.init_state(frozen['teacher']))
  placed = partitioner.put(frozen)
  step = partitioner.jit_step(train.step, state, placed)
  batch_size = distill.batch_size(config.distill)
  labels = distill.condition_batch(config.seed, 0, config.data.num_classes, config.distill)
  batch = partitioner.batch({'label': labels})
  for i in range(2):
    state, metrics = step(state, placed, batch, jax.random.key(i))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = step(state, placed, batch, jax.random.key(100 + i))
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  return {'devices': len(devices), 'device_kind': devices[0].device_kind,
          'mesh': f'data={len(devices) // fsdp}xfsdp={fsdp}', 'batch_size': batch_size,
          'ms_per_step': 1000 * seconds / steps, 'steps_per_sec': steps / seconds,
          'images_per_sec': steps * batch_size / seconds}


def measure_sampling(config, frozen, devices: list, num_steps: int, batches: int) -> dict:
  """Images/s of teacher sampling on `devices` (mesh data=len(devices)), as the evaluate stage runs it (`batching.sample_on_mesh`)."""
  partitioner = sharding.Partitioner.from_config({}, devices)
  sample = sampling.teacher_image_sampler(build.teacher(config), build.tokenizer(config), build.token_grid(config),
                                          num_steps, config.sampling)
  params, tokenizer_params = partitioner.replicate((frozen['teacher'], frozen['tokenizer']))
  generate = lambda labels, rng: sample(params, tokenizer_params, labels, rng)
  batch_size = config.evaluate.batch_size
  labels = (np.arange(batch_size * batches) % config.data.num_classes).astype(np.int32)
  batching.sample_on_mesh(partitioner, generate, labels[:batch_size], batch_size, jax.random.key(0))  # Compile.
  start = time.perf_counter()
  batching.sample_on_mesh(partitioner, generate, labels, batch_size, jax.random.key(1))
  seconds = time.perf_counter() - start
  return {'devices': len(devices), 'device_kind': devices[0].device_kind, 'mesh': f'data={len(devices)}',
          'batch_size': batch_size, 'ms_per_step': 1000 * seconds / batches, 'steps_per_sec': batches / seconds,
          'images_per_sec': len(labels) / seconds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value

  def run():
    counts = [int(n) for n in _DEVICES.value]
    if max(counts) > jax.device_count():
      raise UserError(f'--devices asks for {max(counts)} devices but {jax.device_count()} are available.')
    if config.distill.gan.enabled:
      raise UserError('the benchmark measures the FPD step without the GAN; pass '
                      '--config.distill.gan.enabled=False.')
    frozen = random_frozen_params(config)
    rows = []
    for n in counts:
      if _MEASURE.value == 'sampling':
        rows.append(measure_sampling(config, frozen, jax.devices()[:n], _SAMPLING_STEPS.value, _STEPS.value))
      else:
        rows.append(measure(config, frozen, jax.devices()[:n], _FSDP.value, _STEPS.value))
      print(f'{n} device(s): {rows[-1]["steps_per_sec"]:.2f} steps/s, {rows[-1]["images_per_sec"]:.1f} images/s',
            flush=True)
    cols = ('devices', 'device_kind', 'mesh', 'batch_size', 'ms_per_step', 'steps_per_sec', 'images_per_sec')
    print('| ' + ' | '.join(cols) + ' |\n|' + '---|' * len(cols))
    for r in rows:
      print('| ' + ' | '.join(f'{r[c]:.2f}' if isinstance(r[c], float) else str(r[c]) for c in cols) + ' |')
    if _OUT.value:
      with open(_OUT.value, 'w') as f:
        json.dump(rows, f, indent=1)

  cli.run_user_command(run, config.get('verbose', False))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
