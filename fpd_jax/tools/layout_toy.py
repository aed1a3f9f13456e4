r"""Layout toy: can the text-to-image teacher's architecture bind words to cells at all, without the tokenizer?

  python -m fpd_jax.tools.layout_toy --workdir=runs/t2i [--steps=1500 --families=position --qk_norm=true
      --colours=false --seed=0 --batch_size=64 --out=F.json]

Each canvas becomes 4 tokens, one a cell (row-major): 0 = empty, else 1 + digit (with `--colours`, 1 + digit * 7 +
colour). A MaskGen generator with the workdir's teacher config (width, depth, heads, optimiser, masking schedule,
label smoothing, caption dropout; `--qk_norm` overrides its query/key RMSNorm) reads the workdir's frozen text encoder
and trains `--steps` steps (its learning-rate schedule spread over them) of `--batch_size` rows (default: the
teacher's) on training prompts of `--families` and layouts drawn as the demo's data draws them
(`fpd_jax.data.t2i.sample_layout`). It then decodes the evaluation prompts of those families (4 images each) in 1
and 4 steps (4 = one cell a step) with the config's sampler and scores the tokens with GenEval-lite's exact checks,
and prints its per-cell probabilities of the two named digits with every cell masked, for "a three to the left of
a five" and the inverted caption: a model that binds puts each digit on the side the caption names (0.5 and 0 on
the two columns), one that does not gives every cell the same probabilities.

The demo's real teacher draws each cell as 16 VQ tokens; this toy asks the same question of the same network with one
token a cell, so a failure here is the architecture's or the training's, not the tokenizer's. Measured on the demo's
seed-0 workdir (docs/t2i_experiments.md, Binding): with query/key norm it learns positions from position captions
alone (0.74-0.88 at 4 steps; the real teacher trained on them alone does not: 0.06, 0.23 at 4x the batch) or with one
other family (0.59-0.69), but not with colours in the tokens (0.32, 0.54) or more families in the mix (0.28-0.37) at
the demo's batch of 64; at 4x the batch it learns them under four families in two trainings of three (0.64, 0.31,
0.60), at 8x in the third too (0.78). Repeating a family in `--families` draws it more often in training. With each
cell's token repeated over its 16 positions of an 8x8 grid, as the real teacher's, it does not learn them from
position captions alone either, unless every row is masked by whole cells and a cell's tokens share one position row
(each cell one decision again; docs/t2i_experiments.md). Writes the numbers to `--out` (JSON) when given.
"""

import json

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fpd_jax import cli
from fpd_jax import conditioning as cond_lib
from fpd_jax import sampling
from fpd_jax.data import t2i
from fpd_jax.errors import UserError
from fpd_jax.eval import geneval_lite
from fpd_jax.models import maskgen
from fpd_jax.train import optim
from fpd_jax.train import t2i as t2i_stage
from fpd_jax.train import teacher as teacher_stage

NUM_COLOURS = len(t2i.PALETTE)
COLOUR_FAMILIES = ('colors', 'color_attr')
PROBE_CAPTIONS = ('a three to the left of a five', 'a five to the left of a three')


def tokens_per_digit(colours: bool) -> int:
  """Cell tokens of one digit: one per palette colour with `colours`, else one (digit d's start at 1 + d * this)."""
  return NUM_COLOURS if colours else 1


def layout_tokens(prompts: list, rng: np.random.Generator, colours: bool) -> np.ndarray:
  """One layout per prompt as 4 cell tokens `[B, 4]`: 0 empty, else 1 + digit (* 7 + colour with `colours`)."""
  rows = []
  for p in prompts:
    digits, cols = t2i.sample_layout(p, rng)
    code = 1 + digits * tokens_per_digit(colours) + (cols if colours else 0)
    rows.append(np.where(digits == t2i.EMPTY, 0, code))
  return np.stack(rows).astype(np.int32)


def cells_of_tokens(tokens: np.ndarray, colours: bool) -> tuple[np.ndarray, np.ndarray]:
  """(digits [B, 4] with EMPTY for empty cells, colours [B, 4]) of cell tokens (the inverse of `layout_tokens`)."""
  stride = tokens_per_digit(colours)
  digits = np.where(tokens == 0, t2i.EMPTY, (tokens - 1) // stride)
  return digits.astype(np.int32), np.where(tokens == 0, 0, (tokens - 1) % stride).astype(np.int32)


def toy_teacher_config(teacher: ml_collections.ConfigDict, steps: int, qk_norm: bool,
                       batch_size: int | None = None) -> ml_collections.ConfigDict:
  """The toy's copy of a teacher config section: `qk_norm` as asked, no block masking or REPA, the learning-rate
  schedule spread over the toy's `steps` (its warmup and cosine decay, as the demo's teacher over its own), and
  `batch_size` rows a step when given (else the teacher's)."""
  cfg = ml_collections.ConfigDict(teacher.to_dict())
  cfg.qk_norm, cfg.mask_block_prob, cfg.num_steps = qk_norm, 0.0, steps
  if batch_size is not None:
    cfg.batch_size = batch_size
  if 'repa' in cfg:
    cfg.repa.weight = 0.0
  return cfg


def run(workdir: str, steps: int, families: list[str], qk_norm: bool, colours: bool = False, seed: int = 0,
        out: str | None = None, log=print, batch_size: int | None = None) -> dict:
  """Trains the toy and returns {'scores': {steps: GenEval-lite}, 'marginals': {caption: per-cell P(3), P(5)}}."""
  unknown = [f for f in families if f not in t2i.FAMILIES]
  if unknown or not families:
    raise UserError(f'--families={",".join(families)}: choose among {",".join(t2i.FAMILIES)}.')
  if not colours and any(f in COLOUR_FAMILIES for f in families):
    raise UserError(f'--families={",".join(families)} names colours: add --colours (cell tokens then carry them).')
  if steps <= 0:
    raise UserError(f'--steps={steps} must be > 0.')
  if batch_size is not None and batch_size <= 0:
    raise UserError(f'--batch_size={batch_size} must be > 0 (or leave it out for the teacher config\'s).')
  config = t2i_stage.demo_workdir_config(workdir, 'text_encoder', 'the text encoder', 'the toy needs its text encoder')
  cfg = toy_teacher_config(config.teacher, steps, qk_norm, batch_size)
  text, text_params = t2i_stage.load_text_encoder(config, workdir)
  tok = t2i_stage.text_tokenizer(config)
  conditioner = cond_lib.TextConditioner(bos_id=tok.bos_id, eos_id=tok.eos_id)
  stride = tokens_per_digit(colours)
  model = maskgen.from_config(cfg, conditioner, 1 + 10 * stride, 4, text, text_params)
  tx = optim.make_optimizer(cfg, config.train.grad_clip)
  params = model.init(jax.random.key(seed), 4, jnp.zeros((1, config.text_encoder.context_length), jnp.int32))['params']
  state = {'step': 0, 'params': params, 'opt_state': tx.init(params)}
  train_step = jax.jit(teacher_stage.make_train_step(model, tx, cfg))
  rng = jax.random.key(seed + 1)
  for s in range(steps):
    data_rng = np.random.default_rng([seed, s])
    prompts = [t2i.random_prompt(data_rng, families[data_rng.integers(len(families))]) for _ in range(cfg.batch_size)]
    batch = {'tokens': layout_tokens(prompts, data_rng, colours), 'label': tok.encode([p.caption for p in prompts])}
    state, metrics = train_step(state, batch, jax.random.fold_in(rng, s))
    if (s + 1) % max(1, steps // 6) == 0 or s + 1 == steps:
      log(f'step {s + 1}/{steps}: loss {float(metrics["loss"]):.3f}')

  prompts = [p for p in t2i.eval_prompts() if p.family in families for _ in range(4)]
  ids = jnp.asarray(tok.encode([p.caption for p in prompts]))
  decode = jax.jit(lambda params, ids, key, n: sampling.iterative_decode(
      model, params, ids, key, num_tokens=4, num_steps=n, **sampling.decode_settings(config)), static_argnums=3)
  scores = {}
  for n in (1, 4):
    tokens = np.asarray(decode(state['params'], ids, jax.random.key(seed + 100), n))
    scores[n] = geneval_lite.score(prompts, *cells_of_tokens(tokens, colours))
  probs = np.asarray(jax.nn.softmax(model.logits(state['params'], jnp.full((2, 4), model.mask_id, jnp.int32),
                                                 jnp.asarray(tok.encode(list(PROBE_CAPTIONS)))), -1))
  digit_prob = lambda d: probs[..., 1 + d * stride: 1 + (d + 1) * stride].sum(-1)  # [2, 4]
  rounded = lambda row: [round(float(x), 3) for x in row]
  marginals = {c: {'three': rounded(digit_prob(3)[i]), 'five': rounded(digit_prob(5)[i])}
               for i, c in enumerate(PROBE_CAPTIONS)}

  log(f'{"steps":<5} | ' + '  '.join(f'{f:>12}' for f in families) + '       overall')
  for n, sc in scores.items():
    log(f'{n:<5} | ' + '  '.join(f'{sc[f]:12.3f}' for f in families) + f'  {sc["overall"]:12.3f}')
  log('every cell masked, P(digit) per cell (top-left, top-right, bottom-left, bottom-right):')
  for c, m in marginals.items():
    log(f'  "{c}": three {m["three"]}, five {m["five"]}')
  result = {'steps': steps, 'batch_size': cfg.batch_size, 'families': families, 'qk_norm': qk_norm,
            'colours': colours, 'seed': seed,
            'scores': {str(n): sc for n, sc in scores.items()}, 'marginals': marginals}
  if out:
    with open(out, 'w') as f:
      json.dump(result, f, indent=1)
  return result


def _flags() -> dict:
  return {'workdir': flags.DEFINE_string('workdir', None, 'Workdir of a configs/t2i_demo.py run (its text encoder).'),
          'steps': flags.DEFINE_integer('steps', 1500, 'Training steps of the toy teacher.'),
          'families': flags.DEFINE_list('families', ['position'], 'Task families of the training and evaluation '
                                        'prompts.'),
          'qk_norm': flags.DEFINE_bool('qk_norm', True, 'Query/key RMSNorm in the toy teacher.'),
          'colours': flags.DEFINE_bool('colours', False, 'Cell tokens carry the colour too (needed for colour '
                                       'families).'),
          'seed': flags.DEFINE_integer('seed', 0, 'Seed of the initialisation, data and sampling.'),
          'batch_size': flags.DEFINE_integer('batch_size', None, 'Training rows a step (default: the workdir\'s '
                                             'teacher config).'),
          'out': flags.DEFINE_string('out', None, 'Optional JSON file for the numbers.')}


if __name__ == '__main__':
  cli.run_tool(_flags, lambda v: run(v['workdir'], v['steps'], v['families'], v['qk_norm'], v['colours'], v['seed'],
                                     v['out'], batch_size=v['batch_size']),
               required=['workdir'])
