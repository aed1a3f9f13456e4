r"""Speed of the FPD step and of sampling: a device-scaling table, or the figures of one accelerator.

  python -m fpd_jax.tools.benchmark                                   # demo config, 1/2/4/8 devices
  python -m fpd_jax.tools.benchmark --config=configs/imagenet.py:gpu --devices=1 --steps=20
  python -m fpd_jax.tools.benchmark --measure=sampling --sampling_steps=8 --steps=4  # evaluation sampling
  python -m fpd_jax.tools.benchmark --suite=accelerator               # ImageNet (configs/imagenet.py), one device
  python -m fpd_jax.tools.benchmark --suite=accelerator --config=configs/imagenet.py:smoke --batch_sizes=8,16 \
      --sample_batch=16 --out=bench.json                              # the same table at tiny sizes, on a CPU
  python -m fpd_jax.tools.benchmark --suite=compare --ours=bench.json --anchors=a32.json,a64.json,gpu.json

Frozen models have random weights of the configured shapes (`distill.with_random_weights`: speed does not depend
on the values), so no earlier stage is needed. Every function is compiled ahead of time, called once more to warm
up, then timed over `--steps` calls, each waited for with `block_until_ready`; the figure is the median call.

`--suite=scaling` (default; config default configs/demo.py): for each device count n the mesh is
`data=n/fsdp, fsdp=--fsdp` over the first n devices and the global batch is the config's. On a machine without
accelerators the devices are fake CPU devices (this module sets `--xla_force_host_platform_device_count=8` before
JAX starts): they share the same cores, so the table shows partitioning overhead, not speed-up.

`--suite=accelerator` (config default configs/imagenet.py, i.e. its `gpu` variant: bf16 compute) on the first
device: the FPD step at each of `--batch_sizes` (ms, images/s, peak memory, XLA's temporaries and FLOPs), then
teacher sampling at each of `--teacher_steps` and one-step student sampling, both with the tokenizer's decoder, at
`--sample_batch` images in the step's compute dtype. Peak memory is the device's `memory_stats()['peak_bytes_in_use']`
where the backend keeps it (GPU; the process's peak so far, so the FPD rows run first, smallest batch first), else
XLA's buffer assignment of the compiled call (arguments + outputs + temporaries - donated; `compile_report.memory`);
the `peak_source` column says which.

`--suite=compare`: the accelerator rows of `--ours` next to the JSON printed by the plain reference steps
(`fpd_step_anchor.py --batch=N`, `gpu_anchor.py`; see launch/accelerator_check.sh), as ours / plain.
"""

import os
import sys

if 'jax' not in sys.modules and 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()

import importlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import statistics  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from fpd_jax import batching  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax import sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.models import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.tools import compile_report  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.train import distill  # pylint: disable=g-import-not-at-top,wrong-import-position
from fpd_jax.train import eval_net  # pylint: disable=g-import-not-at-top,wrong-import-position

SUITES = ('scaling', 'accelerator', 'compare')
DEFAULT_CONFIGS = {'scaling': 'configs.demo', 'accelerator': 'configs.imagenet'}  # When --config is not given.
GIB = compile_report.GIB
FLAGS = flags.FLAGS

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


def median_seconds(call, steps: int) -> float:
  """Median wall time of `call(i)` for i = 1..steps, each waited for; call(0) first warms up."""
  jax.block_until_ready(call(0))
  times = []
  for i in range(1, steps + 1):
    start = time.perf_counter()
    jax.block_until_ready(call(i))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _timed_row(compiled, call, steps: int, batch_size: int, device) -> dict:
  """ms, images/s and XLA's memory figures of a compiled function timed through `call`."""
  seconds = median_seconds(call, steps)
  mem = compile_report.memory(compiled)
  return {'batch_size': batch_size, 'ms': 1000 * seconds, 'images_per_sec': batch_size / seconds,
          'peak_gib': mem.get('total_gib'), 'peak_source': 'xla' if mem else None,
          'xla_temporaries_gib': mem.get('temporaries_gib'), 'xla_total_gib': mem.get('total_gib'),
          'tflop': compile_report.flops(compiled) / 1e12,  # XLA's cost analysis (a decode loop's body counts once).
          'device_kind': device.device_kind}


def step_row(config, frozen, devices: list, fsdp: int, steps: int) -> dict:
  """The FPD step on `devices` (mesh data x fsdp), compiled ahead of time and timed."""
  if len(devices) % fsdp:
    raise UserError(f'--fsdp={fsdp} does not divide {len(devices)} devices.')
  mesh_config = config.copy_and_resolve_references()
  mesh_config.mesh.data, mesh_config.mesh.fsdp = len(devices) // fsdp, fsdp
  partitioner = sharding.Partitioner.from_config(mesh_config, devices)
  train = distill.trainer(config)
  state = [partitioner.init(lambda: train.init_state(frozen['teacher']))]
  placed = partitioner.put(frozen)
  labels = distill.condition_batch(config.seed, 0, config.data.num_classes, config.distill)
  batch = partitioner.batch({'label': labels})
  compiled = partitioner.jit_step(train.step, state[0], placed).lower(
      state[0], placed, batch, jax.random.key(0)).compile()

  def call(i):
    state[0], metrics = compiled(state[0], placed, batch, jax.random.key(i))  # The old state is donated.
    return state[0], metrics

  row = _timed_row(compiled, call, steps, distill.batch_size(config.distill), devices[0])
  row.update(name='fpd_step', devices=len(devices), mesh=f'data={len(devices) // fsdp}xfsdp={fsdp}',
             ms_per_step=row['ms'], steps_per_sec=1000 / row['ms'])
  stats = devices[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    row.update(peak_gib=stats['peak_bytes_in_use'] / GIB, peak_source='memory_stats')
  return row


def sampling_row(config, frozen, devices: list, num_steps: int, batches: int) -> dict:
  """Images/s of teacher sampling on `devices` (mesh data=len(devices)), as the evaluate stage runs it
  (`batching.sample_on_mesh`: batches of `evaluate.batch_size` split over the devices)."""
  partitioner = sharding.Partitioner.from_config({}, devices)
  sample = sampling.teacher_image_sampler(build.teacher(config), build.tokenizer(config), build.token_grid(config),
                                          config)
  params, tokenizer_params = partitioner.replicate((frozen['teacher'], frozen['tokenizer']))
  generate = lambda labels, rng: sample(params, tokenizer_params, labels, rng, num_steps)
  batch_size = config.evaluate.batch_size
  labels = (np.arange(batch_size * batches) % config.data.num_classes).astype(np.int32)
  batching.sample_on_mesh(partitioner, generate, labels[:batch_size], batch_size, jax.random.key(0))  # Compile.
  start = time.perf_counter()
  batching.sample_on_mesh(partitioner, generate, labels, batch_size, jax.random.key(1))
  seconds = time.perf_counter() - start
  return {'devices': len(devices), 'device_kind': devices[0].device_kind, 'mesh': f'data={len(devices)}',
          'batch_size': batch_size, 'ms_per_step': 1000 * seconds / batches, 'steps_per_sec': batches / seconds,
          'images_per_sec': len(labels) / seconds}


def sampler_row(name: str, sample, params, tokenizer_params, labels, steps: int, device, extra=()) -> dict:
  """Images/s of a jitted sampler `(params, tokenizer_params, labels, rng, *extra) -> images` (`extra`: the
  teacher's step count)."""
  compiled = sample.lower(params, tokenizer_params, labels, jax.random.key(0), *extra).compile()
  row = _timed_row(compiled, lambda i: compiled(params, tokenizer_params, labels, jax.random.key(i), *extra), steps,
                   labels.shape[0], device)
  row.update(name=name, devices=1)
  return row


def accelerator_suite(config, batch_sizes: list[int], teacher_steps: list[int], sample_batch: int,
                      steps: int) -> list[dict]:
  """FPD step rows (one per batch size, smallest first), then teacher and student sampling rows, on device 0."""
  cfg = config.distill
  for b in batch_sizes:
    if b <= 0 or b % cfg.samples_per_group:
      raise UserError(f'--batch_sizes: {b} is not a positive multiple of distill.samples_per_group '
                      f'({cfg.samples_per_group}).')
  if min(teacher_steps, default=1) < 1 or sample_batch < 1:
    raise UserError('--teacher_steps and --sample_batch must be positive.')
  device = jax.devices()[0]
  dtype = cfg.get('compute_dtype', 'float32')
  with jax.default_device(device):
    frozen = random_frozen_params(config)
  rows = []
  for b in sorted(batch_sizes):
    sized = config.copy_and_resolve_references()
    sized.distill.groups_per_batch = b // cfg.samples_per_group
    rows.append({**step_row(sized, frozen, [device], 1, steps), 'dtype': dtype})
    _progress(rows[-1])
  models = distill.build_models(config, features=None)  # Teacher and tokenizer in the step's compute dtype.
  grid = build.token_grid(config)
  labels = jax.device_put(jnp.arange(sample_batch, dtype=jnp.int32) % config.data.num_classes, device)
  teacher_sample = sampling.teacher_image_sampler(models.teacher, models.tokenizer, grid, config)
  samplers = [(f'teacher_{t}step', teacher_sample, (t,)) for t in teacher_steps]
  samplers.append(('student_1step', sampling.student_image_sampler(models.teacher, models.tokenizer, grid, cfg), ()))
  for name, sample, extra in samplers:
    rows.append({**sampler_row(name, sample, frozen['teacher'], frozen['tokenizer'], labels, steps, device, extra),
                 'dtype': dtype})
    _progress(rows[-1])
  return rows


def _progress(row: dict) -> None:
  print(f'{row["name"]} batch {row["batch_size"]}: {row["ms"]:.1f} ms, {row["images_per_sec"]:.1f} images/s',
        flush=True)


def table(rows: list[dict], cols: tuple[str, ...]) -> str:
  """Markdown table of `cols` (floats with 2 decimals, missing values as '-')."""
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in rows:
    cells = [f'{r[c]:.2f}' if isinstance(r.get(c), float) else str(r[c]) if r.get(c) is not None else '-'
             for c in cols]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


SCALING_COLS = ('devices', 'device_kind', 'mesh', 'batch_size', 'ms_per_step', 'steps_per_sec', 'images_per_sec')
ACCELERATOR_COLS = ('name', 'batch_size', 'dtype', 'ms', 'images_per_sec', 'peak_gib', 'peak_source',
                    'xla_temporaries_gib', 'tflop')
COMPARE_COLS = ('quantity', 'ours', 'plain', 'ours_over_plain')


def read_json_output(path: str) -> dict:
  """The last JSON object a program printed into `path` (other output lines before it are skipped)."""
  try:
    text = open(path).read()
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror}.') from e
  starts = [i for i in range(len(text)) if text[i] == '{' and (i == 0 or text[i - 1] == '\n')]
  for start in reversed(starts):
    try:
      return json.loads(text[start:])
    except json.JSONDecodeError:
      continue
  raise UserError(f'{path} holds no JSON object; pass the output of the reference step or of --suite=accelerator.')


def compare(ours: list[dict], anchors: list[dict]) -> list[dict]:
  """Our accelerator rows next to the plain reference figures of the same quantities (ours / plain)."""
  by_key = {(r['name'], r['batch_size']): r for r in ours}
  out = []

  def add(quantity, mine, plain):
    if mine is not None and plain:
      out.append({'quantity': quantity, 'ours': mine, 'plain': plain, 'ours_over_plain': mine / plain})

  for anchor in anchors:
    if 'step_ms' in anchor:  # fpd_step_anchor.py --batch=N
      row = by_key.get(('fpd_step', anchor['batch']))
      if row is None:
        raise UserError(f'the reference FPD step ran at batch {anchor["batch"]}, which --ours did not measure.')
      add(f'fpd_step b={anchor["batch"]} ms', row['ms'], anchor['step_ms'])
      add(f'fpd_step b={anchor["batch"]} images/s', row['images_per_sec'], anchor['img_per_s'])
      if row['peak_source'] == 'memory_stats':
        add(f'fpd_step b={anchor["batch"]} peak GiB', row['peak_gib'], anchor.get('peak_GiB'))
    elif 'student_1step_img_per_s' in anchor:  # gpu_anchor.py: ceilings from forward passes alone.
      for (name, batch), row in sorted(by_key.items()):
        if name.startswith(('teacher_', 'student_')):
          add(f'{name} b={batch} images/s', row['images_per_sec'], anchor.get(f'{name}_img_per_s'))
    else:
      raise UserError('an --anchors file is neither fpd_step_anchor.py nor gpu_anchor.py output.')
  return out


def _load_config(suite: str):
  if FLAGS.config is not None:
    return FLAGS.config
  return importlib.import_module(DEFAULT_CONFIGS[suite]).get_config()


def _define_flags():
  """Command-line flags (defined only when run as a program, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file (default: configs/demo.py for --suite=scaling, configs/imagenet.py for '
      '--suite=accelerator).', lock_config=True)
  flags.DEFINE_enum('suite', 'scaling', SUITES, 'scaling: the FPD step on 1, 2, 4, 8 devices; accelerator: FPD '
                    'step and sampling figures of one device; compare: --ours next to --anchors.')
  flags.DEFINE_list('devices', ['1', '2', '4', '8'], 'scaling: device counts to measure.')
  flags.DEFINE_integer('fsdp', 1, 'scaling: size of the fsdp mesh axis (the data axis takes the rest).')
  flags.DEFINE_enum('measure', 'train', ['train', 'sampling'], 'scaling: the FPD step (train) or teacher image '
                    'sampling of the evaluate stage (timed batches = --steps).')
  flags.DEFINE_integer('sampling_steps', 8, 'scaling --measure=sampling: teacher decoding steps.')
  flags.DEFINE_integer('steps', 10, 'Timed calls per row (after compiling and one warm-up call).')
  flags.DEFINE_list('batch_sizes', ['32', '64'], 'accelerator: FPD step batch sizes (multiples of '
                    'distill.samples_per_group).')
  flags.DEFINE_list('teacher_steps', ['8', '16'], 'accelerator: teacher sampling step counts.')
  flags.DEFINE_integer('sample_batch', 256, 'accelerator: images per sampling call.')
  flags.DEFINE_string('ours', None, 'compare: the --out JSON of a --suite=accelerator run.')
  flags.DEFINE_list('anchors', [], 'compare: files holding the JSON the plain reference steps printed.')
  flags.DEFINE_string('out', None, 'Optional JSON file for the rows.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  suite = FLAGS.suite
  config = _load_config(suite) if suite != 'compare' else None

  def run():
    if config is not None and config.distill.gan.enabled:
      raise UserError('the benchmark measures the FPD step without the GAN; pass '
                      '--config.distill.gan.enabled=False.')
    if suite == 'compare':
      if not FLAGS.ours or not FLAGS.anchors:
        raise UserError('--suite=compare needs --ours (a --suite=accelerator --out file) and --anchors.')
      rows = compare(read_json_output(FLAGS.ours)['rows'], [read_json_output(p) for p in FLAGS.anchors])
      print(table(rows, COMPARE_COLS))
      result = rows
    elif suite == 'accelerator':
      rows = accelerator_suite(config, _ints('batch_sizes'), _ints('teacher_steps'), FLAGS.sample_batch,
                               FLAGS.steps)
      print(f'{jax.devices()[0].device_kind}, jax {jax.__version__}')
      print(table(rows, ACCELERATOR_COLS))
      result = {'suite': suite, 'device_kind': jax.devices()[0].device_kind, 'platform': jax.devices()[0].platform,
                'jax': jax.__version__, 'rows': rows}
    else:
      counts = _ints('devices')
      if max(counts) > jax.device_count():
        raise UserError(f'--devices asks for {max(counts)} devices but {jax.device_count()} are available.')
      frozen = random_frozen_params(config)
      rows = []
      for n in counts:
        if FLAGS.measure == 'sampling':
          rows.append(sampling_row(config, frozen, jax.devices()[:n], FLAGS.sampling_steps, FLAGS.steps))
        else:
          rows.append(step_row(config, frozen, jax.devices()[:n], FLAGS.fsdp, FLAGS.steps))
        print(f'{n} device(s): {rows[-1]["steps_per_sec"]:.2f} steps/s, {rows[-1]["images_per_sec"]:.1f} '
              'images/s', flush=True)
      print(table(rows, SCALING_COLS))
      result = rows
    if FLAGS.out:
      with open(FLAGS.out, 'w') as f:
        json.dump(result, f, indent=1)

  cli.run_user_command(run, config.get('verbose', False) if config is not None else False)


def _ints(name: str) -> list[int]:
  values = FLAGS[name].value
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise UserError(f'--{name} takes integers, got {",".join(values)}.') from e


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
