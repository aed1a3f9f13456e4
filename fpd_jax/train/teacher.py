"""Stage `teacher`: trains the class-conditional MaskGIT transformer on the tokenizer's tokens (DESIGN.md §1.1).

Each step: sample r ~ U[0,1), mask `ceil(gamma(r) * N)` tokens (or, with `mask_block_prob`, whole token blocks:
`mask_schedule.block_mask`), drop the condition to the null one with
probability `p_uncond` (for CFG), and minimise label-smoothed cross-entropy on the masked positions.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import sharding
from fpd_jax import mask_schedule
from fpd_jax.data import mnist
from fpd_jax.models import build
from fpd_jax.models import maskgen
from fpd_jax.train import loop
from fpd_jax.train import optim
from fpd_jax.train import tokenizer as tokenizer_stage


def masked_token_loss(model, params, tokens, cond, rng, *, label_smoothing: float, p_uncond: float,
                      schedule: str, deterministic: bool = False, mask_block: int = 0, mask_block_prob: float = 0.0,
                      repa_target=None, repa_weight: float = 0.0):
  """Label-smoothed cross-entropy of the masked positions, and accuracy on them (`mask_block`, `mask_block_prob`:
  `mask_schedule.mask_tokens`'s block masking). With `repa_target` `[B, N, F]` (features of the clean image at each
  token) and `repa_weight` > 0, adds `repa_weight` * REPA's alignment loss of every token (`maskgen.repa_loss`; the
  model needs `logits_and_repa`)."""
  mask_rng, drop_rng, dropout_rng = jax.random.split(rng, 3)
  inputs, mask = mask_schedule.mask_tokens(mask_rng, tokens, model.mask_id, schedule, mask_block, mask_block_prob)
  cond = model.conditioner.drop(cond, drop_rng, p_uncond)
  metrics = {}
  if repa_target is not None and repa_weight > 0:
    logits, projection = model.logits_and_repa(params, inputs, cond)
    repa, metrics['repa_cosine'] = maskgen.repa_loss(projection, repa_target)
  else:
    logits = model.logits(params, inputs, cond, deterministic=deterministic, dropout_rng=dropout_rng)
    repa = 0.0
  token_loss = masked_cross_entropy(logits, tokens, mask, model.codebook_size, label_smoothing)
  weights = mask.astype(jnp.float32)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == tokens) * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  loss = token_loss + repa_weight * repa
  if metrics:
    metrics['token_loss'] = token_loss
  return loss, {'loss': loss, 'masked_accuracy': accuracy, **metrics}


def masked_cross_entropy(logits, tokens, mask, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  """Mean label-smoothed cross-entropy of `logits [B, N, K]` against `tokens [B, N]` over the positions `mask`."""
  targets = optax.smooth_labels(jax.nn.one_hot(tokens, num_classes), label_smoothing)
  xent = optax.softmax_cross_entropy(logits, targets)
  weights = mask.astype(jnp.float32)
  return jnp.sum(xent * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def repa_weight(cfg) -> float:
  """The REPA loss weight of a teacher config section (0 without a `repa` section: the class teacher)."""
  repa = cfg.get('repa', None)
  return float(repa.weight) if repa is not None else 0.0


def make_train_step(model, tx, cfg):
  """The pure teacher train step `(state, batch, rng) -> (state, metrics)`; `loop.run` jits it."""

  def step(state, batch, rng):
    def loss_fn(params):
      return masked_token_loss(model, params, batch['tokens'], batch['label'], rng,
                               label_smoothing=cfg.label_smoothing, p_uncond=cfg.p_uncond,
                               schedule=cfg.mask_schedule, mask_block=cfg.get('mask_block_size', 0),
                               mask_block_prob=cfg.get('mask_block_prob', 0.0),
                               repa_target=batch.get('repa_target'), repa_weight=repa_weight(cfg))
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics

  return step


def run(config, workdir: str) -> dict:
  """Trains the teacher on tokens of the train split and exports its parameters to `DIR/teacher/export`."""
  stage_dir = os.path.join(workdir, 'teacher')
  cfg = config.teacher
  model = build.teacher(config)
  num_tokens = build.token_grid(config) ** 2
  tokens, labels = tokenizer_stage.tokenize_split(config, workdir, 'train')
  batches = mnist.batch_dataset(mnist.ArraySource({'tokens': tokens, 'label': labels}), cfg.batch_size,
                                seed=config.seed + 2, **sharding.host_shard(cfg.batch_size))
  tx = optim.make_optimizer(cfg, config.train.grad_clip)
  init_rng, rng = jax.random.split(jax.random.key(config.seed + 2))

  def init_state():
    params = model.init(init_rng, num_tokens, jnp.zeros((1,), jnp.int32))['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  state = loop.run('teacher', stage_dir, loop.loop_config(config, cfg), init_state,
                   make_train_step(model, tx, cfg), lambda s: batches[s], rng,
                   partitioner=sharding.Partitioner.from_config(config))
  ckpt_lib.export(os.path.join(stage_dir, 'export'), state['params'], {'config': config.to_dict()})
  return {'steps': cfg.num_steps, 'num_params': int(sum(np.size(x) for x in jax.tree.leaves(state['params'])))}


def load(config, workdir: str):
  """(model, params) of the teacher; `config.teacher.pretrained` says where the parameters come from.

  - '' (default): the teacher stage's export `DIR/teacher/export` of `workdir`.
  - a directory written by `python -m fpd_jax.tools.import_maskgit` (its `--out`, or the `teacher/` inside it): the
    imported released MaskGIT transformer.
  - 'random': a random init with the configured shapes, from `config.seed` as the teacher stage draws it (smoke
    tests and benchmarks at the real size).
  """
  model = build.teacher(config)
  num_tokens = build.token_grid(config) ** 2

  def init(rng):
    return model.init(rng, num_tokens, jnp.zeros((1,), jnp.int32))['params']

  return model, ckpt_lib.load_stage_params(
      config.teacher.get('pretrained', ''), workdir, 'teacher', init, config.seed + 2,
      'python -m fpd_jax.tools.import_maskgit --transformer=maskgit_imagenet256_checkpoint')
