r"""Binding probe of a text-to-image demo teacher: does it draw the *second* named digit once the first is drawn?

  python -m fpd_jax.tools.binding_probe --workdir=runs/t2i [--num=160 --steps=16 --text_num=3000 --out=F.json]

For each family with two objects (two_object, position, color_attr), `--num` training-distribution prompts
"<X> ... <Y>" get a real test-digit canvas each (a layout the prompt admits), encoded by the workdir's tokenizer.
Two ways of decoding with the teacher (its config's sampler, `--steps` steps):

  infill    only the cell holding Y is masked (the rest of the real canvas is given) and decoded: the share of
            canvases whose cell then holds Y (`named`), X again (`copied_first`), nothing (`empty`) or another
            digit, and the GenEval-lite check of the whole canvas.
  generate  every token masked (the normal sampler): the check, the share of canvases where X and Y appear
            (`first_present`, `second_present`), digits per canvas, and for position the share of named digits
            drawn on the side the caption puts them (`on_its_side`; 0.5 at random).

Without decoding, `caption` is the teacher's masked-token loss on the same real canvases given their caption, the
caption with the words' roles exchanged (`roles_swapped`: the relation inverted for position, the two colours
swapped for colour attribution; for two objects the objects' order, which changes nothing a layout must satisfy),
the caption with one named digit changed (`digit_changed`), the empty caption, and the caption's word states with
the empty caption's pooled vector (`words_only`) or the reverse (`pooled_only`). A teacher that reads only which
words occur (a bag of words) loses no more with the roles swapped than with the true caption, though it does with a
digit changed; the two mixes show whether the caption reaches it through the words (joint attention) or through
the pooled vector (adaLN).

And one of the frozen text encoder alone:

  text      linear (ridge) probes of its pooled vector on `--text_num` training prompts of the family (a fifth held
            out): the first and the second named digit, the relation (position) and each object's colour
            (color_attr). High accuracies mean the words' roles reach the teacher and a failure to bind is its own.

A teacher that reads both words and the drawn cell fills in Y nearly always; one that draws each cell from the
caption alone, independently of the others, copies X about as often as it draws Y (and then draws "X and X" in
`generate`). Cells are read by the workdir's evaluation network (`fpd_jax/eval/geneval_lite.py`). Prints a table and
writes the numbers to `--out` (JSON) when given.
"""

import dataclasses
import json

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fpd_jax import cli
from fpd_jax import mask_schedule
from fpd_jax import sampling
from fpd_jax.data import t2i
from fpd_jax.errors import UserError
from fpd_jax.eval import geneval_lite
from fpd_jax.models import build
from fpd_jax.train import eval_net as eval_net_stage
from fpd_jax.train import t2i as t2i_stage
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage

FAMILIES = ('two_object', 'position', 'color_attr')


def load(config, workdir: str) -> dict:
  """What the probe reads from a workdir, loaded once for every family."""
  teacher, params = t2i_stage.load_teacher(config, workdir)
  vq, vq_params = tokenizer_stage.load(config, workdir)
  net, net_params, _ = eval_net_stage.load('eval_net', config.eval_net, config, workdir)
  return {'teacher': teacher, 'params': params, 'vq': vq, 'vq_params': vq_params, 'net': net,
          'net_params': net_params, 'bank': t2i_stage.bank(config, workdir, 'test')}


def probe(config, parts: dict, family: str, num: int, steps: int, seed: int = 0, batch_size: int = 80) -> dict:
  """{'caption': {...}, 'infill': {...}, 'generate': {...}} of the teacher in `parts` (`load`) on `num` prompts of
  a two-object `family`."""
  teacher, params, vq, vq_params, net, net_params = (
      parts[k] for k in ('teacher', 'params', 'vq', 'vq_params', 'net', 'net_params'))
  grid = build.token_grid(config)
  rng = np.random.default_rng([seed, FAMILIES.index(family)])
  prompts = [t2i.random_prompt(rng, family) for _ in range(num)]
  canvases = t2i.canvas_batch(parts['bank'], prompts, rng)
  tokens = tokenizer_stage.encode_images(vq, vq_params, canvases['image']).reshape(num, grid, grid)
  ids = t2i_stage.text_tokenizer(config).encode([p.caption for p in prompts])
  first, second = (np.array([p.digits[i] for p in prompts]) for i in (0, 1))
  second_cell = np.array([int(np.flatnonzero(d == y)[0]) for d, y in zip(canvases['digits'], second)])
  infill = tokens.copy()
  half = grid // 2
  for i, cell in enumerate(second_cell):
    row, col = t2i.cell_position(cell)
    infill[i, row * half:(row + 1) * half, col * half:(col + 1) * half] = teacher.mask_id
  settings = sampling.decode_settings(config)
  decode = jax.jit(lambda p, cond, key, init: sampling.iterative_decode(
      teacher, p, cond, key, num_tokens=grid * grid, num_steps=steps, init_tokens=init, **settings))

  def read(init):
    out = [decode(params, jnp.asarray(ids[s:s + batch_size]), jax.random.fold_in(jax.random.key(seed), s),
                  jnp.asarray(init[s:s + batch_size].reshape(-1, grid * grid))) for s in range(0, num, batch_size)]
    images = sampling.decode_tokens(vq, vq_params, jnp.concatenate(out), grid)
    digits, colours = geneval_lite.detect(net, net_params, np.asarray(images))
    check = float(np.mean([geneval_lite.check(p, d, c) for p, d, c in zip(prompts, digits, colours)]))
    return digits, check

  encode = t2i_stage.text_tokenizer(config).encode
  result = {'caption': caption_sensitivity(
      teacher, params, tokens.reshape(num, -1), seed, config.teacher.mask_schedule, true=ids,
      roles_swapped=encode([swap_roles(p).caption for p in prompts]),
      digit_changed=encode([change_digit(p, rng).caption for p in prompts]))}
  digits, check = read(infill)
  filled = digits[np.arange(num), second_cell]
  result['infill'] = {'check': check, 'named': float(np.mean(filled == second)),
                      'copied_first': float(np.mean(filled == first)), 'empty': float(np.mean(filled == t2i.EMPTY))}
  digits, check = read(np.full_like(tokens, teacher.mask_id))
  result['generate'] = {'check': check, 'first_present': float(np.mean((digits == first[:, None]).any(1))),
                        'second_present': float(np.mean((digits == second[:, None]).any(1))),
                        'digits_per_canvas': float(np.mean((digits != t2i.EMPTY).sum(1)))}
  if family == 'position':
    result['generate']['on_its_side'] = on_its_side(prompts, digits)
  return result


def swap_roles(prompt: t2i.Prompt) -> t2i.Prompt:
  """`prompt` with its words' roles exchanged: the relation inverted (position), the two colours swapped (colour
  attribution; the same caption when both are alike), the two objects in the other order (two objects)."""
  if prompt.family == 'position':
    return dataclasses.replace(prompt, relation=t2i.INVERSE[prompt.relation])
  if prompt.family == 'color_attr':
    return dataclasses.replace(prompt, colours=prompt.colours[::-1])
  return dataclasses.replace(prompt, digits=prompt.digits[::-1])


def change_digit(prompt: t2i.Prompt, rng: np.random.Generator) -> t2i.Prompt:
  """`prompt` with one of its named digits (at random) replaced by a digit it does not name."""
  digits = list(prompt.digits)
  digits[rng.integers(len(digits))] = int(rng.choice([d for d in range(10) if d not in prompt.digits]))
  return dataclasses.replace(prompt, digits=tuple(digits))


def caption_sensitivity(teacher, params, tokens: np.ndarray, seed: int, schedule: str = 'arccos', draws: int = 4,
                        **captions: np.ndarray) -> dict:
  """The teacher's masked-token loss (training masks of `schedule`, no smoothing; the same `draws` masks for every
  condition) on real canvases `tokens [B, N]` given each of `captions` (name: ids [B, L]; the first is the canvases'
  own), the empty caption (`empty`), and two mixes that tell which path the caption takes into the generator: the
  first caption's word states with the empty caption's pooled vector (`words_only`) and the reverse
  (`pooled_only`)."""
  (name, ids), encode = next(iter(captions.items())), lambda c: teacher.encode_text(jnp.asarray(c))
  conditions = {k: encode(c) for k, c in captions.items()}
  conditions['empty'] = encode(teacher.conditioner.null(jnp.asarray(ids)))
  conditions['words_only'] = (conditions[name][0], conditions['empty'][1])
  conditions['pooled_only'] = (conditions['empty'][0], conditions[name][1])
  aesthetic = jnp.full((len(tokens),), teacher.aesthetic_score, jnp.float32)
  tokens = jnp.asarray(tokens, jnp.int32)

  @jax.jit
  def loss(text_states, text_pooled, key):
    inputs, mask = mask_schedule.mask_tokens(key, tokens, teacher.mask_id, schedule)
    logits = teacher.net.apply({'params': params}, inputs, text_states, text_pooled, aesthetic)
    return teacher_stage.masked_cross_entropy(logits, tokens, mask, teacher.codebook_size)

  return {k: float(np.mean([loss(*c, jax.random.key(seed + i)) for i in range(draws)]))
          for k, c in conditions.items()}


def on_its_side(prompts: list, digits: np.ndarray) -> float | None:
  """Share of the named digits drawn on the side their position caption puts them (the first-named digit left of,
  right of, above or below, the second on the other side), over every cell holding one: 0.5 when sides are random;
  None when no cell holds one."""
  hits = []
  for p, cells in zip(prompts, digits):
    for cell, d in enumerate(cells):
      first_side = t2i.relation_holds(p.relation, cell, 3 - cell)  # On the relation's side of the opposite corner.
      if d == p.digits[0]:
        hits.append(first_side)
      elif d == p.digits[1]:
        hits.append(not first_side)
  return float(np.mean(hits)) if hits else None


def ridge_accuracy(features: np.ndarray, labels: np.ndarray, num_classes: int, ridge: float = 1e-2) -> float:
  """Accuracy on the last fifth of rows of a one-vs-rest ridge regression (with bias) fitted on the rest."""
  x = np.c_[np.asarray(features, np.float64), np.ones(len(features))]
  y = np.eye(num_classes)[labels]
  cut = len(x) * 4 // 5
  w = np.linalg.solve(x[:cut].T @ x[:cut] + ridge * np.eye(x.shape[1]), x[:cut].T @ y[:cut])
  return float(np.mean((x[cut:] @ w).argmax(1) == labels[cut:]))


def text_probe(config, parts: dict, family: str, num: int, seed: int = 0) -> dict:
  """Held-out accuracies of linear probes of the frozen text encoder's pooled vector (see the module docstring)."""
  rng = np.random.default_rng([seed, 100 + FAMILIES.index(family)])
  prompts = [t2i.random_prompt(rng, family) for _ in range(num)]
  _, pooled = parts['teacher'].encode_text(jnp.asarray(
      t2i_stage.text_tokenizer(config).encode([p.caption for p in prompts])))
  targets = {'first': ([p.digits[0] for p in prompts], 10), 'second': ([p.digits[1] for p in prompts], 10)}
  if family == 'position':
    targets['relation'] = ([t2i.RELATIONS.index(p.relation) for p in prompts], len(t2i.RELATIONS))
  if family == 'color_attr':
    for i, name in enumerate(('first_colour', 'second_colour')):
      targets[name] = ([p.colours[i] for p in prompts], len(t2i.PALETTE))
  pooled = np.asarray(pooled)
  return {k: ridge_accuracy(pooled, np.array(labels), n) for k, (labels, n) in targets.items()}


def run(workdir: str, num: int, steps: int, seed: int, families: list[str], out: str | None = None,
        text_num: int = 3000) -> dict:
  """The probe of every family in `families`; prints a table, writes JSON to `out`."""
  unknown = [f for f in families if f not in FAMILIES]
  if unknown or not families:
    raise UserError(f'--families={",".join(families)}: choose among {",".join(FAMILIES)}.')
  if num <= 0 or steps <= 0 or (text_num and text_num < 10):
    raise UserError(f'--num and --steps must be > 0 and --text_num 0 (no text probe) or >= 10 (got {num}, {steps}, '
                    f'{text_num}).')
  config = t2i_stage.demo_workdir_config(workdir, 'teacher', 'the teacher',
                                        'the probe needs its teacher, tokenizer and evaluation network')
  parts = load(config, workdir)
  results = {f: probe(config, parts, f, num, steps, seed) for f in families}
  for f in families if text_num else ():
    results[f]['text'] = text_probe(config, parts, f, text_num, seed)
  print(f'{"family":<12} | infill: check  second  copied first  empty | generate: check  first  second  digits')
  for f, r in results.items():
    i, g = r['infill'], r['generate']
    print(f'{f:<12} | {i["check"]:13.3f} {i["named"]:7.3f} {i["copied_first"]:13.3f} {i["empty"]:6.3f} | '
          f'{g["check"]:15.3f} {g["first_present"]:6.3f} {g["second_present"]:7.3f} {g["digits_per_canvas"]:7.2f}')
  names = ('true', 'roles_swapped', 'digit_changed', 'empty', 'words_only', 'pooled_only')
  print(f'{"family":<12} | teacher loss on real canvases given the caption: ' + '  '.join(names))
  for f, r in results.items():
    print(f'{f:<12} | {"":47}' + '  '.join(f'{r["caption"][n]:{len(n)}.3f}' for n in names))
  if 'position' in results:
    side = results['position']['generate']['on_its_side']
    print(f'position     | named digits drawn on their side: {"none drawn" if side is None else f"{side:.3f}"} '
          '(0.5 = at random)')
  for f, r in results.items():
    if 'text' in r:
      print(f'{f:<12} | text encoder, linear probes of the pooled vector: '
            + ', '.join(f'{k} {v:.3f}' for k, v in r['text'].items()))
  if out:
    with open(out, 'w') as f:
      json.dump({'num': num, 'steps': steps, 'seed': seed, 'text_num': text_num, 'families': results}, f, indent=1)
  return results


def _flags() -> dict:
  return {'workdir': flags.DEFINE_string('workdir', None, 'Workdir of a finished configs/t2i_demo.py run.'),
          'num': flags.DEFINE_integer('num', 160, 'Prompts (and canvases) per family.'),
          'steps': flags.DEFINE_integer('steps', 16, 'Decoding steps of the teacher.'),
          'seed': flags.DEFINE_integer('seed', 0, 'Seed of the prompts, canvases and sampling.'),
          'families': flags.DEFINE_list('families', list(FAMILIES), 'Families to probe.'),
          'text_num': flags.DEFINE_integer('text_num', 3000, 'Prompts per family of the text-encoder probes '
                                           '(0 = skip them).'),
          'out': flags.DEFINE_string('out', None, 'Optional JSON file for the numbers.')}


if __name__ == '__main__':
  cli.run_tool(_flags, lambda v: run(v['workdir'], v['num'], v['steps'], v['seed'], v['families'], v['out'],
                                         v['text_num']),
               required=['workdir'])
