"""The FPD step on the tiny demo config: refinement, frozen models, gradients, a few training steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from fpd_jax import sampling
from fpd_jax.distill import fpd
from fpd_jax.train import distill
from fpd_jax.train import optim


@pytest.fixture(scope='module')
def setup(tiny_fpd):
  config = demo.get_config('tiny')
  return (config, *tiny_fpd(config))


def test_corrupt_masks_requested_fraction():
  tokens = jnp.arange(40).reshape(2, 20) % 7
  corrupted, mask = fpd.corrupt(jax.random.key(0), tokens, 99, 0.5, 0.5)
  np.testing.assert_array_equal(mask.sum(-1), [10, 10])
  np.testing.assert_array_equal(jnp.where(mask, 99, tokens), corrupted)


def test_refine_leaves_unmasked_positions_unchanged(setup):
  config, models, frozen, labels = setup
  n = models.grid ** 2
  draft = jax.random.randint(jax.random.key(1), (labels.shape[0], n), 0, config.tokenizer.codebook_size)
  corrupted, mask = fpd.corrupt(jax.random.key(2), draft, models.teacher.mask_id, 0.3, 0.7)
  target = jax.jit(lambda *args: fpd.refine(models.teacher, *args, temperature=1.0, cfg_scale=0.0))(
      frozen['teacher'], corrupted, mask, labels, jax.random.key(3))
  np.testing.assert_array_equal(jnp.where(mask, -1, target), jnp.where(mask, -1, draft))
  assert (target != models.teacher.mask_id).all() and target.max() < config.tokenizer.codebook_size


def test_frozen_models_get_no_gradient_and_no_optimizer_state(setup):
  config, models, frozen, labels = setup

  def loss(student_params, frozen_params):
    return fpd.fpd_loss(student_params, {}, frozen_params, models, labels, jax.random.key(4), config.distill)[0]

  # Both gradients at student = teacher, in one compiled program (run op by op, the loss compiles every op).
  student_grads, grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(frozen['teacher'], frozen)
  for name in ('teacher', 'tokenizer', 'features'):
    assert all(np.abs(np.asarray(g)).max() == 0.0 for g in jax.tree.leaves(grads[name])), name
  # The student does get a gradient.
  assert sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(student_grads)) > 0
  # The train state holds optimizer state for the student only.
  tx = optim.make_optimizer(config.distill, 1.0)
  # Traced, not compiled: the state's structure is all this checks (a compiled step's finite loss is checked at
  # every step of test_loss_finite_and_fixed_point_gap_decreases).
  step = distill.make_train_step(models, tx, tx, config.distill)
  state = {'step': jnp.zeros((), jnp.int32), 'params': frozen['teacher'],
           'opt_state': jax.eval_shape(tx.init, frozen['teacher']), 'ema_params': frozen['teacher']}
  state, metrics = jax.eval_shape(step, state, frozen, {'label': labels}, jax.random.key(5))
  assert set(state) == {'step', 'params', 'opt_state', 'ema_params'}
  assert metrics['loss'].shape == ()


def test_loss_finite_and_fixed_point_gap_decreases(setup):
  config, models, frozen, labels = setup
  cfg = config.distill.copy_and_resolve_references()
  cfg.learning_rate = 3e-3
  cfg.warmup_steps = 0
  cfg.num_steps = 100
  tx = optim.make_optimizer(cfg, 1.0)
  step = jax.jit(distill.make_train_step(models, tx, tx, cfg), donate_argnums=(0,))
  params = jax.tree.map(jnp.copy, frozen['teacher'])
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': jax.jit(tx.init)(params),
           'ema_params': jax.tree.map(jnp.copy, params)}
  gaps = []
  for _ in range(8):  # Same batch and key each step: the student moves toward this batch's targets.
    state, metrics = step(state, frozen, {'label': labels}, jax.random.key(6))
    assert np.isfinite(float(metrics['loss']))
    gaps.append(float(metrics['fixed_point_gap']))
  assert gaps[-1] < gaps[0], gaps
  assert step._cache_size() == 1  # pylint: disable=protected-access  # Traced and compiled once.


def test_one_step_generator_input_noise():
  noise = sampling.student_input(jax.random.key(0), 4, 20, 16, 99, r_init=0.95)
  np.testing.assert_array_equal((noise == 99).sum(-1), [19] * 4)
  assert ((noise != 99) <= (noise < 16)).all()
