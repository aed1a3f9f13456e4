"""Stage `distill`: distils the teacher into a one-step student, by FPD (DESIGN.md §1.3) or Di[M]O (§1.5).

`config.distill.method` picks the objective: 'fpd' (the method) or 'dimo' (the baseline, `fpd_jax.distill.dimo`).
The student starts as a copy of the teacher. With FPD, optimizer state exists for the student (and the
discriminator when the GAN is on) only; the teacher, tokenizer and feature encoder are frozen parameters passed
into the jitted step. Di[M]O also trains an auxiliary model (a second copy of the teacher) with its own optimizer
state (`aux_params`, `aux_opt_state`). Either way the EMA student is exported, with the tokenizer, as a standalone
Orbax checkpoint that `fpd_jax.sample` loads without the teacher: `DIR/distill/export` + `export_meta.json`.
`config.distill.seed` changes only this stage's randomness (the teacher and the other stages stay the same).
"""

import dataclasses
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import sampling
from fpd_jax import sharding
from fpd_jax import data as data_lib
from fpd_jax import mask_schedule
from fpd_jax.distill import dimo
from fpd_jax.distill import fpd
from fpd_jax.distill import gan as gan_lib
from fpd_jax.errors import UserError
from fpd_jax.errors import check_positive
from fpd_jax.models import build
from fpd_jax.models import dino
from fpd_jax.models import feature_encoder
from fpd_jax.train import eval_net as eval_net_stage
from fpd_jax.train import loop
from fpd_jax.train import optim
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage

METHODS = ('fpd', 'dimo')
DRIFT_SPACES = ('features', 'pixels')
FEATURE_ENCODERS = ('feature_net', 'dino')


def batch_size(cfg) -> int:
  return cfg.groups_per_batch * cfg.samples_per_group


def method_of(config) -> str:
  return config.distill.get('method', 'fpd')


def distill_seed(config) -> int:
  """The root seed of the distill stage: `config.seed`'s, offset by `config.distill.seed` (0: unchanged)."""
  return config.seed + 5 + 1000 * config.distill.get('seed', 0)


def validate(config) -> None:
  """Fails fast on distill settings no step can run with."""
  cfg = config.distill
  if method_of(config) not in METHODS:
    raise UserError(f'config.distill.method={method_of(config)!r}; choose one of {METHODS}.')
  if cfg.num_steps <= 0:
    raise UserError(f'config.distill.num_steps must be > 0 (got {cfg.num_steps}).')
  if cfg.get('compute_dtype', 'float32') not in ('float32', 'bfloat16'):
    raise UserError(f"config.distill.compute_dtype={cfg.compute_dtype!r}; choose 'float32' or 'bfloat16'.")
  if method_of(config) == 'dimo':
    validate_dimo(config)
    return
  if cfg.drift_space not in DRIFT_SPACES:
    raise UserError(f'config.distill.drift_space={cfg.drift_space!r}; choose one of {DRIFT_SPACES}.')
  if cfg.get('feature_encoder', 'feature_net') not in FEATURE_ENCODERS:
    raise UserError(f'config.distill.feature_encoder={cfg.feature_encoder!r}; choose one of {FEATURE_ENCODERS}.')
  if cfg.refine_source not in fpd.REFINE_SOURCES:
    raise UserError(f'config.distill.refine_source={cfg.refine_source!r}; choose one of {fpd.REFINE_SOURCES}.')
  if cfg.lift not in ('ste', 'soft'):
    raise UserError(f"config.distill.lift={cfg.lift!r}; choose 'ste' or 'soft'.")
  if cfg.samples_per_group < 2 or cfg.groups_per_batch < 1:
    raise UserError('config.distill.samples_per_group must be >= 2 (the drift loss needs negatives) and '
                    'groups_per_batch >= 1.')
  check_positive('distill.teacher_temperature', cfg.teacher_temperature,
                 'the teacher logits of the refinement are divided by it (the demo uses 0.5).')
  if not len(cfg.temperatures) or not all(t > 0 for t in cfg.temperatures):
    raise UserError(f'config.distill.temperatures={tuple(cfg.temperatures)} must be one or more drift kernel '
                    'bandwidths > 0, e.g. (0.02, 0.05, 0.2).')
  lo, hi = cfg.remask_range
  if not 0.0 < lo <= hi <= 1.0:
    raise UserError(f'config.distill.remask_range={tuple(cfg.remask_range)} must satisfy 0 < lo <= hi <= 1.')


def with_overrides(config, overrides: dict):
  """A copy of `config` with `config.distill` overrides applied (dotted keys reach nested sections)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      section = config.distill
      *path, leaf = key.split('.')
      for p in path:
        section = section[p]
      if leaf not in section:  # An unlocked ConfigDict would silently add the key.
        raise KeyError(key)
      section[leaf] = value
  return config


def validate_dimo(config) -> None:
  """Fails fast on `config.distill.dimo` values the Di[M]O step cannot run with."""
  cfg, d = config.distill, config.distill.dimo
  checks = [
      (0.0 <= d.mask_fraction <= 1.0, f'mask_fraction={d.mask_fraction} must be in [0, 1]'),
      (0.0 <= d.embedding_noise < 1.0, f'embedding_noise={d.embedding_noise} must be in [0, 1)'),
      (d.student_temperature > 0 and d.sample_temperature > 0 and d.teacher_temperature > 0,
       'student_temperature, sample_temperature and teacher_temperature must be > 0'),
      (d.learning_rate > 0 and d.aux_learning_rate > 0, 'learning_rate and aux_learning_rate must be > 0'),
      (d.warmup_steps >= 0, f'warmup_steps={d.warmup_steps} must be >= 0'),
      (0.0 <= d.aux_label_smoothing < 1.0, f'aux_label_smoothing={d.aux_label_smoothing} must be in [0, 1)'),
      (d.teacher_cfg_scale >= 0 and d.aux_cfg_scale >= 0, 'teacher_cfg_scale and aux_cfg_scale must be >= 0'),
      (d.remask_schedule in mask_schedule.METHODS,
       f'remask_schedule={d.remask_schedule!r} must be one of {mask_schedule.METHODS}'),
      (cfg.groups_per_batch >= 1 and cfg.samples_per_group >= 1,
       'distill.groups_per_batch and distill.samples_per_group must be >= 1'),
      (not cfg.gan.enabled, 'the GAN is an FPD option; set config.distill.gan.enabled=False'),
  ]
  for ok, problem in checks:
    if not ok:
      raise UserError(f'config.distill.dimo: {problem}.')
  if (d.teacher_cfg_scale or d.aux_cfg_scale) and not config.teacher.get('null_class', True):
    raise UserError('config.distill.dimo: this teacher has no null class, so CFG is unavailable; set '
                    'teacher_cfg_scale and aux_cfg_scale to 0.')
  for pattern in d.frozen_params:
    try:
      re.compile(pattern)
    except re.error as e:
      raise UserError(f'config.distill.dimo.frozen_params: bad regular expression {pattern!r} ({e}).') from e


def feature_encoder_of(config):
  """The drift feature space phi: DINO (`config.dino`), the trained feature_net's ConvNet, or pixels."""
  cfg = config.distill
  if cfg.drift_space == 'pixels':
    return feature_encoder.PixelFeatures(cfg.pixel_grid)
  if cfg.get('feature_encoder', 'feature_net') == 'dino':
    return dino.from_config(config.dino)
  net = eval_net_stage.build_net(config.feature_net, config.data.num_classes)
  return feature_encoder.ConvNetFeatures(net, tuple(cfg.feature_layers), cfg.feature_grid)


def with_random_weights(config):
  """A copy of the config whose imported models (teacher, tokenizer, DINO) are random inits of the same shapes
  (compile reports and benchmarks; values do not change speed or memory)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.teacher.pretrained = 'random'
    config.tokenizer.pretrained = 'random'
    if 'dino' in config:
      config.dino.weights = 'random'
    if 'pretrained' in config.get('text_encoder', {}):  # The released text-to-image teacher's CLIP text tower.
      config.text_encoder.pretrained = 'random'
  return config


def load_frozen_params(config, workdir: str) -> dict:
  """The frozen parameters of the step: {'teacher', 'tokenizer', 'features'} for FPD (wherever the config says),
  {'teacher', 'tokenizer'} for Di[M]O (the tokenizer only for the export)."""
  teacher = teacher_stage.load(config, workdir)[1]
  tokenizer = tokenizer_stage.load(config, workdir)[1]
  if method_of(config) == 'dimo':
    return {'teacher': teacher, 'tokenizer': tokenizer}
  return {'teacher': teacher, 'tokenizer': tokenizer, 'features': load_feature_params(config, workdir)}


def load_feature_params(config, workdir: str):
  """The parameters of the drift feature space `feature_encoder_of(config)`: none (pixels), DINO's, or the
  feature_net stage's."""
  cfg = config.distill
  if cfg.drift_space == 'pixels':
    return {}
  if cfg.get('feature_encoder', 'feature_net') == 'dino':
    return dino.load_params(config.dino)
  return eval_net_stage.load('feature_net', config.feature_net, config, workdir)[1]


def condition_batch(seed: int, step: int, num_classes: int, cfg) -> np.ndarray:
  """Labels of a step, grouped: `groups_per_batch` classes, each repeated `samples_per_group` times."""
  rng = np.random.default_rng([seed, step])
  classes = rng.choice(num_classes, cfg.groups_per_batch, replace=cfg.groups_per_batch > num_classes)
  return np.repeat(classes, cfg.samples_per_group).astype(np.int32)


def make_train_step(models: fpd.FPDModels, tx, disc_tx, cfg):
  """The pure FPD train step `(state, frozen_params, batch, rng) -> (state, metrics)`; `loop.run` jits it."""

  def step(state, frozen_params, batch, rng):
    loss_rng, _ = jax.random.split(rng)
    disc_params = state.get('disc_params', {})
    grad_fn = jax.value_and_grad(fpd.fpd_loss, has_aux=True)
    (_, (metrics, fake)), grads = grad_fn(state['params'], disc_params, frozen_params, models,
                                          batch['label'], loss_rng, cfg)
    new_state = update_student(state, grads, tx, cfg.ema_decay)
    metrics['grad_norm'] = optax.global_norm(grads)
    if cfg.gan.enabled:
      def disc_loss(d_params):
        real = models.discriminator.apply({'params': d_params}, batch['image'])
        fake_logits = models.discriminator.apply({'params': d_params}, fake)
        return gan_lib.discriminator_loss(real, fake_logits, cfg.gan.loss)
      d_loss, d_grads = jax.value_and_grad(disc_loss)(disc_params)
      d_updates, d_opt_state = disc_tx.update(d_grads, state['disc_opt_state'], disc_params)
      new_state['disc_params'] = optax.apply_updates(disc_params, d_updates)
      new_state['disc_opt_state'] = d_opt_state
      metrics['gan_discriminator'] = d_loss
    return new_state, metrics

  return step


def update_student(state, grads, tx, ema_decay: float) -> dict:
  """The new `{step, params, opt_state, ema_params}` after one optimizer step on the student."""
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state['ema_params'], params)
  return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, 'ema_params': ema}


def make_dimo_train_step(models: dimo.DiMOModels, tx, aux_tx, cfg):
  """The pure Di[M]O train step `(state, frozen_params, batch, rng) -> (state, metrics)`; `loop.run` jits it.

  First the student's distribution-matching update against the current auxiliary model, then the auxiliary
  model's cross-entropy update on fresh drafts of the updated student (the reference's order).
  """
  num_tokens = models.num_tokens or models.grid ** 2

  def step(state, frozen_params, batch, rng):
    student_rng, aux_rng = jax.random.split(rng)
    frozen_params = jax.lax.stop_gradient(frozen_params)
    model = fpd.with_frozen_text(models.teacher, frozen_params)
    grads, metrics = jax.grad(dimo.student_loss, has_aux=True)(
        state['params'], state['aux_params'], frozen_params['teacher'], model, batch['label'], student_rng,
        num_tokens, cfg.dimo)
    new_state = update_student(state, grads, tx, cfg.ema_decay)
    aux_grads, aux_metrics = jax.grad(dimo.aux_loss, has_aux=True)(
        state['aux_params'], new_state['params'], model, batch['label'], aux_rng, num_tokens, cfg.dimo)
    aux_updates, new_state['aux_opt_state'] = aux_tx.update(aux_grads, state['aux_opt_state'], state['aux_params'])
    new_state['aux_params'] = optax.apply_updates(state['aux_params'], aux_updates)
    metrics.update(aux_metrics, grad_norm=optax.global_norm(grads), aux_grad_norm=optax.global_norm(aux_grads))
    return new_state, metrics

  return step


def dimo_optimizers(config):
  """(student optimizer, auxiliary optimizer) of Di[M]O: Adam, constant rate after a linear warmup, the
  configured parameters (`dimo.frozen_params`) frozen."""
  d = config.distill.dimo

  def one(lr):
    section = ml_collections.ConfigDict({'learning_rate': lr, 'num_steps': config.distill.num_steps,
                                         'warmup_steps': d.warmup_steps, 'schedule': 'constant', 'b2': d.b2})
    return optim.with_frozen(optim.make_optimizer(section, config.train.grad_clip), tuple(d.frozen_params))

  return one(d.learning_rate), one(d.aux_learning_rate)


def trained_parameter_count(config, teacher_params, teacher=None) -> int:
  """Scalars the distill stage trains: the student (+ discriminator) for FPD, student + auxiliary for Di[M]O
  (`teacher`: a prebuilt teacher model, as in `build_models`)."""
  if method_of(config) == 'dimo':
    return 2 * optim.num_trained(teacher_params, tuple(config.distill.dimo.frozen_params))
  state = jax.eval_shape(trainer(config, teacher=teacher).init_state, teacher_params)
  return optim.num_trained(state['params']) + optim.num_trained(state.get('disc_params', {}))


def build_models(config, features, teacher=None, tokenizer=None, num_tokens: int = 0) -> fpd.FPDModels:
  """The FPD modules; the teacher/student and the tokenizer compute in `distill.compute_dtype` (parameters and
  optimizer state stay float32). `teacher`: a prebuilt teacher model (the text pipelines' MaskGen) instead of the
  config's MaskGIT; `tokenizer` and `num_tokens`: a prebuilt 1-D tokenizer (the released MaskGen's TA-TiTok) and
  its token count instead of the config's VQGAN and its grid."""
  dtype = jnp.dtype(config.distill.get('compute_dtype', 'float32'))
  teacher = teacher if teacher is not None else build.teacher(config, dtype=dtype)
  tokenizer = tokenizer if tokenizer is not None else build.tokenizer(config, dtype=dtype)
  return fpd.FPDModels(teacher=teacher, tokenizer=tokenizer, features=features,
                       discriminator=gan_lib.Discriminator(tuple(config.distill.gan.widths)),
                       grid=0 if num_tokens else build.token_grid(config), num_tokens=num_tokens)


@dataclasses.dataclass
class Trainer:
  """What the distill loop runs: the models, the pure step, its optimizers and how to start."""
  models: fpd.FPDModels | dimo.DiMOModels
  step: Callable  # (state, frozen_params, batch, rng) -> (state, metrics), not yet jitted.
  init_state: Callable  # teacher params -> initial state (the student starts as the teacher).
  rng: jax.Array  # Root key of the loop (step s uses fold_in(rng, s)).


def trainer(config, teacher=None, tokenizer=None, num_tokens: int = 0) -> Trainer:
  """The configured method's step and initial state (no parameters loaded: also used to compile abstractly);
  `teacher`, `tokenizer`, `num_tokens` as in `build_models`."""
  if method_of(config) == 'dimo':
    return dimo_trainer(config, teacher, num_tokens)
  cfg = config.distill
  models = build_models(config, feature_encoder_of(config), teacher, tokenizer, num_tokens)
  tx = optim.make_optimizer(cfg, config.train.grad_clip)
  gan_cfg = ml_collections.ConfigDict({'learning_rate': cfg.gan.learning_rate, 'num_steps': cfg.num_steps})
  disc_tx = optim.make_optimizer(gan_cfg, config.train.grad_clip)
  init_rng, rng = jax.random.split(jax.random.key(distill_seed(config)))
  size, channels = config.data.image_size, config.data.channels

  def init_state(teacher_params):
    params = jax.tree.map(jnp.copy, teacher_params)
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
             'ema_params': jax.tree.map(jnp.copy, params)}
    if cfg.gan.enabled:
      disc = models.discriminator.init(init_rng, jnp.zeros((1, size, size, channels)))['params']
      state.update(disc_params=disc, disc_opt_state=disc_tx.init(disc))
    return state

  return Trainer(models, make_train_step(models, tx, disc_tx, cfg), init_state, rng)


def dimo_trainer(config, teacher=None, num_tokens: int = 0) -> Trainer:
  """The Di[M]O step; its state adds the auxiliary model and its optimizer state to the student's. `teacher` and
  `num_tokens` as in `build_models` (the text pipelines' MaskGen; the released one's 1-D token count)."""
  dtype = jnp.dtype(config.distill.get('compute_dtype', 'float32'))
  teacher = teacher if teacher is not None else build.teacher(config, dtype=dtype)
  models = dimo.DiMOModels(teacher=teacher, grid=0 if num_tokens else build.token_grid(config),
                           num_tokens=num_tokens)
  tx, aux_tx = dimo_optimizers(config)
  _, rng = jax.random.split(jax.random.key(distill_seed(config)))

  def init_state(teacher_params):
    params, aux = jax.tree.map(jnp.copy, teacher_params), jax.tree.map(jnp.copy, teacher_params)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'ema_params': jax.tree.map(jnp.copy, params), 'aux_params': aux, 'aux_opt_state': aux_tx.init(aux)}

  return Trainer(models, make_dimo_train_step(models, tx, aux_tx, config.distill), init_state, rng)


def example_batch(config) -> dict:
  """The global batch of step 0 as ShapeDtypeStructs (labels or caption ids, and real images with the GAN)."""
  b, size = batch_size(config.distill), config.data.image_size
  text = config.get('text_encoder')
  batch = {'label': jax.ShapeDtypeStruct((b, text.context_length) if text else (b,), jnp.int32)}
  if config.distill.gan.enabled:
    batch['image'] = jax.ShapeDtypeStruct((b, size, size, config.data.channels), jnp.float32)
  return batch


def run(config, workdir: str, stage_dir: str | None = None, on_checkpoint=None) -> dict:
  """Distills the teacher; exports the EMA student (+ tokenizer) to `<stage_dir>/export`.

  `on_checkpoint(step, state)` (optional) is called after each checkpoint (e.g. to keep EMA snapshots).
  """
  validate(config)
  cfg = config.distill
  stage_dir = stage_dir or os.path.join(workdir, 'distill')
  frozen_params = load_frozen_params(config, workdir)
  train = trainer(config)
  reals = None
  if cfg.gan.enabled:
    reals = data_lib.real_images(config, workdir, batch_size(cfg), seed=distill_seed(config) + 1)

  def batch_fn(step):
    batch = {'label': sharding.host_rows(condition_batch(distill_seed(config), step, config.data.num_classes,
                                                         cfg))}
    if reals is not None:
      batch['image'] = reals[step]['image']
    return batch

  state = loop.run(os.path.basename(stage_dir), stage_dir, loop.loop_config(config, cfg, batch_size(cfg)),
                   lambda: train.init_state(frozen_params['teacher']), train.step, batch_fn, train.rng,
                   on_checkpoint, partitioner=sharding.Partitioner.from_config(config), frozen=(frozen_params,))
  ckpt_lib.export(os.path.join(stage_dir, 'export'),
                  {'student': state['ema_params'], 'tokenizer': frozen_params['tokenizer']},
                  {'config': config.to_dict()})
  return {'steps': cfg.num_steps, 'batch_size': batch_size(cfg), 'method': method_of(config)}


def load_student(export_dir: str):
  """(config, student model, student params, tokenizer, tokenizer params) from a standalone student export."""
  config = ml_collections.ConfigDict(ckpt_lib.load_export_meta(export_dir, 'the distilled student')['config'])
  model, tokenizer = build.teacher(config), build.tokenizer(config)
  target = jax.eval_shape(lambda: {
      'student': model.init(jax.random.key(0), build.token_grid(config) ** 2, jnp.zeros((1,), jnp.int32))['params'],
      'tokenizer': tokenizer_stage.init_params(config, jax.random.key(0))})
  params = ckpt_lib.load_export(export_dir, target, 'the distilled student')
  return config, model, params['student'], tokenizer, params['tokenizer']


def student_generator(export_dir: str, partitioner: sharding.Partitioner):
  """A generator `(labels, rng) -> images` of the exported one-step student (for evaluation), its parameters
  replicated on the partitioner's mesh."""
  config, model, params, tokenizer, tokenizer_params = load_student(export_dir)
  params, tokenizer_params = partitioner.replicate((params, tokenizer_params))
  sample = sampling.student_image_sampler(model, tokenizer, build.token_grid(config), config.distill)
  return lambda labels, rng: sample(params, tokenizer_params, labels, rng)
