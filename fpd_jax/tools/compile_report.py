r"""Compiles the configured distill step (FPD or Di[M]O: `distill.method`) without running it; reports its cost.

  python -m fpd_jax.tools.compile_report --config=configs/imagenet.py:gpu
  python -m fpd_jax.tools.compile_report --config=configs/imagenet.py:gpu --config.mesh.fsdp=8 --batch_sizes=32,64
  python -m fpd_jax.tools.compile_report --config=configs/t2i.py --batch_sizes=32,64   # MaskGen-L text-to-image
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m fpd_jax.tools.compile_report \
      --config=configs/imagenet.py --config.mesh.fsdp=8 --batch_sizes=64,128   # a v5e-8-sized mesh, on a CPU

Nothing is loaded or allocated: the teacher, tokenizer and feature encoder are shapes (`jax.eval_shape` with
random-init shapes, which are those of the imported weights), so users can pick a batch size and mesh before
renting chips. Per batch size it prints per-device memory of the compiled step (arguments = state + frozen
parameters + batch, outputs, temporaries, and their sum minus the donated state aliased into the outputs) and the
FLOPs per step reported by XLA's cost analysis (per device, for the SPMD-partitioned program). On fake CPU
devices the figures are XLA:CPU's; the same command on the target accelerator gives that backend's.
"""

import json
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from fpd_jax import cli
from fpd_jax import sharding
from fpd_jax.errors import UserError
from fpd_jax.train import distill
from fpd_jax.train import maskgen as maskgen_stage

GIB = 2 ** 30


def compile_step(config, batch_size: int, partitioner: sharding.Partitioner, frozen=None, train=None) -> dict:
  """Lowers and compiles the configured distill step (FPD or Di[M]O) for `batch_size` on the partitioner's mesh;
  returns its figures. `frozen`: the frozen parameters (or their shapes); default: shapes of those the config
  names, loaded nowhere (imported or random weights). `train`: the `distill.Trainer` to compile (default: the
  config's; the text demo passes its own, whose teacher holds the trained text encoder)."""
  config = config.copy_and_resolve_references()
  cfg = config.distill
  if batch_size % cfg.samples_per_group:
    raise UserError(f'batch size {batch_size} is not a multiple of distill.samples_per_group '
                    f'({cfg.samples_per_group}).')
  if batch_size % partitioner.data_parallel:
    raise UserError(f'batch size {batch_size} is not divisible by the {partitioner.data_parallel} devices the batch '
                    'is split over.')
  cfg.groups_per_batch = batch_size // cfg.samples_per_group
  pipeline = maskgen_stage if config.get('task') == 'maskgen' else distill  # The released text-to-image teacher.
  train = train or pipeline.trainer(config)
  if frozen is None:
    frozen = jax.eval_shape(lambda: pipeline.load_frozen_params(config, workdir=''))
  frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
  state = jax.eval_shape(train.init_state, frozen['teacher'])
  state, frozen = partitioner.abstract(state), partitioner.abstract(frozen)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=partitioner.batch_sharding),
                       distill.example_batch(config))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=partitioner.replicated)
  start = time.perf_counter()
  lowered = partitioner.jit_step(train.step, state, frozen).lower(state, frozen, batch, rng)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  row = {'batch_size': batch_size, 'devices': partitioner.mesh.size,
         'mesh': dict(zip(partitioner.mesh.axis_names, partitioner.mesh.devices.shape)),
         'compile_s': round(seconds, 1), 'flops_per_step': flops(compiled)}
  row.update(memory(compiled))
  return row


def flops(compiled) -> float:
  """FLOPs of one call of a compiled function by XLA's cost analysis (per device; NaN where XLA gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


def memory(compiled) -> dict:
  """Per-device memory of a compiled function by XLA's buffer assignment, in GiB: arguments, outputs,
  temporaries, donated arguments aliased into outputs, and total = arguments + outputs + temporaries - aliased
  (what the call needs at its peak). Empty where the backend gives no analysis."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temps, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  return {'arguments_gib': args / GIB, 'outputs_gib': outs / GIB, 'temporaries_gib': temps / GIB,
          'aliased_gib': alias / GIB, 'total_gib': (args + outs + temps - alias) / GIB}


def table(rows: list[dict]) -> str:
  """The rows as a Markdown table."""
  cols = ('devices', 'mesh', 'batch_size', 'arguments_gib', 'outputs_gib', 'temporaries_gib', 'total_gib',
          'flops_per_step', 'compile_s')
  lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for r in rows:
    cells = []
    for c in cols:
      v = r.get(c, '')
      if c == 'mesh':
        v = 'x'.join(f'{k}={n}' for k, n in v.items())
      elif c == 'flops_per_step':
        v = f'{v / 1e12:.2f} T'
      elif isinstance(v, float):
        v = f'{v:.2f}'
      cells.append(str(v))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _define_flags():
  """Command-line flags (defined only when run as a program, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/imagenet.py:gpu.', lock_config=True)
  flags.DEFINE_list('batch_sizes', [], 'Global batch sizes to compile (default: the config\'s). Each must be a '
                    'multiple of distill.samples_per_group and of the data-parallel size.')
  flags.DEFINE_string('out', None, 'Optional JSON file for the rows.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = distill.with_random_weights(flags.FLAGS.config)

  def run():
    partitioner = sharding.Partitioner.from_config(config)
    sizes = [int(b) for b in flags.FLAGS.batch_sizes] or [distill.batch_size(config.distill)]
    print(f'{jax.device_count()} x {jax.devices()[0].device_kind}; mesh '
          f'{dict(zip(partitioner.mesh.axis_names, partitioner.mesh.devices.shape))}; compiling the FPD step...')
    rows = [compile_step(config, b, partitioner) for b in sizes]
    print(table(rows))
    if flags.FLAGS.out:
      with open(flags.FLAGS.out, 'w') as f:
        json.dump(rows, f, indent=1)

  cli.run_user_command(run, config.get('verbose', False))


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
