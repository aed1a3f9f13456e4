"""Di[M]O (Zhu et al. 2025), the baseline FPD is compared with (DESIGN.md §1.5), one function per idea.

    draft      z_hat ~ softmax(student(x, c) / tau_s), x = random codes with a fixed fraction masked and
               embedding noise sigma*eps + sqrt(1 - sigma^2)*e on the image tokens' embeddings
    re-mask    M(z_hat): ceil(gamma(r) * N) positions masked, gamma the `remask_schedule` (arccos), r ~ U[0, 1)
    score gap  g = p_aux(M(z_hat)) - p_teacher(M(z_hat)) on the re-masked positions, 0 elsewhere (stop-gradient;
               teacher with CFG w_T, auxiliary model without)
    student    L = 0.5 * ||l - sg(l - g)||^2 / B  (sum over positions and codes): dL/dl = g / B
    auxiliary  label-smoothed cross-entropy of the auxiliary ("fake") model on a fresh, freshly re-masked draft
               of the updated student: it tracks the student's distribution as the teacher tracks the data's

Student and auxiliary model both start as copies of the teacher; both are trained (two optimizer states).
Knobs: `config.distill.dimo` (configs/demo.py). CFG follows this project's convention
(1 + w) * cond - w * uncond, so the reference's "cfg 2" is w = 1 here and its "cfg 1" is w = 0.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fpd_jax import mask_schedule
from fpd_jax import sampling
from fpd_jax.models.maskgit import MaskGITModel
from fpd_jax.train import teacher as teacher_stage


@dataclasses.dataclass(frozen=True)
class DiMOModels:
  """The module of the Di[M]O step (teacher, student and auxiliary model share it) and its token count."""
  teacher: MaskGITModel  # Or the text demos' MaskGen model (the same interface).
  grid: int
  num_tokens: int = 0  # Image tokens per sample when not grid**2 (the released MaskGen's 1-D tokens).


def draft(model: MaskGITModel, student_params, cond, rng: jax.Array, num_tokens: int, cfg):
  """One student forward on Di[M]O's input noise; returns (logits `[B, N, K]`, sampled tokens `[B, N]`)."""
  noise_rng, sample_rng = jax.random.split(rng)
  logits = sampling.one_step_logits(model, student_params, cond, noise_rng, num_tokens, cfg.mask_fraction,
                                    cfg.embedding_noise)
  tokens = sampling.sample_tokens(sample_rng, logits, cfg.student_temperature, 'gumbel')
  return logits, jax.lax.stop_gradient(tokens)


def score_gap(model: MaskGITModel, teacher_params, aux_params, corrupted: jax.Array, mask: jax.Array, cond,
              cfg) -> jax.Array:
  """g = p_aux - p_teacher on the re-masked positions, 0 elsewhere, `[B, N, K]` (no gradient to either model)."""
  teacher_logits = model.guided_logits(teacher_params, corrupted, cond, cfg.teacher_cfg_scale)
  aux_logits = model.guided_logits(aux_params, corrupted, cond, cfg.aux_cfg_scale)
  gap = jax.nn.softmax(aux_logits, -1) - jax.nn.softmax(teacher_logits / cfg.teacher_temperature, -1)
  return jax.lax.stop_gradient(jnp.where(mask[..., None], gap, 0.0))


def distribution_matching_loss(logits: jax.Array, gap: jax.Array) -> jax.Array:
  """0.5 * ||l - sg(l - g)||^2 / B: its gradient with respect to the logits is exactly g / B."""
  return 0.5 * jnp.sum(jnp.square(logits - jax.lax.stop_gradient(logits - gap))) / logits.shape[0]


def student_loss(student_params, aux_params, teacher_params, model: MaskGITModel, cond, rng: jax.Array,
                 num_tokens: int, cfg) -> tuple[jax.Array, dict]:
  """The student's Di[M]O loss of one batch of conditions and its metrics (`cfg` = `config.distill.dimo`).

  Gradients flow to `student_params` only; the auxiliary and teacher parameters are held fixed.
  """
  draft_rng, mask_rng = jax.random.split(rng)
  logits, tokens = draft(model, student_params, cond, draft_rng, num_tokens, cfg)
  corrupted, mask = mask_schedule.mask_tokens(mask_rng, tokens, model.mask_id, cfg.remask_schedule)
  gap = score_gap(model, jax.lax.stop_gradient(teacher_params), jax.lax.stop_gradient(aux_params), corrupted,
                  mask, cond, cfg)
  loss = distribution_matching_loss(logits, gap)
  masked = jnp.maximum(jnp.sum(mask), 1)
  metrics = {'loss': loss,
             # Total-variation distance between the auxiliary and teacher predictions on re-masked positions.
             'aux_teacher_tv': 0.5 * jnp.sum(jnp.abs(gap)) / masked,
             'remask_fraction': jnp.mean(mask)}
  return loss, metrics


def aux_loss(aux_params, student_params, model: MaskGITModel, cond, rng: jax.Array, num_tokens: int,
             cfg) -> tuple[jax.Array, dict]:
  """The auxiliary model's loss: the teacher's masked-token cross-entropy on a fresh draft of the student."""
  draft_rng, loss_rng = jax.random.split(rng)
  _, tokens = draft(model, jax.lax.stop_gradient(student_params), cond, draft_rng, num_tokens, cfg)
  loss, metrics = teacher_stage.masked_token_loss(model, aux_params, tokens, cond, loss_rng,
                                                  label_smoothing=cfg.aux_label_smoothing, p_uncond=0.0,
                                                  schedule=cfg.remask_schedule, deterministic=True)
  return loss, {'aux_loss': loss, 'aux_masked_accuracy': metrics['masked_accuracy']}
