"""Optimizers: AdamW with linear warmup, cosine decay (or constant) and global-norm clipping; frozen subtrees."""

import math
import re

import jax
import optax

from fpd_jax import sharding

SCHEDULES = ('cosine', 'constant')


def make_optimizer(stage_cfg, grad_clip: float) -> optax.GradientTransformation:
  """AdamW for a stage section with `learning_rate`, `num_steps`, optional `warmup_steps`, `weight_decay`,
  `schedule` ('cosine': decay to 0.1x after the warmup, the default; 'constant': stay at the peak) and `b2`."""
  warmup = min(stage_cfg.get('warmup_steps', 0), max(stage_cfg.num_steps - 1, 0))
  if stage_cfg.get('schedule', 'cosine') == 'constant':
    schedule = optax.join_schedules([optax.linear_schedule(0.0, stage_cfg.learning_rate, warmup),
                                     optax.constant_schedule(stage_cfg.learning_rate)], [warmup])
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=stage_cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(stage_cfg.num_steps, warmup + 1), end_value=0.1 * stage_cfg.learning_rate)
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b2=stage_cfg.get('b2', 0.99),
                                 weight_decay=stage_cfg.get('weight_decay', 0.0)))


def is_frozen(name: str, frozen_patterns) -> bool:
  """Whether a parameter path ('a/b/c') matches one of the regular expressions (`re.search`)."""
  return any(re.search(p, name) for p in frozen_patterns)


def trainable_mask(params, frozen_patterns):
  """`True` for every parameter leaf that is trained, `False` for those matching `frozen_patterns`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not is_frozen(sharding.path_name(path), frozen_patterns), params)


def with_frozen(tx: optax.GradientTransformation, frozen_patterns) -> optax.GradientTransformation:
  """`tx` on the trained parameters only: those matching `frozen_patterns` get zero updates and no optimizer
  state (gradient clipping sees the trained ones only)."""
  if not frozen_patterns:
    return tx
  labels = lambda params: jax.tree.map(lambda t: 'train' if t else 'freeze', trainable_mask(params, frozen_patterns))
  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


def num_trained(params, frozen_patterns=()) -> int:
  """Number of trained scalars of `params` (leaves matching `frozen_patterns` excluded)."""
  mask = trainable_mask(params, frozen_patterns)
  return int(sum(math.prod(x.shape) for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if t))
