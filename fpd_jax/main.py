r"""Runs the configured pipeline stages in order.

  python -m fpd_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m fpd_jax.main --config=configs/demo.py:tiny --workdir=/tmp/tiny --config.teacher.num_steps=10

Each stage writes `DIR/<stage>/` (Orbax checkpoints, `metrics.jsonl`, an export) and finally `done.json`. A rerun
skips finished stages and resumes an interrupted one from its latest checkpoint. The report is `DIR/report.json`,
`DIR/report.md` and `DIR/samples/*.png`.
"""

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from fpd_jax import cli
from fpd_jax import stages
from fpd_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py[:tiny].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, samples and the report.')
flags.mark_flags_as_required(['config', 'workdir'])


def run_pipeline(config, workdir: str) -> dict:
  """Runs every stage of `config.stages` not yet done; returns `{stage: seconds}`."""
  stages.validate(config)
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise UserError(f'workdir {workdir} is not writable; pass another --workdir.')
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
    summary = stages.STAGES[name](config, workdir) or {}
    timings[name] = time.perf_counter() - start
    os.makedirs(os.path.dirname(done_path), exist_ok=True)
    with open(done_path, 'w') as f:
      json.dump({'seconds': timings[name], **summary}, f, indent=1)
    print(f'[{name}] done in {timings[name]:.1f} s')
  stages.finish(workdir, timings)
  return timings


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  cli.run_user_command(lambda: run_pipeline(config, _WORKDIR.value), config.get('verbose', False))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
