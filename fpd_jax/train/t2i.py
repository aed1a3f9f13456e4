"""The text-to-image pipeline's stages (`configs/t2i_demo.py`, DESIGN.md §1.6): the class pipeline's trainers, loop,
checkpoints and FPD step with compositional-caption canvases (`fpd_jax/data/t2i.py`) instead of class labels.

  data          the MNIST TFDS dataset (canvases are composed from its digits on the fly, per step)
  tokenizer     the VQGAN on canvases (tokenizer.make_train_step)
  text_encoder  a small CLIP text tower trained contrastively against a small image tower on (canvas, caption)
                pairs; frozen afterwards (only the text tower is exported)
  teacher       MaskGen on canvas tokens + captions (teacher.make_train_step: masking, label smoothing,
                caption dropout p_uncond; optionally REPA against the feature network's cell features)
  eval_net      11-class cell classifier (digits + empty) on real cells: GenEval-lite's detector and FD features
  feature_net   the drift loss's encoder: another cell classifier (architecture, seed), applied to whole canvases
  distill       FPD (distill.trainer): groups = samples of one training prompt; teacher refinement with text CFG
  evaluate      GenEval-lite + FD + images/s per model, captioned sample grids, report.json / report.md; also
                real test-digit canvases (the scorer's own ceiling) and their tokenizer reconstructions (the
                ceiling of any generator over the tokenizer's codes)
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fpd_jax import batching
from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import conditioning as cond_lib
from fpd_jax import sampling
from fpd_jax import sharding
from fpd_jax.data import captions as captions_lib
from fpd_jax.data import mnist
from fpd_jax.data import t2i
from fpd_jax.errors import UserError
from fpd_jax.eval import geneval_lite
from fpd_jax.eval import grid as grid_lib
from fpd_jax.eval import metrics
from fpd_jax.eval import report
from fpd_jax.models import build
from fpd_jax.models import classifier
from fpd_jax.models import clip_text
from fpd_jax.models import maskgen
from fpd_jax.train import distill as distill_stage
from fpd_jax.train import eval_net as eval_net_stage
from fpd_jax.train import loop
from fpd_jax.train import optim
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage


def text_tokenizer(config) -> captions_lib.WordTokenizer:
  return captions_lib.WordTokenizer(context_length=config.text_encoder.context_length)


def text_tower(config) -> clip_text.TextTransformer:
  return clip_text.from_config(config.text_encoder, text_tokenizer(config).vocab_size,
                               config.text_encoder.context_length)


def cell_size(config) -> int:
  return config.data.image_size // 2


def bank(config, workdir: str, split: str) -> t2i.DigitBank:
  return t2i.DigitBank.load(workdir, split, cell_size(config))


def _state(params, tx, **extra):
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params), **extra}


def _run_loop(name, config, section, workdir, init_state, step, batch_fn, seed, batch_size=None):
  return loop.run(name, os.path.join(workdir, name), loop.loop_config(config, section, batch_size), init_state,
                  step, lambda s: sharding.host_rows(batch_fn(s)), jax.random.key(seed),
                  partitioner=sharding.Partitioner.from_config(config))


# ---- data, tokenizer


def run_data(config, workdir: str) -> dict:
  mnist.build_dataset(os.path.join(workdir, 'data'))
  return {}


def run_tokenizer(config, workdir: str) -> dict:
  """The VQGAN on training canvases (same step as the class pipeline)."""
  cfg = config.tokenizer
  train = bank(config, workdir, 'train')
  tx = optim.make_optimizer(cfg, config.train.grad_clip)
  init_state = lambda: _state(tokenizer_stage.init_params(config, jax.random.key(config.seed + 1)), tx,
                              usage=jnp.zeros((cfg.codebook_size,), jnp.int32))
  batch_fn = lambda s: {'image': t2i.train_batch(train, text_tokenizer(config), config.seed + 1, s,
                                                 cfg.batch_size)['image']}
  state = _run_loop('tokenizer', config, cfg, workdir, init_state,
                    tokenizer_stage.make_train_step(build.tokenizer(config), tx, cfg), batch_fn, config.seed + 1)
  ckpt_lib.export(os.path.join(workdir, 'tokenizer', 'export'), state['params'], {'config': config.to_dict()})
  return {'steps': cfg.num_steps}


# ---- text encoder


def clip_loss(text_emb, image_emb, logit_scale):
  """CLIP's symmetric InfoNCE over the batch (matching pairs on the diagonal)."""
  t = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
  i = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
  logits = jnp.exp(logit_scale) * t @ i.T
  labels = jnp.arange(len(t))
  loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
          + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def image_tower(config) -> classifier.ConvNet:
  cfg = config.text_encoder
  return classifier.ConvNet(widths=tuple(cfg.image_widths), feature_dim=cfg.embed_dim, num_classes=1)


def run_text_encoder(config, workdir: str) -> dict:
  """Trains the text tower contrastively against a small image tower; exports the text tower only."""
  cfg = config.text_encoder
  tok, text, image = text_tokenizer(config), text_tower(config), image_tower(config)
  train = bank(config, workdir, 'train')
  tx = optim.make_optimizer(cfg, config.train.grad_clip)
  size = config.data.image_size
  t_rng, i_rng = jax.random.split(jax.random.key(config.seed + 7))

  def init_state():
    params = {'text': text.init(t_rng, jnp.zeros((1, cfg.context_length), jnp.int32))['params'],
              'image': image.init(i_rng, jnp.zeros((1, size, size, 3)))['params'],
              'logit_scale': jnp.asarray(np.log(1 / 0.07), jnp.float32)}
    return _state(params, tx)

  def step(state, batch, rng):
    del rng

    def loss_fn(params):
      _, pooled = text.apply({'params': params['text']}, batch['ids'])
      _, feats = image.apply({'params': params['image']}, batch['image'], return_features=True)
      return clip_loss(pooled, feats, params['logit_scale'])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    params['logit_scale'] = jnp.clip(params['logit_scale'], 0.0, np.log(100.0))
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, {'loss': loss, 'accuracy': acc}

  batch_fn = lambda s: {k: v for k, v in t2i.train_batch(train, tok, config.seed + 7, s, cfg.batch_size).items()
                        if k in ('image', 'ids')}
  state = _run_loop('text_encoder', config, cfg, workdir, init_state, step, batch_fn, config.seed + 7)
  ckpt_lib.export(os.path.join(workdir, 'text_encoder', 'export'), state['params']['text'],
                  {'config': config.to_dict()})
  return {'steps': cfg.num_steps}


def demo_workdir_config(workdir: str, stage: str, what: str, needs: str) -> ml_collections.ConfigDict:
  """The config stored with `stage`'s export in a text-to-image demo workdir (`what` names it in errors); a workdir
  of another task is a UserError saying the tool `needs` its parts."""
  meta = ckpt_lib.load_export_meta(os.path.join(workdir, stage, 'export'), what)
  config = ml_collections.ConfigDict(meta['config'])
  if config.get('task') != 't2i':
    raise UserError(f'{workdir} is not a text-to-image demo workdir (configs/t2i_demo.py); {needs}.')
  return config


def load_text_encoder(config, workdir: str):
  text = text_tower(config)
  target = jax.eval_shape(lambda: text.init(jax.random.key(0),
                                            jnp.zeros((1, config.text_encoder.context_length), jnp.int32))['params'])
  return text, ckpt_lib.load_export(os.path.join(workdir, 'text_encoder', 'export'), target, 'the text encoder')


# ---- teacher


def generator(config, text_params, dtype=jnp.float32) -> maskgen.MaskGenModel:
  """The MaskGen generator of `config.teacher` with the frozen text encoder's parameters."""
  tok = text_tokenizer(config)
  conditioner = cond_lib.TextConditioner(bos_id=tok.bos_id, eos_id=tok.eos_id)
  repa_dim = config.feature_net.feature_dim if teacher_stage.repa_weight(config.teacher) > 0 else 0
  return maskgen.from_config(config.teacher, conditioner, config.tokenizer.codebook_size,
                             build.token_grid(config) ** 2, text_tower(config), text_params, dtype=dtype,
                             repa_dim=repa_dim)


def repa_target_fn(config, workdir: str):
  """canvases `[B, H, W, 3]` -> REPA targets `[B, N, F]`: the feature network's (`feature_net` stage) penultimate
  features of each cell, standardised per dimension (mean and std of 1,100 training cells of every class), given to
  every token of that cell (row-major token grid, 2x2 cells). Standardised, the cosine reads what tells cells apart
  rather than the features' common mean."""
  net, params, _ = eval_net_stage.load('feature_net', config.feature_net, config, workdir)
  cell_of_token = t2i.cell_of_token(build.token_grid(config))
  sample = t2i.cell_batch(bank(config, workdir, 'train'), config.feature_net.seed + 2, 0, 1100)['image']
  reference = eval_net_stage.logits_and_features(net, params, sample)[1]
  mean, std = reference.mean(0), reference.std(0) + 1e-3

  def targets(images):
    cells = geneval_lite.cells(images)
    features = eval_net_stage.logits_and_features(net, params, cells.reshape((-1,) + cells.shape[2:]))[1]
    features = ((features - mean) / std).reshape(len(images), 4, -1)
    return features[:, cell_of_token].astype(np.float32)

  return targets


def _init_generator(model, config, rng):
  return model.init(rng, build.token_grid(config) ** 2,
                    jnp.zeros((1, config.text_encoder.context_length), jnp.int32))['params']


def run_teacher(config, workdir: str) -> dict:
  """MaskGen on the tokens of training canvases (teacher.make_train_step: masking, smoothing, caption dropout)."""
  cfg = config.teacher
  model = generator(config, load_text_encoder(config, workdir)[1])
  vq, vq_params = tokenizer_stage.load(config, workdir)
  train, tok = bank(config, workdir, 'train'), text_tokenizer(config)
  tx = optim.make_optimizer(cfg, config.train.grad_clip)
  init_rng, rng = jax.random.split(jax.random.key(config.seed + 2))
  repa_targets = repa_target_fn(config, workdir) if teacher_stage.repa_weight(cfg) > 0 else None

  def batch_fn(s):
    batch = t2i.train_batch(train, tok, config.seed + 2, s, cfg.batch_size)
    tokens = tokenizer_stage.encode_images(vq, vq_params, batch['image'])
    out = {'tokens': tokens.reshape(len(tokens), -1).astype(np.int32), 'label': batch['ids']}
    if repa_targets is not None:
      out['repa_target'] = repa_targets(batch['image'])
    return sharding.host_rows(out)

  def init_params():
    params = _init_generator(model, config, init_rng)
    if cfg.get('embedding_init', 'random') == 'codebook':
      params = maskgen.init_embeddings_from_codebook(params, vq_params['quantizer']['codebook'],
                                                     jax.random.fold_in(init_rng, 7))
    return params

  state = loop.run('teacher', os.path.join(workdir, 'teacher'), loop.loop_config(config, cfg),
                   lambda: _state(init_params(), tx),
                   teacher_stage.make_train_step(model, tx, cfg), batch_fn, rng,
                   partitioner=sharding.Partitioner.from_config(config))
  ckpt_lib.export(os.path.join(workdir, 'teacher', 'export'), state['params'], {'config': config.to_dict()})
  return {'steps': cfg.num_steps, 'num_params': int(sum(np.size(x) for x in jax.tree.leaves(state['params'])))}


def load_teacher(config, workdir: str):
  """(model, params) of the trained MaskGen teacher."""
  model = generator(config, load_text_encoder(config, workdir)[1])
  target = jax.eval_shape(lambda: _init_generator(model, config, jax.random.key(0)))
  return model, ckpt_lib.load_export(os.path.join(workdir, 'teacher', 'export'), target, 'the teacher')


# ---- evaluation and feature networks (cell classifiers)


def _train_cell_classifier(name: str, section, config, workdir: str) -> dict:
  """eval_net.train_classifier on composed cells (11 classes: config.data.num_classes); tested on test-digit cells."""
  train, test = bank(config, workdir, 'train'), bank(config, workdir, 'test')
  batch_fn = lambda s: sharding.host_rows(t2i.cell_batch(train, section.seed, s, section.batch_size))
  return eval_net_stage.train_classifier(name, section, config, workdir, batch_fn=batch_fn,
                                         test=t2i.cell_batch(test, section.seed + 1, 0, 1100))


def run_eval_net(config, workdir: str) -> dict:
  return _train_cell_classifier('eval_net', config.eval_net, config, workdir)


def run_feature_net(config, workdir: str) -> dict:
  return _train_cell_classifier('feature_net', config.feature_net, config, workdir)


# ---- distillation


def distill_inputs(config, workdir: str):
  """(MaskGen teacher model, the distill step's frozen parameters {'teacher', 'tokenizer', 'features'}); the model
  holds the frozen text encoder, compiled into the step (small on the demo). Di[M]O reads only the teacher's."""
  teacher, teacher_params = load_teacher(config, workdir)
  return teacher, {'teacher': teacher_params, 'tokenizer': tokenizer_stage.load(config, workdir)[1],
                   'features': eval_net_stage.load('feature_net', config.feature_net, config, workdir)[1]}


def run_distill(config, workdir: str, stage_dir: str | None = None, on_checkpoint=None) -> dict:
  """Distills the MaskGen teacher with `distill.method` (FPD or Di[M]O); exports the EMA student + tokenizer + text
  encoder to `<stage_dir>/export` (default `DIR/distill`). `on_checkpoint(step, state)` as in `distill.run`."""
  distill_stage.validate(config)
  cfg = config.distill
  teacher, frozen = distill_inputs(config, workdir)
  train = distill_stage.trainer(config, teacher=teacher)
  tok = text_tokenizer(config)
  reals = bank(config, workdir, 'train') if cfg.gan.enabled else None

  def batch_fn(s):
    batch = {'label': sharding.host_rows(t2i.prompt_batch(tok, config.seed + 5, s, cfg.groups_per_batch,
                                                          cfg.samples_per_group))}
    if reals is not None:  # The GAN's real images: training canvases of random prompts (its critic is unconditional).
      batch['image'] = sharding.host_rows(
          t2i.train_batch(reals, tok, config.seed + 6, s, distill_stage.batch_size(cfg))['image'])
    return batch

  stage_dir = stage_dir or os.path.join(workdir, 'distill')
  state = loop.run(os.path.basename(stage_dir), stage_dir,
                   loop.loop_config(config, cfg, distill_stage.batch_size(cfg)),
                   lambda: train.init_state(frozen['teacher']), train.step, batch_fn, train.rng, on_checkpoint,
                   partitioner=sharding.Partitioner.from_config(config), frozen=(frozen,))
  ckpt_lib.export(os.path.join(stage_dir, 'export'),
                  {'student': state['ema_params'], 'tokenizer': frozen['tokenizer'],
                   'text_encoder': teacher.text_params}, {'config': config.to_dict()})
  return {'steps': cfg.num_steps, 'batch_size': distill_stage.batch_size(cfg),
          'method': distill_stage.method_of(config)}


def load_student(export_dir: str):
  """(config, model, student params, tokenizer, tokenizer params) from the standalone student export."""
  config = ml_collections.ConfigDict(ckpt_lib.load_export_meta(export_dir, 'the distilled student')['config'])
  text = text_tower(config)
  context = config.text_encoder.context_length

  def shapes():
    text_params = text.init(jax.random.key(0), jnp.zeros((1, context), jnp.int32))['params']
    return {'student': _init_generator(generator(config, text_params), config, jax.random.key(0)),
            'tokenizer': tokenizer_stage.init_params(config, jax.random.key(0)), 'text_encoder': text_params}

  params = ckpt_lib.load_export(export_dir, jax.eval_shape(shapes), 'the distilled student')
  model = generator(config, params['text_encoder'])
  return config, model, params['student'], build.tokenizer(config), params['tokenizer']


# ---- sampling and evaluation


def samplers(config, workdir: str, steps=None, student: bool = True) -> dict:
  """name -> (steps, generate(ids [B, L], rng) -> images [B, H, W, 3]) for the teacher rows and the student."""
  grid = build.token_grid(config)
  out = {}
  if steps is None or steps:
    teacher, params = load_teacher(config, workdir)
    vq, vq_params = tokenizer_stage.load(config, workdir)
    teacher_sample = sampling.teacher_image_sampler(teacher, vq, grid, config)  # One program for every step count.
    for n in (steps or config.evaluate.teacher_steps):
      out[f'teacher_{n}step'] = (n, lambda ids, rng, n=n: teacher_sample(params, vq_params, ids, rng, n))
  if student:
    s_config, model, s_params, vq, vq_params = load_student(os.path.join(workdir, 'distill', 'export'))
    sample = sampling.student_image_sampler(model, vq, grid, s_config.distill)
    out['student_1step'] = (1, lambda ids, rng: sample(s_params, vq_params, ids, rng))
  return out


def generate(generate_fn, ids: np.ndarray, rng: jax.Array, batch_size: int) -> tuple[np.ndarray, float]:
  """(images [len(ids), H, W, 3] float in [0, 1], images/s after compilation) of a generator over caption ids.

  Batch `i` uses the key `fold_in(rng, i)` on the first device (`batching.sample_on_mesh`: the first batch compiles,
  the others are timed)."""
  one_device = sharding.Partitioner.from_config({}, jax.devices()[:1])
  return batching.sample_on_mesh(one_device, generate_fn, np.asarray(ids), batch_size, rng, timed=True)


def sample_prompts(workdir: str, model: str, steps: int, prompts: list[str], num: int, seed: int,
                   batch_size: int) -> tuple[np.ndarray, list[str]]:
  """(uint8 images [len(prompts) * num, H, W, 3], their captions) of a workdir's teacher (`steps` decoding steps)
  or standalone student export (`fpd_jax.sample`)."""
  if num <= 0 or steps <= 0 or batch_size <= 0:
    raise UserError(f'--num, --steps and --batch_size must be > 0 (got {num}, {steps}, {batch_size}).')
  student = model == 'student'
  where = os.path.join(workdir, 'distill' if student else 'teacher', 'export')
  config = ml_collections.ConfigDict(ckpt_lib.load_export_meta(where, f'the {model}')['config'])
  caps = [p for p in prompts for _ in range(num)]
  ids = text_tokenizer(config).encode(caps)  # Bad prompts fail here, before any model loads.
  (_, generate_fn), = samplers(config, workdir, steps=0 if student else (steps,), student=student).values()
  images, _ = generate(generate_fn, ids, jax.random.key(seed), batch_size)
  return grid_lib.to_uint8(images), caps


def captioned_grid(images: np.ndarray, captions: list[str], per_row: int) -> np.ndarray:
  """Rows of `per_row` images, each row preceded by its caption (images of one caption are consecutive)."""
  rows = len(images) // per_row
  return grid_lib.captioned_rows(images[:rows * per_row], [captions[r * per_row] for r in range(rows)], per_row)


def grid_rows(prompts: list, per_family: int = 2) -> np.ndarray:
  """Indices (into the evaluation prompt list) of the first `per_family` prompts of each family."""
  keep = []
  for family in t2i.FAMILIES:
    keep += [i for i, p in enumerate(prompts) if p.family == family][:per_family]
  return np.array(keep)


class TextEvaluator:
  """The evaluation network, the fixed evaluation prompts (`evaluate.prompts_per_family` per family, or
  `prompts_per_family`), their real test-digit canvases and FD statistics; measures generators of caption ids."""

  def __init__(self, config, workdir: str, prompts_per_family: int | None = None):
    cfg = config.evaluate
    self.config = config
    self.net, self.net_params, self.meta = eval_net_stage.load('eval_net', config.eval_net, config, workdir)
    self.prompts = t2i.eval_prompts(prompts_per_family or cfg.prompts_per_family)
    self.per_image = [p for p in self.prompts for _ in range(cfg.images_per_prompt)]
    self.captions = [p.caption for p in self.per_image]
    self.ids = text_tokenizer(config).encode(self.captions)
    self.real = t2i.canvas_batch(bank(config, workdir, 'test'), self.per_image,
                                 np.random.default_rng(config.seed + 100))['image']
    self.real_stats = metrics.gaussian_stats(self.features(self.real))

  def features(self, images):
    return eval_net_stage.logits_and_features(self.net, self.net_params, images)[1]

  def image_metrics(self, images) -> dict:
    """GenEval-lite of canvases made for `self.per_image` and their FD against the real canvases."""
    fd = metrics.frechet_distance_from_stats(*metrics.gaussian_stats(self.features(images)), *self.real_stats)
    return {'geneval_lite': geneval_lite.score_images(self.net, self.net_params, self.per_image, images),
            'fd': float(fd), 'num_samples': len(images)}

  def measure(self, generate_fn, rng: jax.Array) -> tuple[dict, np.ndarray]:
    """(metrics row with images/s, images) of `generate_fn(ids, rng) -> images` on the evaluation prompts."""
    images, speed = generate(generate_fn, self.ids, rng, self.config.evaluate.batch_size)
    return {**self.image_metrics(images), 'images_per_sec': speed}, images


def run_evaluate(config, workdir: str) -> dict:
  """GenEval-lite (per task, overall, held-out overall), FD vs real canvases and images/s of every model."""
  cfg = config.evaluate
  ev = TextEvaluator(config, workdir)
  rows = grid_rows(ev.prompts)
  pick = (rows[:, None] * cfg.images_per_prompt + np.arange(cfg.images_per_prompt)).reshape(-1)
  save = lambda name, images: grid_lib.save_png(os.path.join(workdir, 'samples', f'{name}.png'), captioned_grid(
      images[pick], [ev.captions[i] for i in pick], cfg.images_per_prompt))
  save('real', ev.real)
  models = {}
  rng = jax.random.key(config.seed + 100)
  for name, (steps, generate_fn) in samplers(config, workdir, student='distill' in config.stages).items():
    row, images = ev.measure(generate_fn, rng)
    models[name] = {'steps': steps, **row}
    save(name, images)
    print(f'[evaluate] {name}: geneval_lite={row["geneval_lite"]["overall"]:.3f} fd={row["fd"]:.4g} '
          f'images/s={row["images_per_sec"]:.1f}')
  # The ceiling of every generator over the tokenizer's codes: the same real canvases, encoded and decoded.
  recon = tokenizer_stage.reconstruct_images(*tokenizer_stage.load(config, workdir), ev.real)
  save('tokenizer_reconstructions', recon)
  result = {'models': models, 'eval_net': {'test_accuracy': ev.meta['test_accuracy']},
            'real_canvases': {'geneval_lite': geneval_lite.score_images(ev.net, ev.net_params, ev.per_image, ev.real),
                              'num_samples': len(ev.per_image)},
            'tokenizer_reconstructions': ev.image_metrics(recon)}
  report.write(workdir, result)
  return {'models': list(models)}


STAGES = {
    'data': run_data,
    'tokenizer': run_tokenizer,
    'text_encoder': run_text_encoder,
    'teacher': run_teacher,
    'eval_net': run_eval_net,
    'feature_net': run_feature_net,
    'distill': run_distill,
    'evaluate': run_evaluate,
}
