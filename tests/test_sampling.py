"""Mask schedule and MaskGIT decoding invariants."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from fpd_jax import conditioning
from fpd_jax import mask_schedule
from fpd_jax import sampling
from fpd_jax.models import maskgit

K, N = 16, 12


@pytest.fixture(scope='module')
def model_and_params():
  cond = conditioning.ClassConditioner(codebook_size=K, num_classes=3)
  model = maskgit.MaskGITModel(maskgit.Transformer(vocab_size=K + 4 + 1, hidden_size=32, num_layers=1,
                                                   num_heads=2, mlp_dim=64, max_position_embeddings=N + 1),
                               cond, codebook_size=K)
  return model, jax.jit(lambda rng: model.init(rng, N, jnp.zeros((1,), jnp.int32)))(jax.random.key(0))['params']


def test_cosine_schedule_values():
  np.testing.assert_allclose(mask_schedule.gamma(0.0), 1.0)
  np.testing.assert_allclose(mask_schedule.gamma(0.5), math.cos(math.pi / 4), rtol=1e-6)
  np.testing.assert_allclose(mask_schedule.gamma(1.0), 1e-6)  # Clipped like the reference.
  ratios = jnp.linspace(0, 1, 11)
  assert np.all(np.diff(mask_schedule.gamma(ratios)) <= 0)
  with pytest.raises(ValueError, match='Unknown mask schedule'):
    mask_schedule.gamma(0.3, 'nope')


def test_random_mask_counts_follow_gamma():
  mask = mask_schedule.random_mask(jax.random.key(3), 512, 49)
  counts = np.asarray(mask.sum(-1))
  assert counts.min() >= 1 and counts.max() <= 49
  # r ~ U[0,1): E[ceil(cos(pi r / 2) * 49)] ~= 49 * 2/pi + 0.5.
  assert abs(counts.mean() - (49 * 2 / math.pi + 0.5)) < 1.5
  exact = mask_schedule.mask_random_positions(jax.random.key(1), jnp.array([[0], [3], [7]]), (3, 7))
  np.testing.assert_array_equal(exact.sum(-1), [0, 3, 7])


def test_block_mask_hides_whole_aligned_blocks_in_gamma_counts():
  """Each row masks ceil(gamma(r) * M) of its M aligned 4x4 blocks, every token of a block alike."""
  mask = np.asarray(mask_schedule.block_mask(jax.random.key(0), 256, 64, 4, 'arccos'))
  blocks = mask.reshape(256, 2, 4, 2, 4)
  per_block = blocks.sum((2, 4))
  assert set(np.unique(per_block)) <= {0, 16}  # Whole blocks or nothing.
  counts = (per_block == 16).sum((1, 2))
  assert counts.min() >= 1 and counts.max() == 4 and len(set(counts)) == 4  # 1..4 of the 4 cells seen.
  with pytest.raises(ValueError, match='multiple of the block'):
    mask_schedule.block_mask(jax.random.key(0), 2, 64, 3)


def test_mask_tokens_mixes_block_rows_by_probability():
  """block_prob 0 is the token-level mask unchanged (same key, same mask); 0.5 makes about half the rows blocky."""
  tokens = jnp.zeros((400, 64), jnp.int32)
  key = jax.random.key(7)
  plain = mask_schedule.mask_tokens(key, tokens, 99, 'arccos')[1]
  np.testing.assert_array_equal(plain, mask_schedule.random_mask(key, 400, 64, 'arccos'))
  np.testing.assert_array_equal(plain, mask_schedule.mask_tokens(key, tokens, 99, 'arccos', 4, 0.0)[1])
  masked, mixed = mask_schedule.mask_tokens(key, tokens, 99, 'arccos', 4, 0.5)
  np.testing.assert_array_equal(masked == 99, mixed)
  per_block = np.asarray(mixed).reshape(400, 2, 4, 2, 4).sum((2, 4))
  blocky = np.all((per_block == 0) | (per_block == 16), axis=(1, 2)) & ~np.all(per_block == 16, axis=(1, 2))
  assert 0.2 < blocky.mean() < 0.5  # Half the rows are block rows; a third of those mask every cell.


@pytest.mark.parametrize('steps', [1, 4, 8])
def test_decode_masked_count_follows_schedule(model_and_params, steps):
  model, params = model_and_params
  labels = jnp.array([0, 1, 2, 1])
  tokens, trace = sampling.iterative_decode(model, params, labels, jax.random.key(1), num_tokens=N,
                                            num_steps=steps, return_trace=True)
  masked = np.asarray((trace == model.mask_id).sum(-1))  # [B, T]
  unknown = N
  for t in range(steps - 1):
    expected = math.floor(N * math.cos(math.pi / 2 * (t + 1) / steps))
    expected = max(1, min(unknown - 1, expected))
    np.testing.assert_array_equal(masked[:, t], expected)
    unknown = expected
  assert (masked[:, -1] == 0).all() and (tokens != model.mask_id).all()
  assert tokens.min() >= 0 and tokens.max() < K


def test_decode_never_changes_known_tokens(model_and_params):
  model, params = model_and_params
  labels = jnp.array([0, 1, 2])
  init = jax.random.randint(jax.random.key(5), (3, N), 0, K)
  known = jax.random.bernoulli(jax.random.key(6), 0.5, (3, N))
  init = jnp.where(known, init, model.mask_id)
  tokens, trace = sampling.iterative_decode(model, params, labels, jax.random.key(2), num_tokens=N, num_steps=4,
                                            init_tokens=init, return_trace=True)
  for t in range(4):
    np.testing.assert_array_equal(jnp.where(known, trace[:, t], -7), jnp.where(known, init, -7))
  np.testing.assert_array_equal(jnp.where(known, tokens, -7), jnp.where(known, init, -7))
  # Once unmasked, a token is never changed by a later step.
  for t in range(1, 4):
    decided = trace[:, t - 1] != model.mask_id
    np.testing.assert_array_equal(jnp.where(decided, trace[:, t], -7), jnp.where(decided, trace[:, t - 1], -7))


def test_cfg_zero_equals_no_cfg(model_and_params):
  model, params = model_and_params
  labels = jnp.array([0, 1, 2, 0])
  kwargs = dict(num_tokens=N, num_steps=4)
  plain = sampling.iterative_decode(model, params, labels, jax.random.key(9), **kwargs)
  cfg0 = sampling.iterative_decode(model, params, labels, jax.random.key(9), cfg_scale=0.0, **kwargs)
  np.testing.assert_array_equal(plain, cfg0)
  guided = sampling.iterative_decode(model, params, labels, jax.random.key(9), cfg_scale=3.0, **kwargs)
  assert guided.shape == plain.shape


def test_decode_returns_a_fully_known_input_unchanged(model_and_params):
  """Rows with no masked position come back as given (no known token is re-masked); other rows still decode."""
  model, params = model_and_params
  labels = jnp.array([0, 1, 2, 0])
  init = jax.random.randint(jax.random.key(7), (4, N), 0, K)
  init = init.at[3, :5].set(model.mask_id)  # Row 3 has masked positions; rows 0-2 are fully known.
  for steps in (1, 2, 4, 8):
    tokens, trace = sampling.iterative_decode(model, params, labels, jax.random.key(3), num_tokens=N,
                                              num_steps=steps, init_tokens=init, return_trace=True)
    for t in range(steps):
      np.testing.assert_array_equal(trace[:3, t], init[:3], err_msg=f'step {t} of {steps}')
    np.testing.assert_array_equal(tokens[:3], init[:3])
    np.testing.assert_array_equal(tokens[3, 5:], init[3, 5:])
    assert (tokens[3] != model.mask_id).all()


def test_teacher_sampler_decodes_with_the_configured_mask_schedule(tiny_fpd):
  """`teacher.mask_schedule` reaches decoding: the sampler equals iterative_decode with that schedule."""
  config = demo.get_config('tiny')
  config.teacher.mask_schedule = 'linear'
  models, frozen, _ = tiny_fpd(config)
  labels, rng, steps = jnp.arange(4) % 10, jax.random.key(4), 2
  images = sampling.teacher_image_sampler(models.teacher, models.tokenizer, models.grid, config)(
      frozen['teacher'], frozen['tokenizer'], labels, rng, steps)

  def expected(schedule, params):
    tokens = sampling.iterative_decode(models.teacher, params['teacher'], labels, rng, num_tokens=models.grid ** 2,
                                       num_steps=steps, temperature=config.sampling.temperature,
                                       choice_temperature=config.sampling.choice_temperature,
                                       cfg_scale=config.sampling.cfg_scale, schedule=schedule)
    return sampling.decode_tokens(models.tokenizer, params['tokenizer'], tokens, models.grid)

  # Both in one compiled program (run op by op, the decoder compiles every op on its own).
  linear, cosine = jax.jit(lambda params: (expected('linear', params), expected('cosine', params)))(frozen)
  assert not np.allclose(linear, cosine)  # The schedules differ at T=2 (24 vs 34 of 49 tokens stay masked).
  np.testing.assert_allclose(images, linear, atol=1e-5)


def test_teacher_sampler_compiles_once_for_every_step_count(tiny_fpd):
  """The step count is traced: one program serves 1, 2 and 3 steps, and each equals decoding with a static count."""
  config = demo.get_config('tiny')
  models, frozen, _ = tiny_fpd(config)
  labels, rng = jnp.arange(4) % 10, jax.random.key(5)
  sample = sampling.teacher_image_sampler(models.teacher, models.tokenizer, models.grid, config)
  images = {steps: sample(frozen['teacher'], frozen['tokenizer'], labels, rng, steps) for steps in (1, 2, 3)}
  assert sample._cache_size() == 1

  @functools.partial(jax.jit, static_argnums=1)
  def static(params, steps):
    tokens = sampling.iterative_decode(models.teacher, params['teacher'], labels, rng, num_tokens=models.grid ** 2,
                                       num_steps=steps, **sampling.decode_settings(config))
    return sampling.decode_tokens(models.tokenizer, params['tokenizer'], tokens, models.grid)

  assert not np.allclose(images[1], images[3])
  for steps, got in images.items():
    np.testing.assert_allclose(got, static(frozen, steps), atol=1e-5, err_msg=f'{steps} steps')
