"""Distillation of the released MaskGen-L (VQ) teacher (`configs/t2i.py`, DESIGN.md §1.6): `config.task = 'maskgen'`.

  distill   FPD (distill.trainer) with the imported MaskGen generator as teacher and student start, the TA-TiTok
            decoder (reading the caption's CLIP states) as tokenizer, DINO features; groups = samples of one prompt
            of `config.data.prompts_file`. Exports the EMA student with the tokenizer and text tower.
  evaluate  CLIP score (`fpd_jax.eval.clip_score`, the imported CLIP vision tower against the frozen text tower) and
            images/s of the student (one step) and the teacher (`config.evaluate.teacher_steps`, the released
            sampler) on `config.evaluate.prompts_file`, captioned sample grids, report.json / report.md.

Where the parameters come from: `config.teacher.pretrained`, `config.tokenizer.pretrained` and
`config.text_encoder.pretrained` (and `config.clip_score.pretrained`, for the evaluate stage) name the `--out` of
`python -m fpd_jax.tools.import_maskgen` (its `teacher/`, `tokenizer/`, `text_encoder/`, `clip_vision/` exports), or
'random' (random inits of the configured shapes: smoke tests and compile reports). Captions are tokenized by
`fpd_jax.data.clip_tokenizer.ClipTokenizer` (`config.text_encoder.vocab`).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fpd_jax import batching
from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import conditioning as cond_lib
from fpd_jax import sharding
from fpd_jax import sampling
from fpd_jax.data import captions as captions_lib
from fpd_jax.data import clip_tokenizer
from fpd_jax.errors import UserError
from fpd_jax.eval import clip_score
from fpd_jax.eval import geneval_files
from fpd_jax.eval import report
from fpd_jax.models import clip_text
from fpd_jax.models import clip_vision
from fpd_jax.models import maskgen
from fpd_jax.models import tatitok
from fpd_jax.train import distill as distill_stage
from fpd_jax.eval import grid as grid_lib
from fpd_jax.train import loop
from fpd_jax.train import t2i as t2i_stage

IMPORT_HINT = 'python -m fpd_jax.tools.import_maskgen --generator=... --tokenizer=... --clip=...'


def text_tokenizer(config) -> clip_tokenizer.ClipTokenizer:
  return clip_tokenizer.ClipTokenizer(config.text_encoder.vocab or None, config.text_encoder.context_length)


def read_prompts(config) -> list[str]:
  """The non-empty lines of `config.data.prompts_file`."""
  path = config.data.prompts_file
  if not path or not os.path.isfile(path):
    raise UserError(f'config.data.prompts_file={path!r} is not a file; pass a text file with one prompt per line '
                    '(distillation needs prompts only, no images).')
  return captions_lib.read_prompts_file(path)


def _sizes(section, fields) -> dict:
  return {k: section[k] for k in fields}


def text_tower(config) -> clip_text.TextTransformer:
  c = config.text_encoder
  return clip_text.TextTransformer(**_sizes(c, ('vocab_size', 'context_length', 'width', 'num_layers', 'num_heads',
                                                'mlp_ratio', 'embed_dim', 'activation', 'state_layer')))


def generator_net(config, dtype=jnp.float32) -> maskgen.MaskGenTransformer:
  return maskgen.MaskGenTransformer(
      **_sizes(config.teacher, ('codebook_size', 'num_tokens', 'hidden_size', 'num_layers', 'num_heads', 'mlp_ratio',
                                'micro_condition_dim', 'extra_embedding_rows')), dtype=dtype)


def decoder(config, dtype=jnp.float32) -> tatitok.TATiTokDecoder:
  return tatitok.TATiTokDecoder(
      **_sizes(config.tokenizer, ('codebook_size', 'token_size', 'num_tokens', 'image_size', 'patch_size', 'width',
                                  'num_layers', 'num_heads', 'text_length', 'text_dim')), dtype=dtype)


def _load(section, workdir: str, stage: str, init, seed: int):
  return ckpt_lib.load_stage_params(section.pretrained, workdir, stage, init, seed, IMPORT_HINT)


def load_text_params(config, workdir: str):
  tower = text_tower(config)
  ids = jnp.zeros((1, config.text_encoder.context_length), jnp.int32)
  return _load(config.text_encoder, workdir, 'text_encoder', lambda rng: tower.init(rng, ids)['params'],
               config.seed + 7)


def teacher_model(config, text_params, dtype=jnp.float32) -> maskgen.MaskGenModel:
  tok = text_tokenizer(config)
  return maskgen.MaskGenModel(generator_net(config, dtype), cond_lib.TextConditioner(tok.bos_id, tok.eos_id),
                              text_tower(config), text_params, config.teacher.aesthetic_score)


def load_teacher_params(config, model: maskgen.MaskGenModel, workdir: str):
  example = jnp.zeros((1, config.text_encoder.context_length), jnp.int32)
  return _load(config.teacher, workdir, 'teacher',
               lambda rng: model.init(rng, config.teacher.num_tokens, example)['params'], config.seed + 2)


def tokenizer_model(config, dtype=jnp.float32) -> tatitok.TextConditionedTokenizer:
  return tatitok.TextConditionedTokenizer(decoder(config, dtype), text_tower(config))


def load_decoder_params(config, workdir: str):
  net = decoder(config)
  args = (jnp.zeros((1, net.num_tokens), jnp.int32), jnp.zeros((1, net.text_length, net.text_dim)))
  return _load(config.tokenizer, workdir, 'tokenizer', lambda rng: net.init(rng, *args)['params'], config.seed + 1)


def prompt_batch(ids: np.ndarray, seed: int, step: int, groups: int, per_group: int) -> np.ndarray:
  """Caption ids of a distillation step: `groups` prompts drawn from `ids` [P, L], each repeated `per_group` times."""
  rng = np.random.default_rng([seed, step])
  rows = rng.choice(len(ids), groups, replace=groups > len(ids))
  return np.repeat(ids[rows], per_group, axis=0)


def validate(config) -> None:
  """Fails fast, with the fix named, on settings the distill and evaluate stages cannot run with."""
  read_prompts(config)
  if 'evaluate' in config.stages:
    cfg = config.evaluate
    if cfg.images_per_prompt <= 0 or cfg.batch_size <= 0 or any(s <= 0 for s in cfg.teacher_steps):
      raise UserError('config.evaluate.images_per_prompt, batch_size and every teacher_steps must be > 0.')
    evaluation_prompts(config)
  distill_stage.validate(config)
  if config.distill.get('feature_encoder', 'dino') != 'dino' and config.distill.drift_space == 'features':
    raise UserError("config.distill.feature_encoder must be 'dino' for the released teacher (no feature_net stage).")
  if config.distill.gan.enabled:
    raise UserError('config.distill.gan.enabled: the GAN needs real images, which this prompts-only pipeline has '
                    'none of; leave it off.')
  if config.teacher.num_tokens != config.tokenizer.num_tokens:
    raise UserError(f'config.teacher.num_tokens={config.teacher.num_tokens} differs from config.tokenizer.num_tokens='
                    f'{config.tokenizer.num_tokens}; the generator writes the tokens the decoder reads.')


def load_frozen_params(config, workdir: str) -> dict:
  """The frozen parameters of the FPD step: {'teacher', 'tokenizer': {'decoder', 'text_encoder'}, 'features'}."""
  text_params = load_text_params(config, workdir)
  return {'teacher': load_teacher_params(config, teacher_model(config, text_params), workdir),
          'tokenizer': {'decoder': load_decoder_params(config, workdir), 'text_encoder': text_params},
          'features': distill_stage.load_feature_params(config, workdir)}


def trainer(config) -> distill_stage.Trainer:
  """The FPD step and initial state in `distill.compute_dtype`; the step reads the text tower's parameters from
  its frozen inputs (`frozen['tokenizer']['text_encoder']`), so nothing is loaded here (compile reports use it)."""
  dtype = jnp.dtype(config.distill.get('compute_dtype', 'float32'))
  return distill_stage.trainer(config, teacher=teacher_model(config, None, dtype),
                               tokenizer=tokenizer_model(config, dtype), num_tokens=config.teacher.num_tokens)


def run_distill(config, workdir: str) -> dict:
  """FPD of the released MaskGen teacher; exports the EMA student + decoder + text tower to DIR/distill/export."""
  validate(config)
  cfg = config.distill
  frozen = load_frozen_params(config, workdir)
  text_params = frozen['tokenizer']['text_encoder']
  train = trainer(config)
  ids = text_tokenizer(config).encode(read_prompts(config))
  seed = distill_stage.distill_seed(config)
  batch_fn = lambda s: {'label': sharding.host_rows(prompt_batch(ids, seed + 5, s, cfg.groups_per_batch,
                                                                 cfg.samples_per_group))}
  stage_dir = os.path.join(workdir, 'distill')
  size = distill_stage.batch_size(cfg)
  state = loop.run('distill', stage_dir, loop.loop_config(config, cfg, size),
                   lambda: train.init_state(frozen['teacher']), train.step, batch_fn, train.rng,
                   partitioner=sharding.Partitioner.from_config(config), frozen=(frozen,))
  ckpt_lib.export(os.path.join(stage_dir, 'export'),
                  {'student': state['ema_params'], 'tokenizer': frozen['tokenizer']['decoder'],
                   'text_encoder': text_params}, {'config': config.to_dict()})
  return {'steps': cfg.num_steps, 'batch_size': size, 'prompts': int(len(ids))}


# ---- sampling


def load_student(export_dir: str):
  """(config, student params, text params, decoder params) from the export of the distill stage."""
  config = ml_collections.ConfigDict(ckpt_lib.load_export_meta(export_dir, 'the distilled student')['config'])
  text, net = text_tower(config), decoder(config)
  ids = jnp.zeros((1, config.text_encoder.context_length), jnp.int32)

  def shapes():
    text_params = text.init(jax.random.key(0), ids)['params']
    model = teacher_model(config, text_params)
    return {'student': model.init(jax.random.key(0), config.teacher.num_tokens, ids)['params'],
            'tokenizer': net.init(jax.random.key(0), jnp.zeros((1, net.num_tokens), jnp.int32),
                                  jnp.zeros((1, net.text_length, net.text_dim)))['params'],
            'text_encoder': text_params}

  params = ckpt_lib.load_export(export_dir, jax.eval_shape(shapes), 'the distilled student')
  return config, params['student'], params['text_encoder'], params['tokenizer']


def image_sampler(config, params, text_params, decoder_params, steps: int | None = None):
  """`generate(ids [B, L], rng) -> images [B, H, W, 3]` in [0, 1] of the distilled student (`steps` None: one step,
  `params` the student's) or the teacher (`params` the teacher's; the released sampler, `maskgen.generate`, in
  `steps` steps with `config.sampling`), decoded by the TA-TiTok decoder; compiled once per batch size."""
  base = teacher_model(config, text_params)
  tokenizer = tokenizer_model(config)
  tok_params = {'decoder': decoder_params, 'text_encoder': text_params}
  if steps is None:
    settings = sampling.OneStepSettings.from_distill_config(config.distill)
    tokens_fn = lambda p, tp, cond, rng: sampling.one_step_generate(
        base.bind_text(tp), p, cond, rng, num_tokens=config.teacher.num_tokens, settings=settings)
  else:
    s = config.sampling
    tokens_fn = lambda p, tp, cond, rng: maskgen.generate(
        base.bind_text(tp), p, cond, rng, num_steps=steps, guidance_scale=s.guidance_scale,
        randomize_temperature=s.randomize_temperature)

  @jax.jit
  def images(p, tp, cond, rng):
    return tokenizer.decode_tokens(tp, tokens_fn(p, tp['text_encoder'], cond, rng), cond)

  return lambda ids, rng: images(params, tok_params, ids, rng)


def whole_batches(generate_fn, batch_size: int):
  """`generate_fn` on caption ids padded to `batch_size` rows (the padding's images dropped): one compiled program
  for every batch, so a last, smaller batch is not compiled again (inside the images/s timing)."""

  def generate(ids, rng):
    return generate_fn(batching.pad_rows(ids, batch_size), rng)[:len(ids)]

  return generate


def sample_prompts(workdir: str, model: str, steps: int, prompts: list[str], num: int, seed: int,
                   batch_size: int) -> tuple[np.ndarray, list[str]]:
  """(uint8 images [len(prompts) * num, H, W, 3], their captions) of the distilled student (one step) or the
  teacher (the released sampler, `maskgen.generate`, in `steps` steps with `config.sampling`); `fpd_jax.sample`."""
  if num <= 0 or steps <= 0 or batch_size <= 0:
    raise UserError(f'--num, --steps and --batch_size must be > 0 (got {num}, {steps}, {batch_size}).')
  config, student, text_params, decoder_params = load_student(os.path.join(workdir, 'distill', 'export'))
  caps = [p for p in prompts for _ in range(num)]
  ids = text_tokenizer(config).encode(caps)
  if model == 'student':
    generate_fn = image_sampler(config, student, text_params, decoder_params)
  else:
    params = load_teacher_params(config, teacher_model(config, text_params), workdir)
    generate_fn = image_sampler(config, params, text_params, decoder_params, steps)
  out, _ = t2i_stage.generate(whole_batches(generate_fn, batch_size), ids, jax.random.key(seed), batch_size)
  return grid_lib.to_uint8(out), caps


# ---- evaluation


def evaluation_prompts(config) -> list[str]:
  """The prompts of `config.evaluate.prompts_file` ('' = `config.data.prompts_file`): plain text, one a line, or
  GenEval's evaluation_metadata.jsonl."""
  return geneval_files.read_prompts(config.evaluate.prompts_file or config.data.prompts_file)[0]


def vision_tower(config) -> clip_vision.VisionTransformer:
  """The CLIP image tower of `config.clip_score` (its embedding size is the text tower's `embed_dim`)."""
  c = config.clip_score
  return clip_vision.VisionTransformer(
      **_sizes(c, ('image_size', 'patch_size', 'width', 'num_layers', 'num_heads', 'mlp_ratio', 'activation')),
      embed_dim=config.text_encoder.embed_dim)


def load_vision_params(config, workdir: str):
  net = vision_tower(config)
  images = jnp.zeros((1, net.image_size, net.image_size, 3))
  return _load(config.clip_score, workdir, 'clip_vision', lambda rng: net.init(rng, images)['params'],
               config.seed + 11)


def run_evaluate(config, workdir: str) -> dict:
  """CLIP score and images/s of the student (one step; when the run distils) and the teacher at each of
  `config.evaluate.teacher_steps`, on `config.evaluate.images_per_prompt` images of each evaluation prompt."""
  validate(config)
  cfg = config.evaluate
  prompts = evaluation_prompts(config)
  captions = [p for p in prompts for _ in range(cfg.images_per_prompt)]
  ids = text_tokenizer(config).encode(captions)
  if 'distill' in config.stages:
    _, student, text_params, decoder_params = load_student(os.path.join(workdir, 'distill', 'export'))
  else:
    text_params, decoder_params = load_text_params(config, workdir), load_decoder_params(config, workdir)
  samplers = {}
  if cfg.teacher_steps:
    teacher = load_teacher_params(config, teacher_model(config, text_params), workdir)
    for n in cfg.teacher_steps:
      samplers[f'teacher_{n}step'] = (n, image_sampler(config, teacher, text_params, decoder_params, n))
  if 'distill' in config.stages:
    samplers['student_1step'] = (1, image_sampler(config, student, text_params, decoder_params))
  score = clip_score.make_scorer(vision_tower(config), load_vision_params(config, workdir), text_tower(config),
                                 text_params, cfg.batch_size)
  shown = min(len(prompts), 8) * cfg.images_per_prompt  # The sample grids: the first 8 prompts.
  models = {}
  rng = jax.random.key(config.seed + 100)
  for name, (steps, generate_fn) in samplers.items():
    images, speed = t2i_stage.generate(whole_batches(generate_fn, cfg.batch_size), ids, rng, cfg.batch_size)
    mean, _ = score(images, ids)
    models[name] = {'steps': steps, 'clip_score': mean, 'images_per_sec': speed, 'num_samples': len(images)}
    grid_lib.save_png(os.path.join(workdir, 'samples', f'{name}.png'),
                      t2i_stage.captioned_grid(images[:shown], captions[:shown], cfg.images_per_prompt))
    print(f'[evaluate] {name}: clip_score={mean:.2f} images/s={speed:.1f}')
  report.write(workdir, {'models': models, 'clip_score': {
      'definition': clip_score.DEFINITION, 'vision_tower': config.clip_score.pretrained,
      'prompts_file': cfg.prompts_file or config.data.prompts_file, 'num_prompts': len(prompts),
      'images_per_prompt': cfg.images_per_prompt}})
  return {'models': list(models)}


STAGES = {'distill': run_distill, 'evaluate': run_evaluate}
