"""The Fixed-Point Distillation objective (DESIGN.md §1.3), one function per step of the method.

    draft      z_hat ~ student(noise, c)                              (one forward, Gumbel-max or argmax)
    corrupt    M_r(z_hat): re-mask a random fraction r of positions
    refine     z_tilde = one teacher step on M_r(z_hat), only masked positions filled   (stop_gradient)
    lift       e = E[z_hat] + p.E - stop_gradient(p.E)                 (straight-through, `ste.lift`)
    features   phi(decode(e)) for the student, stop_gradient(phi(decode(E[z_tilde]))) for the target
    drift      multi-bandwidth drift loss per feature layer, groups = samples of one condition
    (gan)      optional non-saturating/hinge generator loss on decode(e)

The student is trained toward the fixed point p_theta = (T_phi o M_r)# p_theta. Ablation switches (`lift`,
`refine_source`, `drift_space`, `temperatures`, `gan.enabled`) are config fields of `config.distill`.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fpd_jax import mask_schedule
from fpd_jax import sampling
from fpd_jax.distill import drift
from fpd_jax.distill import gan as gan_lib
from fpd_jax.distill import ste
from fpd_jax.models.maskgit import MaskGITModel

REFINE_SOURCES = ('draft', 'random')


@dataclasses.dataclass(frozen=True)
class FPDModels:
  """The modules of the FPD step (their parameters are passed separately).

  Attributes:
    teacher: the multi-step teacher; the student has the same architecture.
    tokenizer: the VQGAN whose decoder maps embeddings to images (frozen), or a tokenizer with
      `decode_embeddings(params, embeddings, cond)` and `codebook(params)` (1-D and reading the condition:
      `tatitok.TextConditionedTokenizer`).
    features: feature encoder phi, `(params, images) -> list of [B, S_j]` (frozen).
    discriminator: the GAN discriminator (trained; used only when the GAN is enabled).
    grid: side of the token grid.
    num_tokens: tokens per image when they form no square grid (0: grid ** 2).
  """
  teacher: MaskGITModel
  tokenizer: Any
  features: Callable
  discriminator: Any
  grid: int
  num_tokens: int = 0


def corrupt(rng: jax.Array, tokens: jax.Array, mask_id: int, r_min: float, r_max: float):
  """M_r: re-masks `round(r * N)` random positions per example, r ~ U[r_min, r_max]. Returns (tokens, mask)."""
  r_rng, pos_rng = jax.random.split(rng)
  batch, n = tokens.shape
  r = jax.random.uniform(r_rng, (batch, 1), minval=r_min, maxval=r_max)
  mask = mask_schedule.mask_random_positions(pos_rng, jnp.maximum(1, jnp.round(r * n)), (batch, n))
  return jnp.where(mask, mask_id, tokens), mask


def refine(teacher: MaskGITModel, teacher_params, corrupted: jax.Array, mask: jax.Array, cond, rng: jax.Array,
           *, temperature: float, cfg_scale: float) -> jax.Array:
  """T_phi: one teacher step on the corrupted draft; samples only the masked positions (no gradient)."""
  logits = teacher.guided_logits(jax.lax.stop_gradient(teacher_params), corrupted, cond, cfg_scale)
  filled = jax.random.categorical(rng, logits / temperature)
  return jax.lax.stop_gradient(jnp.where(mask, filled, corrupted))


def codebook_of(models: FPDModels, tokenizer_params) -> jax.Array:
  """The codebook E `[K, D]` of the lift: the VQGAN quantizer's, or a 1-D tokenizer's own."""
  if hasattr(models.tokenizer, 'decode_embeddings'):
    return models.tokenizer.codebook(tokenizer_params)
  return tokenizer_params['quantizer']['codebook']


def decode_embeddings(models: FPDModels, tokenizer_params, embeddings: jax.Array, cond=None) -> jax.Array:
  """Token embeddings `[B, N, D]` -> images through the frozen decoder (raw output, gradients pass); a decoder that
  reads the condition (TA-TiTok reads the caption) gets `cond`."""
  if hasattr(models.tokenizer, 'decode_embeddings'):
    return models.tokenizer.decode_embeddings(tokenizer_params, embeddings, cond)
  b, _, d = embeddings.shape
  grid = embeddings.reshape(b, models.grid, models.grid, d)
  return models.tokenizer.apply({'params': tokenizer_params}, grid, method='decode')


def fixed_point_gap(student_feats, target_feats) -> jax.Array:
  """How far drafts are from their refinements: mean over layers of E||x - y||^2 / E||y||^2 (paired samples).

  The drift loss itself is RMS-normalised (its value stays O(#bandwidths^2) by design), so this is the number to
  watch: it goes to 0 as the student approaches the fixed point of corrupt-and-refine.
  """
  gaps = [jnp.sum(jnp.square(x - y)) / jnp.maximum(jnp.sum(jnp.square(y)), 1e-12)
          for x, y in zip(student_feats, target_feats)]
  return jax.lax.stop_gradient(sum(gaps) / len(gaps))


def with_frozen_text(teacher, frozen_params: dict):
  """The teacher reading the text tower of the step's frozen inputs, where they hold one.

  The released MaskGen's text tower travels with the tokenizer's frozen parameters (the decoder reads it too): the
  teacher reads that copy, an input of the step, rather than a constant compiled into it.
  """
  tokenizer = frozen_params.get('tokenizer', {})
  if hasattr(teacher, 'bind_text') and isinstance(tokenizer, dict) and 'text_encoder' in tokenizer:
    return teacher.bind_text(tokenizer['text_encoder'])
  return teacher


def fpd_loss(student_params, disc_params, frozen_params: dict, models: FPDModels, cond, rng: jax.Array,
             cfg) -> tuple[jax.Array, tuple[dict, jax.Array]]:
  """The FPD loss of one batch of conditions (grouped contiguously by condition) and its metrics.

  Args:
    student_params: the trained student's parameters (gradients flow here).
    disc_params: discriminator parameters (used only when `cfg.gan.enabled`; held fixed in this loss).
    frozen_params: {'teacher', 'tokenizer', 'features'} parameters (never differentiated).
    models: the modules.
    cond: conditions `[B]`, `cfg.samples_per_group` consecutive examples share one.
    rng: PRNG key.
    cfg: `config.distill`.

  Returns:
    (loss, (metrics, student_images)): metrics hold the drift loss per layer and, with the GAN, the generator
    loss; the decoded student images (stop-gradient) feed the discriminator update.
  """
  if cfg.refine_source not in REFINE_SOURCES:
    raise ValueError(f'Unknown distill.refine_source {cfg.refine_source!r}; choose one of {REFINE_SOURCES}.')
  frozen_params = jax.lax.stop_gradient(frozen_params)
  teacher = with_frozen_text(models.teacher, frozen_params)
  noise_rng, draft_rng, source_rng, corrupt_rng, refine_rng = jax.random.split(rng, 5)
  batch = jax.tree.leaves(cond)[0].shape[0]
  num_tokens = models.num_tokens or models.grid ** 2

  # 1. Draft: one student forward on input noise, hard tokens.
  logits = sampling.one_step_logits(teacher, student_params, cond, noise_rng, num_tokens, cfg.r_init)
  draft = jax.lax.stop_gradient(
      sampling.sample_tokens(draft_rng, logits, cfg.student_temperature, cfg.student_sampling))
  # 2-3. Corrupt and refine with one teacher step (the `random` ablation refines random tokens instead).
  source = draft
  if cfg.refine_source == 'random':
    source = jax.random.randint(source_rng, draft.shape, 0, teacher.codebook_size)
  corrupted, mask = corrupt(corrupt_rng, source, teacher.mask_id, *cfg.remask_range)
  target = refine(teacher, frozen_params['teacher'], corrupted, mask, cond, refine_rng,
                  temperature=cfg.teacher_temperature, cfg_scale=cfg.teacher_cfg_scale)
  # 4. Lift: straight-through (or soft) embedding of the draft.
  codebook = codebook_of(models, frozen_params['tokenizer'])
  decode, features = decode_embeddings, models.features
  if cfg.get('remat', False):  # Recompute the decoder and encoder activations in the backward pass.
    decode = jax.checkpoint(decode_embeddings, static_argnums=(0,))
    features = jax.checkpoint(models.features)
  student_images = decode(models, frozen_params['tokenizer'], ste.lift(logits, draft, codebook, cfg.lift), cond)
  target_images = jax.lax.stop_gradient(
      decode_embeddings(models, frozen_params['tokenizer'], jnp.take(codebook, target, axis=0), cond))
  # 5. Features (student keeps gradients, target is stop-gradient).
  student_feats = features(frozen_params['features'], student_images)
  target_feats = jax.lax.stop_gradient(models.features(frozen_params['features'], target_images))
  # 6. Multi-bandwidth drift loss, groups = samples of one condition.
  num_groups = batch // cfg.samples_per_group
  loss, per_layer = drift.multi_layer_drift_loss(student_feats, target_feats, num_groups,
                                                 tuple(cfg.temperatures))
  metrics = {f'drift_{j}': l for j, l in enumerate(per_layer)}
  metrics['fixed_point_gap'] = fixed_point_gap(student_feats, target_feats)
  metrics['drift'] = loss
  metrics['refined_changed'] = jnp.mean((target != source) & mask) / jnp.maximum(jnp.mean(mask), 1e-6)
  # 7. Optional GAN: the generator gradient reaches the logits through the decoder and the STE.
  if cfg.gan.enabled:
    gen_loss = gan_lib.generator_loss(models.discriminator.apply({'params': disc_params}, student_images),
                                      cfg.gan.loss)
    metrics['gan_generator'] = gen_loss
    loss = loss + cfg.gan.weight * gen_loss
  metrics['loss'] = loss
  return loss, (metrics, jax.lax.stop_gradient(student_images))
