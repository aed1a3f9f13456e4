r"""The paper's ablations on a demo, at equal budget: one distillation per variant, measured alike.

  python -m fpd_jax.ablations --config=configs/demo.py --workdir=runs/demo
  python -m fpd_jax.ablations --config=configs/t2i_demo.py --workdir=runs/t2i

Needs a workdir whose `data`, `tokenizer`, `teacher`, `eval_net` and `feature_net` stages (and the text demo's
`text_encoder`) are done (the demo command makes one; missing stages are run first). Each variant changes one
switch of `config.distill` and trains for the same `config.distill.num_steps` from the same teacher, into
`DIR/ablations/<variant>/`; the EMA student is then measured like `student_1step` of the report, by the demo's own
evaluation (`compare.TextTask` / `ClassTask`): FD, accuracy, precision and recall on the class demo, GenEval-lite
(overall and held-out) and FD on the text demo. Writes `DIR/ablations.json` and `DIR/ablations.md`, beside the
direction the paper reports for each switch (DESIGN.md §1.4, GenEval with a MaskGen-L teacher).
"""

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from fpd_jax import cli
from fpd_jax import compare
from fpd_jax import stages
from fpd_jax.errors import UserError
from fpd_jax.train import distill

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir with the trained teacher (see the module docstring).')
_ONLY = flags.DEFINE_list('only', None, 'Run only these variants (default: all).')
flags.mark_flags_as_required(['config', 'workdir'])

# name -> (overrides of config.distill, what the paper reports for that switch).
VARIANTS = {
    'fpd': ({}, 'the method (GenEval 0.43)'),
    'soft_embedding': ({'lift': 'soft'}, 'worse: 0.38 vs STE 0.43'),
    'refine_random': ({'refine_source': 'random'}, 'much worse: 0.22 vs refining the draft 0.43'),
    'pixel_space': ({'drift_space': 'pixels'}, 'much worse: 0.21 vs feature space 0.43'),
    'single_bandwidth': ({'temperatures': (0.05,)}, 'slightly worse: 0.41 vs multi-bandwidth 0.43'),
    'gan': ({'gan.enabled': True}, 'slightly better: +0.02'),
}
variant_config = distill.with_overrides


def markdown(rows: dict, num_steps: int, metrics=compare.ClassTask.metrics) -> str:
  """The table of `rows` ({variant: {metric: value, 'seconds', 'paper'}}), one column per metric."""
  lines = ['# FPD ablations on the demo', '',
           f'Each variant: {num_steps} distillation steps from the same teacher; EMA student, 1 step. Metrics of the '
           'demo\'s evaluation (FD in the evaluation network\'s space, lower is better).', '',
           '| variant | change | ' + ' | '.join(compare.LABELS[m] for m in metrics) + ' | seconds | paper (GenEval) |',
           '|---|---|' + '---|' * len(metrics) + '---|---|']
  for name, r in rows.items():
    change = ', '.join(f'{k}={v}' for k, v in VARIANTS[name][0].items()) or '-'
    values = ' | '.join(f'{r[m]:.3f}' for m in metrics)
    lines.append(f'| {name} | {change} | {values} | {r["seconds"]:.0f} | {r["paper"]} |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str, only=None) -> dict:
  """Trains and measures every variant; returns `{variant: metrics}` and writes the tables."""
  unknown = sorted(set(only or ()) - set(VARIANTS))
  if unknown:
    raise UserError(f'--only: unknown variant(s) {", ".join(unknown)}; choose from {", ".join(VARIANTS)}.')
  task_class = compare.task_of(config)
  stages.run_distill_inputs(config, workdir)
  task = task_class(config, workdir)
  rows = {}
  for name, (overrides, paper) in VARIANTS.items():
    if only and name not in only:
      continue
    cfg = variant_config(config, overrides)
    stage_dir = os.path.join(workdir, 'ablations', name)
    start = time.perf_counter()
    task.train(cfg, stage_dir, None)
    seconds = time.perf_counter() - start
    params, sample = task.student_params(os.path.join(stage_dir, 'export')), task.sampler(cfg)
    row = task.measure(lambda conds, rng: sample(params, conds, rng))
    rows[name] = {**row, 'seconds': seconds, 'overrides': overrides, 'paper': paper}
    print(f'[ablations] {name}: ' + ', '.join(f'{compare.LABELS[m]} {row[m]:.3f}' for m in task.metrics))
  with open(os.path.join(workdir, 'ablations.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(workdir, 'ablations.md'), 'w') as f:
    f.write(markdown(rows, config.distill.num_steps, task.metrics))
  return rows


def main(argv):
  del argv
  config = _CONFIG.value
  cli.run_user_command(lambda: run(config, _WORKDIR.value, _ONLY.value), config.get('verbose', False))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
