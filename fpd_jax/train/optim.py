"""Optimizers: AdamW with linear warmup, cosine decay and global-norm clipping."""

import optax


def make_optimizer(stage_cfg, grad_clip: float) -> optax.GradientTransformation:
  """AdamW for a stage section with `learning_rate`, `num_steps`, optional `warmup_steps`, `weight_decay`."""
  warmup = min(stage_cfg.get('warmup_steps', 0), max(stage_cfg.num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=stage_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(stage_cfg.num_steps, warmup + 1), end_value=0.1 * stage_cfg.learning_rate)
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.adamw(schedule, b2=0.99, weight_decay=stage_cfg.get('weight_decay', 0.0)))
