"""Stage `distill`: Fixed-Point Distillation of the teacher into a one-step student (DESIGN.md §1.3).

The student starts as a copy of the teacher. Optimizer state exists for the student (and the discriminator when
the GAN is on) only; the teacher, tokenizer and feature encoder are frozen parameters passed into the jitted step.
The EMA student is exported, with the tokenizer, as a standalone Orbax checkpoint that `fpd_jax.sample` loads
without the teacher: `DIR/distill/export` + `export_meta.json`.
"""

import dataclasses
import os
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
from fpd_jax.distill import fpd
from fpd_jax.distill import gan as gan_lib
from fpd_jax.errors import UserError
from fpd_jax.models import build
from fpd_jax.models import dino
from fpd_jax.models import feature_encoder
from fpd_jax.train import eval_net as eval_net_stage
from fpd_jax.train import loop
from fpd_jax.train import optim
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage

DRIFT_SPACES = ('features', 'pixels')
FEATURE_ENCODERS = ('feature_net', 'dino')


def batch_size(cfg) -> int:
  return cfg.groups_per_batch * cfg.samples_per_group


def validate(config) -> None:
  """Fails fast on distill settings no step can run with."""
  cfg = config.distill
  if cfg.drift_space not in DRIFT_SPACES:
    raise UserError(f'config.distill.drift_space={cfg.drift_space!r}; choose one of {DRIFT_SPACES}.')
  if cfg.get('feature_encoder', 'feature_net') not in FEATURE_ENCODERS:
    raise UserError(f'config.distill.feature_encoder={cfg.feature_encoder!r}; choose one of {FEATURE_ENCODERS}.')
  if cfg.get('compute_dtype', 'float32') not in ('float32', 'bfloat16'):
    raise UserError(f"config.distill.compute_dtype={cfg.compute_dtype!r}; choose 'float32' or 'bfloat16'.")
  if cfg.refine_source not in fpd.REFINE_SOURCES:
    raise UserError(f'config.distill.refine_source={cfg.refine_source!r}; choose one of {fpd.REFINE_SOURCES}.')
  if cfg.lift not in ('ste', 'soft'):
    raise UserError(f"config.distill.lift={cfg.lift!r}; choose 'ste' or 'soft'.")
  if cfg.samples_per_group < 2 or cfg.groups_per_batch < 1:
    raise UserError('config.distill.samples_per_group must be >= 2 (the drift loss needs negatives) and '
                    'groups_per_batch >= 1.')
  if cfg.num_steps <= 0:
    raise UserError(f'config.distill.num_steps must be > 0 (got {cfg.num_steps}).')
  lo, hi = cfg.remask_range
  if not 0.0 < lo <= hi <= 1.0:
    raise UserError(f'config.distill.remask_range={tuple(cfg.remask_range)} must satisfy 0 < lo <= hi <= 1.')


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
  return config


def load_frozen_params(config, workdir: str) -> dict:
  """The frozen parameters of the FPD step: {'teacher', 'tokenizer', 'features'} (wherever the config says)."""
  cfg = config.distill
  teacher = teacher_stage.load(config, workdir)[1]
  tokenizer = tokenizer_stage.load(config, workdir)[1]
  if cfg.drift_space == 'pixels':
    features = {}
  elif cfg.get('feature_encoder', 'feature_net') == 'dino':
    features = dino.load_params(config.dino)
  else:
    features = eval_net_stage.load('feature_net', config.feature_net, config, workdir)[1]
  return {'teacher': teacher, 'tokenizer': tokenizer, 'features': features}


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
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1.0 - cfg.ema_decay) * p, state['ema_params'], params)
    metrics['grad_norm'] = optax.global_norm(grads)
    new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, 'ema_params': ema}
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


def build_models(config, features, teacher=None) -> fpd.FPDModels:
  """The FPD modules; the teacher/student and the tokenizer compute in `distill.compute_dtype` (parameters and
  optimizer state stay float32). `teacher`: a prebuilt teacher model (the text pipeline's MaskGen) instead of the
  config's MaskGIT."""
  dtype = jnp.dtype(config.distill.get('compute_dtype', 'float32'))
  teacher = teacher if teacher is not None else build.teacher(config, dtype=dtype)
  return fpd.FPDModels(teacher=teacher, tokenizer=build.tokenizer(config, dtype=dtype),
                       features=features,
                       discriminator=gan_lib.Discriminator(tuple(config.distill.gan.widths)),
                       grid=build.token_grid(config))


@dataclasses.dataclass
class Trainer:
  """What the distill loop runs: the models, the pure step, its optimizers and how to start."""
  models: fpd.FPDModels
  step: Callable  # (state, frozen_params, batch, rng) -> (state, metrics), not yet jitted.
  init_state: Callable  # teacher params -> initial state (the student starts as the teacher).
  rng: jax.Array  # Root key of the loop (step s uses fold_in(rng, s)).


def trainer(config, teacher=None) -> Trainer:
  """The FPD step and its initial state for a config (no parameters loaded: also used to compile abstractly);
  `teacher` as in `build_models`."""
  cfg = config.distill
  models = build_models(config, feature_encoder_of(config), teacher)
  tx = optim.make_optimizer(cfg, config.train.grad_clip)
  gan_cfg = ml_collections.ConfigDict({'learning_rate': cfg.gan.learning_rate, 'num_steps': cfg.num_steps})
  disc_tx = optim.make_optimizer(gan_cfg, config.train.grad_clip)
  init_rng, rng = jax.random.split(jax.random.key(config.seed + 5))
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


def example_batch(config) -> dict:
  """The global batch of step 0 as ShapeDtypeStructs (labels, and real images with the GAN)."""
  b, size = batch_size(config.distill), config.data.image_size
  batch = {'label': jax.ShapeDtypeStruct((b,), jnp.int32)}
  if config.distill.gan.enabled:
    batch['image'] = jax.ShapeDtypeStruct((b, size, size, config.data.channels), jnp.float32)
  return batch


def run(config, workdir: str, stage_dir: str | None = None) -> dict:
  """Distills the teacher; exports the EMA student (+ tokenizer) to `<stage_dir>/export`."""
  validate(config)
  cfg = config.distill
  stage_dir = stage_dir or os.path.join(workdir, 'distill')
  frozen_params = load_frozen_params(config, workdir)
  train = trainer(config)
  reals = None
  if cfg.gan.enabled:
    reals = data_lib.real_images(config, workdir, batch_size(cfg), seed=config.seed + 6)

  def batch_fn(step):
    batch = {'label': sharding.host_rows(condition_batch(config.seed + 5, step, config.data.num_classes, cfg))}
    if reals is not None:
      batch['image'] = reals[step]['image']
    return batch

  state = loop.run(os.path.basename(stage_dir), stage_dir, loop.loop_config(config, cfg, batch_size(cfg)),
                   lambda: train.init_state(frozen_params['teacher']), train.step, batch_fn, train.rng,
                   partitioner=sharding.Partitioner.from_config(config), frozen=(frozen_params,))
  ckpt_lib.export(os.path.join(stage_dir, 'export'),
                  {'student': state['ema_params'], 'tokenizer': frozen_params['tokenizer']},
                  {'config': config.to_dict()})
  return {'steps': cfg.num_steps, 'batch_size': batch_size(cfg)}


def load_student(export_dir: str):
  """(config, student model, student params, tokenizer, tokenizer params) from a standalone student export."""
  config = ml_collections.ConfigDict(ckpt_lib.load_export_meta(export_dir, 'the distilled student')['config'])
  model, tokenizer = build.teacher(config), build.tokenizer(config)
  target = jax.eval_shape(lambda: {
      'student': model.init(jax.random.key(0), build.token_grid(config) ** 2, jnp.zeros((1,), jnp.int32))['params'],
      'tokenizer': tokenizer_stage.init_params(config, jax.random.key(0))})
  params = ckpt_lib.load_export(export_dir, target, 'the distilled student')
  return config, model, params['student'], tokenizer, params['tokenizer']


def student_generator(export_dir: str):
  """A generator `(labels, rng) -> images` of the exported one-step student (for evaluation)."""
  config, model, params, tokenizer, tokenizer_params = load_student(export_dir)
  sample = sampling.student_image_sampler(model, tokenizer, build.token_grid(config), config.distill)
  return lambda labels, rng: sample(params, tokenizer_params, labels, rng)
