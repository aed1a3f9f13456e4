"""`DIR/report.json` and `DIR/report.md`: the demo's machine-readable results and the same as tables."""

import json
import os

import jax

MODEL_COLUMNS = ('steps', 'fd', 'fid', 'inception_score', 'clip_score', 'accuracy', 'precision', 'recall',
                 'images_per_sec', 'num_samples')


def _fmt(v) -> str:
  if isinstance(v, float):
    return f'{v:.1f}' if abs(v) >= 100 else f'{v:.4g}'
  return '' if v is None else str(v)


def markdown(result: dict) -> str:
  """The report as Markdown tables."""
  rows = result.get('models', {})
  columns = [c for c in MODEL_COLUMNS if any(c in row for row in rows.values())]
  if 'fid' in columns:
    intro = (f'Inception FID against {result.get("reference", {}).get("source")} (lower is better) and Inception '
             'Score (when the weights hold a classifier).')
  elif 'clip_score' in result:
    clip = result['clip_score']
    intro = (f'Text-to-image: CLIP score ({clip.get("definition")}; higher is better) with the CLIP vision tower of '
             f'{clip.get("vision_tower")}, on {clip.get("images_per_prompt")} images of each of the '
             f'{clip.get("num_prompts")} prompts of {clip.get("prompts_file")}.')
  elif 'real_canvases' in result:
    intro = ('Text-to-image: GenEval-lite (exact checks per prompt, table below) and FD vs real test-digit canvases '
             'of the same prompts in the evaluation network\'s features (lower is better).')
  else:
    ref = result.get('reference', {})
    intro = (f'Quality in the feature space of the evaluation network (FD vs the reference, '
             f'{ref.get("num_images")} real digits disjoint from real_data: lower is better; accuracy: the '
             'evaluation network agrees with the requested class; k-NN precision/recall against as many reference '
             'digits as samples).')
  lines = ['# fpd_jax report', '', intro + ' images/s: sampling + decoding after compilation.', '',
           '| model | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
  for name, row in rows.items():
    lines.append(f'| {name} | ' + ' | '.join(_fmt(row.get(c)) for c in columns) + ' |')
  lines += _geneval_lines(result)
  if 'real_data' in result:
    real = result['real_data']
    lines += ['', f'real_data: {real["num_samples"]} held-out real digits (test first, then train; class-balanced), '
              f'measured like a model: FD {_fmt(real["fd"])}, accuracy {_fmt(real.get("accuracy"))}, precision '
              f'{_fmt(real["precision"])}, recall {_fmt(real["recall"])}.']
  for section in ('tokenizer', 'eval_net', 'timings_s'):
    if section in result:
      lines += ['', f'## {section}', '', '| key | value |', '|---|---|']
      lines += [f'| {k} | {_fmt(v)} |' for k, v in result[section].items()]
  if 'wall_clock_s' in result:
    devices = result.get('devices')
    on = f' on {devices["count"]} {devices["kind"]} device(s)' if devices else ''
    lines += ['', f'Wall clock of the run (stages may overlap){on}: {_fmt(result["wall_clock_s"])} s.']
  return '\n'.join(lines) + '\n'


def _geneval_lines(result: dict) -> list[str]:
  """The text pipeline's GenEval-lite table (per task, overall, held-out overall), when the rows have one."""
  rows = {name: row['geneval_lite'] for name, row in result.get('models', {}).items() if 'geneval_lite' in row}
  if 'real_canvases' in result:
    rows['real test-digit canvases'] = result['real_canvases']['geneval_lite']
  if 'tokenizer_reconstructions' in result:
    recon = result['tokenizer_reconstructions']
    rows[f'real canvases through the tokenizer (FD {_fmt(recon["fd"])})'] = recon['geneval_lite']
  if not rows:
    return []
  keys = list(next(iter(rows.values())))
  lines = ['', '## GenEval-lite', '', '| model | ' + ' | '.join(keys) + ' |', '|---' * (len(keys) + 1) + '|']
  return lines + [f'| {name} | ' + ' | '.join(_fmt(r.get(k)) for k in keys) + ' |' for name, r in rows.items()]


def write(workdir: str, result: dict) -> None:
  """Writes report.json and report.md (atomically: a reader never sees a half-written file); process 0 only."""
  if jax.process_index():
    return
  for name, text in (('report.json', json.dumps(result, indent=1)), ('report.md', markdown(result))):
    path = os.path.join(workdir, name)
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)


def add_timings(workdir: str, timings: dict, wall_clock: float, devices: dict | None = None) -> None:
  """Adds `timings_s` (seconds per stage; stages may overlap), `wall_clock_s` (seconds the command that ran
  the last stages took, skipped stages excluded) and `devices` (what they ran on) to an existing report."""
  path = os.path.join(workdir, 'report.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    result = json.load(f)
  result['timings_s'] = timings
  result['wall_clock_s'] = wall_clock
  if devices:
    result['devices'] = devices
  write(workdir, result)
