"""Iterative MaskGIT decoding (DESIGN.md §1.1); the one-step student generator lives here too.

`iterative_decode` starts from an all-masked grid and runs T steps. Step t samples every masked position from the
(optionally guided) logits at temperature tau, keeps known tokens, and re-masks the
`floor(gamma((t+1)/T) * N)` least-confident new tokens, where confidence = log p(sampled) +
choice_temperature * (1 - (t+1)/T) * Gumbel noise. The last step re-masks nothing; known tokens are never
re-masked (a grid with no masked position comes back unchanged). gamma is the configured
`config.teacher.mask_schedule` (`decode_settings`), the schedule the teacher was trained with.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fpd_jax import mask_schedule
from fpd_jax.errors import UserError
from fpd_jax.errors import check_positive
from fpd_jax.models.maskgit import MaskGITModel


def num_masked_after_step(step, num_steps: int, num_unknown, method: str = 'cosine'):
  """How many tokens stay masked after decoding step `step` (0-based) of `num_steps`.

  `floor(gamma((step+1)/T) * unknown)`; the caller clamps it to [1, unknown_now - 1] (0 when nothing is unknown).
  """
  ratio = (step + 1.0) / num_steps
  return jnp.floor(num_unknown * mask_schedule.gamma(ratio, method))


def iterative_decode(model: MaskGITModel, params, cond, rng: jax.Array, *, num_tokens: int, num_steps: int,
                     temperature: float = 1.0, choice_temperature: float = 4.5, cfg_scale: float = 0.0,
                     schedule: str = 'cosine', init_tokens: jax.Array | None = None,
                     return_trace: bool = False, cfg_schedule: str = 'constant',
                     temperature_end: float | None = None):
  """MaskGIT decoding of `num_tokens` tokens per example in `num_steps` steps.

  Args:
    model: the conditioned transformer.
    params: its parameters.
    cond: condition pytree (batch leading).
    rng: PRNG key.
    num_tokens: N.
    num_steps: T >= 1 (a Python int or a traced int32 scalar; `return_trace` needs a Python int).
    temperature: sampling temperature tau.
    choice_temperature: scale of the Gumbel noise on the re-masking confidence (annealed linearly to 0).
    cfg_scale: classifier-free guidance w (0: none).
    schedule: the gamma of `mask_schedule`.
    init_tokens: optional start grid (mask ids where unknown; known tokens are never changed).
    return_trace: also return the grid after each step's re-masking, `[B, T, N]`.
    cfg_schedule: 'constant' (w at every step) or 'cosine' (MaskGen's ramp: w * (1 - cos(pi * (t+1)/T)) / 2, full w
      at the last step; needs a model whose `guided_logits` takes a traced scale, e.g. MaskGenModel).
    temperature_end: None (constant tau) or the tau of the last step, annealed linearly from `temperature` (MaskGen:
      1.3 -> 0.5).

  Returns:
    tokens `[B, N]` (and the trace when asked).
  """
  batch = jax.tree.leaves(cond)[0].shape[0]
  if init_tokens is None:
    init_tokens = jnp.full((batch, num_tokens), model.mask_id, jnp.int32)
  num_unknown0 = jnp.sum(init_tokens == model.mask_id, axis=-1, keepdims=True)

  def body(step, carry):
    tokens, rng, trace = carry
    rng, sample_rng, choice_rng = jax.random.split(rng, 3)
    logits = model.guided_logits(params, tokens, cond, guidance_at(step, num_steps, cfg_scale, cfg_schedule))
    unknown = tokens == model.mask_id
    tau = temperature
    if temperature_end is not None:
      tau = temperature_end + (temperature - temperature_end) * (1.0 - (step + 1.0) / num_steps)
    sampled = jax.random.categorical(sample_rng, logits / tau)
    sampled = jnp.where(unknown, sampled, tokens)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    selected = jnp.take_along_axis(log_probs, sampled[..., None], axis=-1)[..., 0]
    ratio = (step + 1.0) / num_steps
    confidence = selected + choice_temperature * (1.0 - ratio) * jax.random.gumbel(choice_rng, selected.shape)
    confidence = jnp.where(unknown, confidence, jnp.inf)  # Known tokens are never re-masked.
    num_mask = num_masked_after_step(step, num_steps, num_unknown0, schedule)
    num_unknown = jnp.sum(unknown, -1, keepdims=True)
    num_mask = jnp.maximum(1, jnp.minimum(num_unknown - 1, num_mask))
    num_mask = jnp.where(num_unknown == 0, 0, num_mask)  # A row with nothing left to decode stays as it is.
    num_mask = jnp.where(step == num_steps - 1, 0, num_mask)  # The last step keeps everything.
    remask = lowest_k(confidence, num_mask)
    tokens = jnp.where(remask, model.mask_id, sampled)
    trace = trace.at[:, step].set(tokens) if return_trace else trace
    return tokens, rng, trace

  trace = jnp.zeros((batch, num_steps if return_trace else 0, num_tokens), jnp.int32)
  tokens, _, trace = jax.lax.fori_loop(0, num_steps, body, (init_tokens.astype(jnp.int32), rng, trace))
  return (tokens, trace) if return_trace else tokens


def guidance_at(step, num_steps: int, cfg_scale: float, cfg_schedule: str = 'constant'):
  """The CFG scale of decoding step `step`: constant, or MaskGen's cosine ramp up to `cfg_scale`."""
  if cfg_schedule == 'constant' or cfg_scale == 0:
    return cfg_scale
  if cfg_schedule == 'cosine':
    return cfg_scale * (1.0 - jnp.cos(jnp.pi * (step + 1.0) / num_steps)) / 2.0
  raise ValueError(f"Unknown cfg_schedule {cfg_schedule!r}; use 'constant' or 'cosine'.")


def lowest_k(scores: jax.Array, k: jax.Array) -> jax.Array:
  """Boolean mask of the k[b] lowest scores in each row (ties broken by position)."""
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)
  return ranks < k


@functools.partial(jax.jit, static_argnames=('model', 'num_tokens', 'num_steps', 'temperature',
                                             'choice_temperature', 'cfg_scale', 'schedule'))
def decode_jit(model, params, cond, rng, *, num_tokens, num_steps, temperature=1.0, choice_temperature=4.5,
               cfg_scale=0.0, schedule='cosine'):
  """Jitted `iterative_decode` (compiled once per model and step count)."""
  return iterative_decode(model, params, cond, rng, num_tokens=num_tokens, num_steps=num_steps,
                          temperature=temperature, choice_temperature=choice_temperature,
                          cfg_scale=cfg_scale, schedule=schedule)


def validate(config) -> None:
  """Fails fast, with the fix named, on sampling settings that would divide by zero (or NaN) when sampling: the
  token temperature, the re-masking noise scale, the mask schedule and the one-step student's temperature."""
  check_positive('sampling.temperature', config.sampling.temperature,
                 'the logits are divided by it (1.0 samples the model as trained).')
  if not config.sampling.choice_temperature >= 0:
    raise UserError(f'config.sampling.choice_temperature={config.sampling.choice_temperature!r} must be >= 0 '
                    '(0: no noise on the re-masking confidence; the reference uses 4.5).')
  schedule = config.teacher.get('mask_schedule', 'cosine')
  if schedule not in mask_schedule.METHODS:
    raise UserError(f'config.teacher.mask_schedule={schedule!r}; choose one of {mask_schedule.METHODS}.')
  if 'distill' in config:
    check_positive('distill.student_temperature', config.distill.student_temperature,
                   "for deterministic drafts set config.distill.student_sampling='argmax' instead.")


def decode_settings(config) -> dict:
  """The keyword settings of `iterative_decode` a config asks for: `config.sampling` (temperature,
  choice_temperature, cfg_scale, and MaskGen's optional cfg_schedule and temperature_end) and the mask schedule:
  `config.sampling.mask_schedule` where a config sets one (MaskGen decodes with arccos), else
  `config.teacher.mask_schedule`, the schedule the teacher was trained with."""
  s = config.sampling
  return {'temperature': s.temperature, 'choice_temperature': s.choice_temperature, 'cfg_scale': s.cfg_scale,
          'schedule': s.get('mask_schedule', config.teacher.get('mask_schedule', 'cosine')),
          'cfg_schedule': s.get('cfg_schedule', 'constant'), 'temperature_end': s.get('temperature_end', None)}


def teacher_image_sampler(model: MaskGITModel, tokenizer, grid: int, config):
  """A jitted `(teacher_params, tokenizer_params, cond, rng, num_steps) -> images [B, H, W, C] in [0, 1]`.

  Iterative decoding with `num_steps` steps and the config's `decode_settings`, then the tokenizer's decoder.
  `num_steps` is traced (an int32 scalar), so one compiled program serves every step count (the evaluation's
  teacher rows compile once, not once per row).
  """
  settings = decode_settings(config)

  @jax.jit
  def sample(params, tokenizer_params, cond, rng, num_steps):
    tokens = iterative_decode(model, params, cond, rng, num_tokens=grid * grid, num_steps=num_steps, **settings)
    return decode_tokens(tokenizer, tokenizer_params, tokens, grid)

  return sample


def decode_tokens(tokenizer, tokenizer_params, tokens: jax.Array, grid: int) -> jax.Array:
  """Flat tokens `[B, N]` -> images `[B, H, W, C]` clipped to [0, 1]."""
  ids = tokens.reshape(tokens.shape[0], grid, grid)
  images = tokenizer.apply({'params': tokenizer_params}, ids, method='decode_from_indices')
  return jnp.clip(images, 0.0, 1.0)


def student_input(rng: jax.Array, batch: int, num_tokens: int, codebook_size: int, mask_id: int,
                  r_init: float) -> jax.Array:
  """The one-step generator's input noise (DESIGN.md §1.2): `round(r_init * N)` random positions hold the mask
  token, the others uniform random codes (the randomness source)."""
  pos_rng, code_rng = jax.random.split(rng)
  num_masked = jnp.full((batch, 1), round(r_init * num_tokens))
  masked = mask_schedule.mask_random_positions(pos_rng, num_masked, (batch, num_tokens))
  codes = jax.random.randint(code_rng, (batch, num_tokens), 0, codebook_size)
  return jnp.where(masked, mask_id, codes)


def sample_tokens(rng: jax.Array, logits: jax.Array, temperature: float, mode: str) -> jax.Array:
  """Hard tokens from logits: Gumbel-max at `temperature` (`mode='gumbel'`) or `argmax`."""
  if mode == 'argmax':
    return jnp.argmax(logits, axis=-1)
  if mode == 'gumbel':
    return jnp.argmax(logits / temperature + jax.random.gumbel(rng, logits.shape), axis=-1)
  raise ValueError(f'Unknown student sampling {mode!r}; use "gumbel" or "argmax".')


def one_step_logits(model: MaskGITModel, params, cond, rng: jax.Array, num_tokens: int,
                    r_init: float, embedding_noise: float = 0.0) -> jax.Array:
  """The student's single forward pass on fresh input noise: logits `[B, N, K]`.

  `embedding_noise` sigma > 0 also perturbs the input tokens' embeddings (Di[M]O's generator, DESIGN.md §1.5).
  """
  batch = jax.tree.leaves(cond)[0].shape[0]
  noise = student_input(rng, batch, num_tokens, model.codebook_size, model.mask_id, r_init)
  return model.logits(params, noise, cond, embedding_noise=embedding_noise,
                      noise_rng=jax.random.fold_in(rng, 1) if embedding_noise > 0 else None)


@dataclasses.dataclass(frozen=True)
class OneStepSettings:
  """How a distilled student generates (its config travels with the export, so sampling needs nothing else)."""
  r_init: float  # Fraction of input positions holding the mask token.
  temperature: float  # Sampling temperature of the hard tokens.
  mode: str  # 'gumbel' or 'argmax'.
  embedding_noise: float = 0.0  # sigma of the input-embedding noise (Di[M]O).

  @classmethod
  def from_distill_config(cls, distill_cfg) -> 'OneStepSettings':
    """The generator of `config.distill`: FPD's fields, or those of `distill.dimo` for `method='dimo'`."""
    if distill_cfg.get('method', 'fpd') == 'dimo':
      d = distill_cfg.dimo
      return cls(d.mask_fraction, d.sample_temperature, 'gumbel', d.embedding_noise)
    return cls(distill_cfg.r_init, distill_cfg.student_temperature, distill_cfg.student_sampling)


def one_step_generate(model: MaskGITModel, params, cond, rng: jax.Array, *, num_tokens: int,
                      settings: OneStepSettings) -> jax.Array:
  """One-step generation (inference of the distilled student): noise -> one forward -> hard tokens `[B, N]`."""
  noise_rng, sample_rng = jax.random.split(rng)
  logits = one_step_logits(model, params, cond, noise_rng, num_tokens, settings.r_init, settings.embedding_noise)
  return sample_tokens(sample_rng, logits, settings.temperature, settings.mode)


def student_image_sampler(model: MaskGITModel, tokenizer, grid: int, distill_cfg):
  """A jitted `(student_params, tokenizer_params, cond, rng) -> images [B, H, W, C] in [0, 1]`."""
  settings = OneStepSettings.from_distill_config(distill_cfg)

  @jax.jit
  def sample(params, tokenizer_params, cond, rng):
    tokens = one_step_generate(model, params, cond, rng, num_tokens=grid * grid, settings=settings)
    return decode_tokens(tokenizer, tokenizer_params, tokens, grid)

  return sample
