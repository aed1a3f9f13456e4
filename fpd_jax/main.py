r"""Runs the configured pipeline stages in order.

  python -m fpd_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m fpd_jax.main --config=configs/demo.py:tiny --workdir=/tmp/tiny --config.teacher.num_steps=10

Each stage writes `DIR/<stage>/` (Orbax checkpoints, `metrics.jsonl`, an export) and finally `done.json`. A rerun
skips finished stages and resumes an interrupted one from its latest checkpoint. The report is `DIR/report.json`,
`DIR/report.md` and `DIR/samples/*.png`.

Devices: the mesh of `config.mesh` (sizes of the `data` and `fsdp` axes, partition rules) spans every device; with
`--config.distributed=True` (set by the `launch/` scripts) each process first joins the others through
`jax.distributed.initialize()`, and only process 0 writes reports, metrics and images.
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from fpd_jax import cli
from fpd_jax import stages
from fpd_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py[:tiny].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, samples and the report.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value

  def run():
    if config.get('distributed', False):
      cli.initialize_distributed(config.get('heartbeat_timeout_s', 100))
    try:
      stages.run_pipeline(config, _WORKDIR.value)
    except jax.errors.JaxRuntimeError as e:  # E.g. a collective whose peer process died.
      if jax.process_count() == 1:
        raise
      raise UserError(f'a computation of this {jax.process_count()}-process run failed ({cli.one_line(e)}); if '
                      'another process of the run stopped, stop every process and rerun the same command on all of '
                      'them to resume from the last checkpoints.') from e

  cli.run_user_command(run, config.get('verbose', False))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
