r"""FPD vs Di[M]O across distillation seeds, at equal student steps and at equal wall-clock, on either demo.

  python -m fpd_jax.compare --config=configs/demo.py --workdir=runs/demo --seeds=3,4,5
  python -m fpd_jax.compare --config=configs/demo.py --workdir=runs/demo --seeds=3,4,5 --tune
  python -m fpd_jax.compare --config=configs/demo.py --workdir=runs/demo --seeds=3,4,5 --budgets=steps   # no time runs
  python -m fpd_jax.compare --config=configs/t2i_demo.py --workdir=runs/t2i --seeds=3,4,5   # the text demo

Uses the teacher, tokenizer, eval_net and feature_net (and the text demo's text encoder) of the workdir (missing
stages are run first). For each method (`config.distill.method` = 'fpd' or 'dimo') and each distillation seed s
(`config.distill.seed`: only the distill stage's randomness changes, the teacher is the same) it trains a student
into `DIR/compare/<method>_<budget>_seed<s>/`:

- budget `steps`: `config.distill.num_steps` student steps for both methods;
- budget `time`: the slower method's wall-clock of those steps (seconds/step measured on the `steps` runs, mean
  over seeds) given to the faster method as more steps; the slower method's `time` run is its `steps` run (a link).
  Di[M]O's schedule is constant after warmup, so its `time` run continues its `steps` run (`CONTINUABLE`).

Up to `config.compare.concurrent_runs` runs train at once (threads; on the 2-core demo two runs finish sooner
than one after the other; one at a time on several devices, see `stages.concurrent_slots`), so seconds per step
are measured with that many runs sharing the machine, every method alike. Finished runs are skipped (rerunning
resumes). Every student is measured by the demo's own evaluation: on the class demo FD, accuracy, precision and
recall of `config.evaluate.num_samples` samples; on the text demo GenEval-lite (overall and on held-out
combinations) and FD of the fixed evaluation prompts. EMA snapshots taken every `num_steps / compare.snapshots`
steps are measured with `compare.curve_samples` samples for the FD-vs-time plot. Costs per method come from the
compiled step (XLA memory and cost analysis), the trained parameter count and the measured images/s. Writes
`DIR/compare.json`, `DIR/compare.md` and `DIR/compare.png`.

`--tune`: each method first tries the settings of `config.compare.tune_fpd` / `tune_dimo` (<= 4 each, overrides
of `config.distill`) on seeds `config.compare.tune_seeds` at the `steps` budget, keeps the one of best mean
`config.compare.select_by` (FD: lowest; GenEval-lite: highest), and the table reports `--seeds` with it (runs
`<method>_tune<i>_seed<s>`, then `<method>_<budget>_set<i>_seed<s>`, or the untuned run names when the chosen
setting leaves `config.distill` as it is).
"""

import ast
import json
import os
import shutil
import threading
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
from tqdm import tqdm

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import cli
from fpd_jax import sampling
from fpd_jax import sharding
from fpd_jax import stages
from fpd_jax.errors import UserError
from fpd_jax.eval import evaluate
from fpd_jax.eval import plot
from fpd_jax.models import build
from fpd_jax.tools import compile_report
from fpd_jax.train import distill
from fpd_jax.data import t2i as t2i_data
from fpd_jax.train import t2i as t2i_stage
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage

METHODS = ('fpd', 'dimo')
BUDGETS = ('steps', 'time')
LOWER_IS_BETTER = ('fd',)  # Metrics where less is better (the others: more is better).
LABELS = {'fd': 'FD', 'accuracy': 'accuracy', 'precision': 'precision', 'recall': 'recall',
          'geneval_lite': 'GenEval-lite', 'held_out': 'GenEval-lite held-out'}
MAX_SETTINGS = 4
# Methods whose learning-rate schedule does not depend on num_steps once the warmup fits in it (Di[M]O: constant
# after warmup), so a longer run is its shorter run continued: the `time` run resumes the `steps` run's last
# checkpoint (same batches and keys per step, the loop's exact resume) instead of training those steps again.
CONTINUABLE = ('dimo',)


def parse_setting(text: str) -> dict:
  """'learning_rate=1e-4,dimo.mask_fraction=0.5' -> {'learning_rate': 1e-4, 'dimo.mask_fraction': 0.5}."""
  out = {}
  for item in filter(None, (t.strip() for t in text.split(','))):
    key, sep, value = item.partition('=')
    if not sep:
      raise UserError(f'config.compare: setting {text!r}: {item!r} is not KEY=VALUE.')
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def method_config(config, method: str, overrides: dict, seed: int, num_steps: int | None = None):
  """The config of one run: `method`, the setting's `config.distill` overrides, the distill seed, the steps."""
  try:
    cfg = distill.with_overrides(config, {'method': method, 'seed': seed, **overrides})
  except (KeyError, AttributeError) as e:
    raise UserError(f'config.compare: unknown config.distill key in {overrides} ({e}); the config lists every '
                    'field.') from e
  with cfg.unlocked():
    if num_steps is not None:
      cfg.distill.num_steps = num_steps
    cfg.train.checkpoint_every = max(1, config.distill.num_steps // config.compare.snapshots)
  distill.validate(cfg)
  return cfg


class _Task:
  """What both demos' sides share: the one-step student sampler and the teacher's 1-step row (subclasses set
  `teacher`, `teacher_params`, `tokenizer`, `tokenizer_params`, `grid`, `config` and `measure`)."""

  def sampler(self, cfg):
    """`(params, conditions, rng) -> images` of the one-step student of `cfg.distill`'s generator settings."""
    sample = sampling.student_image_sampler(self.teacher, self.tokenizer, self.grid, cfg.distill)
    return lambda params, conds, rng: sample(params, self.tokenizer_params, conds, rng)

  def teacher_1step(self) -> dict:
    sample = sampling.teacher_image_sampler(self.teacher, self.tokenizer, self.grid, self.config)
    return self.measure(lambda conds, rng: sample(self.teacher_params, self.tokenizer_params, conds, rng, 1))


class ClassTask(_Task):
  """The class demo's side of a comparison: its teacher, the project's evaluator (FD, accuracy, precision, recall
  of `evaluate.num_samples` class-balanced samples) and its distill stage."""
  metrics = ('fd', 'accuracy', 'precision', 'recall')

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.evaluator = evaluate.Evaluator(config, workdir)
    self.num_samples = config.evaluate.num_samples  # Per student.
    self.tokenizer, self.tokenizer_params = tokenizer_stage.load(config, workdir)
    self.teacher, self.teacher_params = teacher_stage.load(config, workdir)
    self.grid = build.token_grid(config)
    self.rng = jax.random.key(config.seed + 100)
    self.partitioner = sharding.Partitioner.from_config(config)

  def train(self, cfg, stage_dir: str, on_checkpoint) -> None:
    distill.run(cfg, self.workdir, stage_dir=stage_dir, on_checkpoint=on_checkpoint)

  def student_params(self, export_dir: str):
    return distill.load_student(export_dir)[2]

  def measure(self, generate, num_samples: int | None = None) -> dict:
    """The metrics of `generate(labels, rng) -> images` (`num_samples` samples instead of the evaluator's)."""
    if num_samples is None:
      return self.evaluator.measure(generate, self.rng, self.partitioner)[0]
    small = self.config.copy_and_resolve_references()
    small.evaluate.num_samples = num_samples
    return evaluate.measure(small, self.evaluator.image_metrics, generate, self.rng, self.partitioner)[0]

  def compile_inputs(self, cfg) -> dict:
    return {'frozen': distill.load_frozen_params(cfg, self.workdir)}


class TextTask(_Task):
  """The text demo's side (`config.task = 't2i'`): the MaskGen teacher, GenEval-lite (overall and on held-out
  combinations) and FD of the fixed evaluation prompts (`t2i.TextEvaluator`); snapshot curves use
  `compare.curve_samples` images, as whole prompts per family."""
  metrics = ('geneval_lite', 'held_out', 'fd')

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.evaluator = t2i_stage.TextEvaluator(config, workdir)
    per_family = config.compare.curve_samples // (len(t2i_data.FAMILIES) * config.evaluate.images_per_prompt)
    self.curve_evaluator = t2i_stage.TextEvaluator(config, workdir, max(1, per_family))
    self.num_samples = len(self.evaluator.per_image)  # Per student.
    self.teacher, self.frozen = t2i_stage.distill_inputs(config, workdir)
    self.teacher_params = self.frozen['teacher']
    self.tokenizer, self.tokenizer_params = tokenizer_stage.load(config, workdir)
    self.grid = build.token_grid(config)
    self.rng = jax.random.key(config.seed + 100)

  def train(self, cfg, stage_dir: str, on_checkpoint) -> None:
    t2i_stage.run_distill(cfg, self.workdir, stage_dir=stage_dir, on_checkpoint=on_checkpoint)

  def student_params(self, export_dir: str):
    return t2i_stage.load_student(export_dir)[2]

  def measure(self, generate, num_samples: int | None = None) -> dict:
    evaluator = self.evaluator if num_samples is None else self.curve_evaluator
    row = evaluator.measure(generate, self.rng)[0]
    return {'geneval_lite': row['geneval_lite']['overall'], 'held_out': row['geneval_lite']['held_out_overall'],
            'fd': row['fd']}

  def compile_inputs(self, cfg) -> dict:
    return {'frozen': self.frozen, 'train': distill.trainer(cfg, teacher=self.teacher)}


TASKS = {'class': ClassTask, 't2i': TextTask}


def task_of(config):
  """The task class of `config.task`: the two demos are compared; anything else is refused with the fix named."""
  task = config.get('task', 'class')
  if task not in TASKS:
    raise UserError(f"config.task={task!r}: fpd_jax.compare and fpd_jax.ablations run the demos (task 'class' or "
                    "'t2i'); distil the released MaskGen-L with python -m fpd_jax.main --config=configs/t2i.py and "
                    "--config.distill.method=fpd or dimo.")
  return TASKS[task]


class Comparison:
  """Trains, measures and tabulates the runs of one workdir."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.root = os.path.join(workdir, 'compare')
    os.makedirs(self.root, exist_ok=True)
    self.task = task_of(config)(config, workdir)
    self.metrics = self.task.metrics
    self._samplers = {}
    self._lock = threading.Lock()  # Runs train and are measured in threads (`compare.concurrent_runs`).

  # ---- Training.
  def train(self, name: str, cfg) -> dict:
    """Trains run `name` (skipped when done), keeping EMA snapshots; returns its `done.json`."""
    run_dir = os.path.join(self.root, name)
    done_path = os.path.join(run_dir, 'done.json')
    if os.path.exists(done_path):
      with open(done_path) as f:
        return json.load(f)
    print(f'[compare] training {name} ({cfg.distill.num_steps} steps)')

    def snapshot(step, state):
      ckpt_lib.export(os.path.join(run_dir, 'snapshots', str(step)), state['ema_params'])

    start = time.perf_counter()
    self.task.train(cfg, run_dir, snapshot)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
    windows = [(r['step'], (r['step'] - prev) / r['steps_per_sec'])
               for prev, r in zip([0] + [r['step'] for r in rows[:-1]], rows)]
    steady = [sec / (step - prev) for (step, sec), prev in zip(windows[1:], [w[0] for w in windows[:-1]])]
    summary = {'method': cfg.distill.method, 'steps': cfg.distill.num_steps, 'seed': cfg.distill.seed,
               'wall_seconds': time.perf_counter() - start,
               'train_seconds': [[step, sec] for step, sec in zip([w[0] for w in windows],
                                                                   np.cumsum([w[1] for w in windows]).tolist())],
               # Median over logging windows after the first (which holds compilation).
               'seconds_per_step': float(np.median(steady or [windows[-1][1] / cfg.distill.num_steps]))}
    with open(done_path, 'w') as f:
      json.dump(summary, f, indent=1)
    return summary

  # ---- Measurement.
  def sampler(self, cfg):
    """A jitted one-step sampler per generator setting (compiled once, reused for every snapshot)."""
    settings = sampling.OneStepSettings.from_distill_config(cfg.distill)
    with self._lock:
      if settings not in self._samplers:
        self._samplers[settings] = self.task.sampler(cfg)
      return self._samplers[settings]

  def measure_params(self, cfg, params, num_samples: int | None = None) -> dict:
    sample = self.sampler(cfg)
    return self.task.measure(lambda conds, rng: sample(params, conds, rng), num_samples)

  def evaluate(self, name: str, cfg, summary: dict, curve: bool = True) -> dict:
    """The task's metrics of the run's export, and (`curve`) its FD curve over snapshots (cached)."""
    run_dir = os.path.join(self.root, name)
    path = os.path.join(run_dir, 'eval.json')
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    load = lambda d: ckpt_lib.load_export(d, self.task.teacher_params, f'snapshot {d}')
    row = self.measure_params(cfg, self.task.student_params(os.path.join(run_dir, 'export')))
    seconds = dict((int(s), t) for s, t in summary['train_seconds'])
    snaps = sorted(int(s) for s in os.listdir(os.path.join(run_dir, 'snapshots')) if s.isdigit()) if curve else []
    curve = []
    for step in tqdm(snaps, desc=f'snapshots {name}', disable=len(snaps) < 2):
      fd = self.measure_params(cfg, load(os.path.join(run_dir, 'snapshots', str(step))),
                               self.config.compare.curve_samples)['fd']
      curve.append({'step': step, 'train_seconds': _seconds_at(seconds, step), 'fd': fd})
    out = {**{k: row[k] for k in self.metrics}, 'steps': summary['steps'], 'seed': summary['seed'],
           'train_seconds': _seconds_at(seconds, summary['steps']), 'seconds_per_step': summary['seconds_per_step'],
           'curve': curve}
    with open(path, 'w') as f:
      json.dump(out, f, indent=1)
    return out

  def cost(self, cfg) -> dict:
    """Peak memory and FLOPs of the compiled step (XLA analyses) and the trained parameter count."""
    partitioner = sharding.Partitioner.from_config(cfg)
    row = compile_report.compile_step(cfg, distill.batch_size(cfg.distill), partitioner,
                                      **self.task.compile_inputs(cfg))
    return {'peak_memory_mib': row.get('total_gib', float('nan')) * 1024,
            'flops_per_step': row['flops_per_step'],
            'trained_params': distill.trained_parameter_count(cfg, self.task.teacher_params, self.task.teacher)}

  def train_and_evaluate(self, name: str, cfg, curve: bool = True) -> dict:
    return self.evaluate(name, cfg, self.train(name, cfg), curve)

  def run_all(self, jobs: dict, curve: bool = True) -> dict:
    """Trains and measures `jobs` ({name: cfg}), `compare.concurrent_runs` at a time; returns {name: eval}."""
    out = {}
    def one(name):
      out[name] = self.train_and_evaluate(name, jobs[name], curve)
    stages.run_concurrently(list(jobs), one, stages.concurrent_slots(self.config.compare.get('concurrent_runs', 1)))
    return out

  def teacher_1step(self) -> dict:
    row = self.task.teacher_1step()
    return {k: row[k] for k in self.metrics}


def continue_run(root: str, shorter: str, longer: str) -> None:
  """Starts run `root/longer` as a copy of the finished run `root/shorter` (checkpoints, snapshots, metrics, not its
  export or results), so that `Comparison.train` resumes it at its last step; a no-op when `longer` exists."""
  src, dst = os.path.join(root, shorter), os.path.join(root, longer)
  if os.path.lexists(dst):
    return
  tmp = dst + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp, ignore=shutil.ignore_patterns('done.json', 'eval.json', 'export', 'export_meta.json'))
  os.replace(tmp, dst)


def _seconds_at(seconds: dict, step: int) -> float:
  """Training seconds at `step` (linear between logged steps)."""
  known = sorted(seconds)
  return float(np.interp(step, [0] + known, [0.0] + [seconds[s] for s in known]))


def _stats(values) -> dict:
  values = [float(v) for v in values]
  return {'mean': float(np.mean(values)), 'std': float(np.std(values)), 'values': values}


def select_by(config, metrics) -> str:
  """The metric `--tune` chooses by (`config.compare.select_by`), checked against the task's metrics."""
  key = config.compare.get('select_by', 'fd')
  if key not in metrics:
    raise UserError(f'config.compare.select_by={key!r}; choose one of {list(metrics)}.')
  return key


def leaves_distill_as_is(config, method: str, overrides: dict) -> bool:
  """Whether `overrides` leave `config.distill` of `method` as the config has it (its runs are the untuned ones)."""
  return (method_config(config, method, overrides, 0).distill.to_dict() ==
          method_config(config, method, {}, 0).distill.to_dict())


def tune(comp: Comparison, config) -> tuple[dict, dict]:
  """Tries each method's settings on the tuning seeds; returns ({method: (index, overrides, run suffix)}, what was
  tried). The suffix of the report's run names is '' when the chosen overrides leave `config.distill` unchanged
  (its runs are the untuned ones, reused), else `_set<index>`.
  """
  settings = {m: [parse_setting(s) for s in config.compare[f'tune_{m}']] for m in METHODS}
  for method, rows in settings.items():
    if not 1 <= len(rows) <= MAX_SETTINGS:
      raise UserError(f'config.compare.tune_{method} must list 1 to {MAX_SETTINGS} settings (got {len(rows)}).')
  jobs = {f'{m}_tune{i}_seed{seed}': method_config(config, m, overrides, seed)
          for m in METHODS for i, overrides in enumerate(settings[m]) for seed in config.compare.tune_seeds}
  key = select_by(config, comp.metrics)
  evals = comp.run_all(jobs, curve=False)  # Only the final student's metric chooses.
  chosen, tried = {}, {}
  for method in METHODS:
    rows = []
    for i, overrides in enumerate(settings[method]):
      values = [evals[f'{method}_tune{i}_seed{seed}'][key] for seed in config.compare.tune_seeds]
      rows.append({'setting': i, 'overrides': overrides, key: _stats(values)})
      print(f'[compare] {method} setting {i} {overrides}: mean {LABELS[key]} {np.mean(values):.3f}')
    sign = 1 if key in LOWER_IS_BETTER else -1
    best = min(rows, key=lambda r: sign * r[key]['mean'])
    unchanged = leaves_distill_as_is(config, method, best['overrides'])
    chosen[method] = (best['setting'], best['overrides'], '' if unchanged else f'_set{best["setting"]}')
    tried[method] = rows
  return chosen, tried


def run(config, workdir: str, seeds: list[int], do_tune: bool = False, budgets=BUDGETS) -> dict:
  """The whole comparison (`budgets`: 'steps', and 'time' unless left out); returns what `compare.json` holds."""
  if not seeds:
    raise UserError('--seeds is empty; pass distillation seeds, e.g. --seeds=3,4,5.')
  select_by(config, task_of(config).metrics)  # A wrong task or metric fails before any stage runs.
  if 'steps' not in budgets or not set(budgets) <= set(BUDGETS):
    raise UserError(f'--budgets={",".join(budgets)}: choose steps or steps,time (the time budget is measured on '
                    'the steps runs).')
  if config.compare.snapshots < 1 or config.compare.curve_samples < 2:
    raise UserError('config.compare.snapshots must be >= 1 and config.compare.curve_samples >= 2.')
  stages.run_distill_inputs(config, workdir)
  comp = Comparison(config, workdir)
  chosen, tried = ({m: (None, {}, '') for m in METHODS}, None)
  if do_tune:
    chosen, tried = tune(comp, config)

  def name(method, budget, seed):
    return f'{method}_{budget}{chosen[method][2]}_seed{seed}'

  # Budget 1: equal student steps.
  runs = {(method, 'steps', seed): method_config(config, method, chosen[method][1], seed)
          for seed in seeds for method in METHODS}
  comp.run_all({name(*key): cfg for key, cfg in runs.items()})
  runs = {key: (cfg, comp.train(name(*key), cfg)) for key, cfg in runs.items()}  # Done: reads their summaries.
  # Budget 2: equal wall-clock (the slower method's time for num_steps, given to the faster one).
  per_step = {m: float(np.mean([runs[(m, 'steps', s)][1]['seconds_per_step'] for s in seeds])) for m in METHODS}
  budget_path = os.path.join(comp.root, 'time_budget.json')
  if 'time' not in budgets:
    time_budget = None
  elif os.path.exists(budget_path):  # Fixed once measured, so that a resumed comparison trains the same runs.
    with open(budget_path) as f:
      time_budget = json.load(f)
  else:
    slow = max(METHODS, key=lambda m: per_step[m])
    seconds = config.distill.num_steps * per_step[slow]
    time_budget = {'slower': slow, 'seconds': seconds,
                   'steps': {m: config.distill.num_steps if m == slow else max(1, round(seconds / per_step[m]))
                             for m in METHODS}}
    with open(budget_path, 'w') as f:
      json.dump(time_budget, f, indent=1)
  timed = {}
  for seed in (seeds if time_budget else ()):
    for method in METHODS:
      if method == time_budget['slower']:
        link = os.path.join(comp.root, name(method, 'time', seed))
        if not os.path.lexists(link):
          os.symlink(name(method, 'steps', seed), link)
        runs[(method, 'time', seed)] = runs[(method, 'steps', seed)]
        continue
      cfg = method_config(config, method, chosen[method][1], seed, time_budget['steps'][method])
      if method in CONTINUABLE and cfg.distill.dimo.warmup_steps < config.distill.num_steps:
        # Its `steps` run is the first num_steps of this one: train only the rest.
        continue_run(comp.root, name(method, 'steps', seed), name(method, 'time', seed))
      timed[(method, 'time', seed)] = cfg
  comp.run_all({name(*key): cfg for key, cfg in timed.items()})
  runs.update({key: (cfg, comp.train(name(*key), cfg)) for key, cfg in timed.items()})
  # Measurements.
  evals = {key: comp.evaluate(name(*key), cfg, summary) for key, (cfg, summary) in runs.items()}
  costs = {}
  for method in METHODS:
    cfg = runs[(method, 'steps', seeds[0])][0]
    costs[method] = {**comp.cost(cfg), 'seconds_per_step': per_step[method],
                     'images_per_sec': distill.batch_size(cfg.distill) / per_step[method]}
  results = {budget: {method: {'steps': time_budget['steps'][method] if budget == 'time' else
                               config.distill.num_steps,
                               **{k: _stats([evals[(method, budget, s)][k] for s in seeds]) for k in comp.metrics},
                               'train_seconds': _stats([evals[(method, budget, s)]['train_seconds'] for s in seeds])}
                      for method in METHODS} for budget in budgets}
  out = {'task': config.get('task', 'class'), 'metrics': list(comp.metrics), 'seeds': list(seeds),
         'select_by': select_by(config, comp.metrics), 'num_steps': config.distill.num_steps,
         'batch_size': distill.batch_size(config.distill), 'num_samples': comp.task.num_samples,
         'settings': {m: {'index': chosen[m][0], 'overrides': chosen[m][1], 'same_as_config': not chosen[m][2]}
                      for m in METHODS},
         'tuning': tried, 'time_budget': time_budget, 'cost': costs, 'results': results,
         'teacher_1step': comp.teacher_1step(),
         'runs': {name(*key): {'method': key[0], 'budget': key[1], **e} for key, e in evals.items()}}
  with open(os.path.join(workdir, 'compare.json'), 'w') as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(workdir, 'compare.md'), 'w') as f:
    f.write(markdown(out))
  series = {}
  longest = 'time' if time_budget else 'steps'
  for method in METHODS:  # FD vs training time, mean over seeds of the longer (time-budget) runs.
    curves = [evals[(method, longest, s)]['curve'] for s in seeds]
    n = min(len(c) for c in curves)
    series[method] = [(float(np.mean([c[i]['train_seconds'] for c in curves])),
                       float(np.mean([c[i]['fd'] for c in curves]))) for i in range(n)]
  plot.line_plot(os.path.join(workdir, 'compare.png'), series, title='FD vs training time (mean over seeds)',
                 xlabel='training seconds', ylabel=f'FD ({config.compare.curve_samples} samples)')
  return out


def markdown(out: dict) -> str:
  """The comparison as Markdown: one row per method and budget, then costs and the tuning tried."""
  pm = lambda s: f'{s["mean"]:.3f} ± {s["std"]:.3f}'
  metrics = out['metrics']
  t1 = out['teacher_1step']
  budget = out['time_budget']
  timed = (f'Equal wall-clock: {budget["seconds"]:.0f} s, the slower method ({budget["slower"]}) at '
           f'{out["num_steps"]} steps.' if budget else 'Equal wall-clock: not run (--budgets=steps).')
  teacher = ', '.join(f'{LABELS[k]} {t1[k]:.3f}' for k in metrics)
  lines = ['# FPD vs Di[M]O', '',
           f'Distillation seeds {out["seeds"]}, batch {out["batch_size"]}, {out["num_samples"]} samples per '
           f'student; mean ± std over seeds. {timed} Teacher 1 step: {teacher}.', '',
           '| method | budget | steps | ' + ' | '.join(LABELS[k] for k in metrics) +
           ' | train img/s | peak memory/step (MiB) | GFLOPs/step | trained params |',
           '|' + '---|' * (len(metrics) + 7)]
  for budget in out['results']:
    for method in METHODS:
      r, c = out['results'][budget][method], out['cost'][method]
      lines.append(f'| {method} | {budget} | {r["steps"]} | ' + ' | '.join(pm(r[k]) for k in metrics) +
                   f' | {c["images_per_sec"]:.1f} | {c["peak_memory_mib"]:.1f} | {c["flops_per_step"] / 1e9:.2f} | '
                   f'{c["trained_params"]:,} |')
  lines += ['', 'Settings (overrides of config.distill): ' +
            '; '.join(f'{m}: {s["overrides"] or "config defaults"}' for m, s in out['settings'].items())]
  if out['tuning']:
    key = out['select_by']
    best = 'lowest' if key in LOWER_IS_BETTER else 'highest'
    lines += ['', f'## Tuning (mean {LABELS[key]} over the tuning seeds; {best} chosen)', '',
              f'| method | setting | overrides | {LABELS[key]} |', '|---|---|---|---|']
    for method, rows in out['tuning'].items():
      for r in rows:
        lines.append(f'| {method} | {r["setting"]} | {r["overrides"]} | {pm(r[key])} |')
  return '\n'.join(lines) + '\n'


def _define_flags():
  """Command-line flags (defined only when run as a program, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Workdir with the trained teacher (see the module docstring).')
  flags.DEFINE_list('seeds', ['3', '4', '5'], 'Distillation seeds (config.distill.seed) to report.')
  flags.DEFINE_list('budgets', list(BUDGETS), 'steps: equal student steps; time: equal wall-clock too (more '
                    'runs for the faster method).')
  flags.DEFINE_bool('tune', False, 'First choose each method\'s setting among config.compare.tune_<method> by mean '
                    'FD over config.compare.tune_seeds.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config

  def go():
    try:
      seeds = [int(s) for s in flags.FLAGS.seeds]
    except ValueError as e:
      raise UserError(f'--seeds={",".join(flags.FLAGS.seeds)}: seeds must be integers, e.g. --seeds=3,4,5.') from e
    run(config, flags.FLAGS.workdir, seeds, flags.FLAGS.tune, tuple(flags.FLAGS.budgets))

  cli.run_user_command(go, config.get('verbose', False))


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
