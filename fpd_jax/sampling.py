"""Iterative MaskGIT decoding (DESIGN.md §1.1); the one-step student generator lives here too.

`iterative_decode` starts from an all-masked grid and runs T steps. Step t samples every masked position from the
(optionally guided) logits at temperature tau, keeps known tokens, and re-masks the
`floor(gamma((t+1)/T) * N)` least-confident new tokens, where confidence = log p(sampled) +
choice_temperature * (1 - (t+1)/T) * Gumbel noise. The last step re-masks nothing.
"""

import functools

import jax
import jax.numpy as jnp

from fpd_jax import mask_schedule
from fpd_jax.models.maskgit import MaskGITModel


def num_masked_after_step(step, num_steps: int, num_unknown, method: str = 'cosine'):
  """How many tokens stay masked after decoding step `step` (0-based) of `num_steps`.

  `floor(gamma((step+1)/T) * unknown)`, but at least 1 and at most `unknown_now - 1` is handled by the caller.
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
    num_steps: T >= 1.
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
    num_mask = jnp.maximum(1, jnp.minimum(jnp.sum(unknown, -1, keepdims=True) - 1, num_mask))
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


def teacher_image_sampler(model: MaskGITModel, tokenizer, grid: int, num_steps: int, sampling_cfg):
  """A jitted `(teacher_params, tokenizer_params, cond, rng) -> images [B, H, W, C] in [0, 1]`.

  Iterative decoding with `num_steps` steps and the settings of `sampling_cfg` (temperature,
  choice_temperature, cfg_scale), then the tokenizer's decoder.
  """

  @jax.jit
  def sample(params, tokenizer_params, cond, rng):
    tokens = iterative_decode(model, params, cond, rng, num_tokens=grid * grid, num_steps=num_steps,
                              temperature=sampling_cfg.temperature,
                              choice_temperature=sampling_cfg.choice_temperature,
                              cfg_scale=sampling_cfg.cfg_scale, **maskgen_options(sampling_cfg))
    return decode_tokens(tokenizer, tokenizer_params, tokens, grid)

  return sample


def maskgen_options(sampling_cfg) -> dict:
  """The optional MaskGen sampler settings of a config's `sampling` section (absent: the class path's defaults)."""
  return {'schedule': sampling_cfg.get('mask_schedule', 'cosine'),
          'cfg_schedule': sampling_cfg.get('cfg_schedule', 'constant'),
          'temperature_end': sampling_cfg.get('temperature_end', None)}


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
                    r_init: float) -> jax.Array:
  """The student's single forward pass on fresh input noise: logits `[B, N, K]`."""
  batch = jax.tree.leaves(cond)[0].shape[0]
  noise = student_input(rng, batch, num_tokens, model.codebook_size, model.mask_id, r_init)
  return model.logits(params, noise, cond)


def one_step_generate(model: MaskGITModel, params, cond, rng: jax.Array, *, num_tokens: int, r_init: float,
                      temperature: float = 1.0, mode: str = 'gumbel') -> jax.Array:
  """One-step generation (inference of the distilled student): noise -> one forward -> hard tokens `[B, N]`."""
  noise_rng, sample_rng = jax.random.split(rng)
  logits = one_step_logits(model, params, cond, noise_rng, num_tokens, r_init)
  return sample_tokens(sample_rng, logits, temperature, mode)


def student_image_sampler(model: MaskGITModel, tokenizer, grid: int, distill_cfg):
  """A jitted `(student_params, tokenizer_params, cond, rng) -> images [B, H, W, C] in [0, 1]`."""

  @jax.jit
  def sample(params, tokenizer_params, cond, rng):
    tokens = one_step_generate(model, params, cond, rng, num_tokens=grid * grid, r_init=distill_cfg.r_init,
                               temperature=distill_cfg.student_temperature, mode=distill_cfg.student_sampling)
    return decode_tokens(tokenizer, tokenizer_params, tokens, grid)

  return sample
