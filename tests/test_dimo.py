"""The Di[M]O baseline (DESIGN.md §1.5) on the tiny demo config: its gradient, its two models, its state."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from configs import t2i_demo
from fpd_jax import mask_schedule
from fpd_jax import sampling
from fpd_jax.distill import dimo
from fpd_jax.errors import UserError
from fpd_jax.models import build
from fpd_jax.models import maskgit
from fpd_jax.train import distill
from fpd_jax.train import optim
from fpd_jax.train import t2i

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dimo_config(arg='tiny'):
  config = demo.get_config(arg)
  config.distill.method = 'dimo'
  return config


@pytest.fixture(scope='module')
def setup(tiny_fpd):
  config = dimo_config()
  _, frozen, labels = tiny_fpd(config)
  train = distill.trainer(config)
  # A teacher and an auxiliary model that differ, so that the gap is far from zero.
  key = jax.random.key(7)
  aux = jax.jit(lambda t: jax.tree.map(lambda p: p + 0.05 * jax.random.normal(key, p.shape), t))(frozen['teacher'])
  return config, train, {'teacher': frozen['teacher'], 'tokenizer': frozen['tokenizer']}, aux, labels


@pytest.fixture(scope='module')
def text_setup():
  """Di[M]O on the text demo's MaskGen teacher (tiny, random weights) with caption ids as conditions."""
  config = t2i_demo.get_config('tiny')
  config.distill.method = 'dimo'
  text = t2i.text_tower(config)
  ids = t2i.text_tokenizer(config).encode(['a red three', 'a red three', 'two fives', 'two fives'])
  text_params = jax.jit(lambda rng: text.init(rng, jnp.asarray(ids))['params'])(jax.random.key(0))
  model = t2i.generator(config, text_params)
  n = build.token_grid(config) ** 2
  teacher = jax.jit(lambda rng: model.init(rng, n, ids)['params'])(jax.random.key(1))
  key = jax.random.key(7)
  aux = jax.jit(lambda t: jax.tree.map(lambda p: p + 0.05 * jax.random.normal(key, p.shape), t))(teacher)
  train = distill.trainer(config, teacher=model)
  return config, train, {'teacher': teacher}, aux, jnp.asarray(ids)


# The text case compiles the MaskGen teacher's gradient whole (~45 s on 2 cores): the slow suite; the default run
# checks the text step through test_text_dimo_step_trains_both_models_and_keeps_maskgen_embeddings.
@pytest.mark.parametrize('which', ['class', pytest.param('text', marks=pytest.mark.slow)])
def test_student_gradient_wrt_logits_is_the_score_gap_on_remasked_positions(which, request):
  """dL/dl = (p_aux - p_teacher) / B on re-masked positions and 0 elsewhere (L is normalised by the batch B), for
  class labels (MaskGIT) and captions (the text demo's MaskGen)."""
  config, train, frozen, aux, labels = request.getfixturevalue('setup' if which == 'class' else 'text_setup')
  cfg, model, n = config.distill.dimo, train.models.teacher, train.models.grid ** 2
  rng = jax.random.key(3)
  draft_rng, mask_rng = jax.random.split(rng)
  student = frozen['teacher']

  def logits_of(params):
    return dimo.draft(model, params, labels, draft_rng, n, cfg)[0]

  # Compiled whole (run op by op, every op of the model and its gradient compiles on its own).
  @jax.jit
  def gradients(student, teacher, aux):
    logits, tokens = dimo.draft(model, student, labels, draft_rng, n, cfg)
    corrupted, mask = mask_schedule.mask_tokens(mask_rng, tokens, model.mask_id, cfg.remask_schedule)
    p_teacher = jax.nn.softmax(model.guided_logits(teacher, corrupted, labels, cfg.teacher_cfg_scale), -1)
    p_aux = jax.nn.softmax(model.guided_logits(aux, corrupted, labels, cfg.aux_cfg_scale), -1)
    # The loss's gradient with respect to the logits.
    gap = dimo.score_gap(model, teacher, aux, corrupted, mask, labels, cfg)
    dlogits = jax.grad(dimo.distribution_matching_loss)(logits, gap)
    # The student's parameter gradient, end to end.
    grads = jax.grad(lambda p: dimo.student_loss(p, aux, teacher, model, labels, rng, n, cfg)[0])(student)
    return mask, p_aux - p_teacher, dlogits, grads

  mask, p_gap, dlogits, grads = gradients(student, frozen['teacher'], aux)
  assert 0 < int(mask.sum()) < mask.size
  expected = np.where(np.asarray(mask)[..., None], np.asarray(p_gap), 0.0) / labels.shape[0]
  assert np.abs(expected).max() > 1e-4  # Not trivially zero.
  # The loss's gradient with respect to the logits is exactly the scaled gap.
  np.testing.assert_allclose(dlogits, expected, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(dlogits)[~np.asarray(mask)], 0.0)
  # End to end: the student's parameter gradient is the logits' VJP with that cotangent.
  vjp = jax.jit(lambda params, cotangent: jax.vjp(logits_of, params)[1](cotangent)[0])
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(vjp(student, jnp.asarray(expected, jnp.float32)))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)  # float32 sums in another order.


def test_teacher_and_aux_get_no_gradient_from_the_student_loss(setup):
  config, train, frozen, aux, labels = setup
  model, n = train.models.teacher, train.models.grid ** 2
  g_student, g_aux, g_teacher = jax.jit(jax.grad(
      lambda s, a, t: dimo.student_loss(s, a, t, model, labels, jax.random.key(4), n, config.distill.dimo)[0],
      argnums=(0, 1, 2)))(frozen['teacher'], aux, frozen['teacher'])
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_student)) > 0
  for name, grads in (('aux', g_aux), ('teacher', g_teacher)):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads)), name


def test_aux_update_changes_only_the_aux_model(setup):
  config, train, frozen, aux, labels = setup
  model, n = train.models.teacher, train.models.grid ** 2
  g_aux, g_student = jax.jit(jax.grad(
      lambda a, s: dimo.aux_loss(a, s, model, labels, jax.random.key(5), n, config.distill.dimo)[0],
      argnums=(0, 1)))(aux, frozen['teacher'])
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_aux)) > 0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_student))


def test_state_holds_two_optimizer_states_and_step_compiles_once(setup):
  config, train, frozen, _, labels = setup
  state = train.init_state(frozen['teacher'])
  assert set(state) == {'step', 'params', 'opt_state', 'ema_params', 'aux_params', 'aux_opt_state'}
  patterns = tuple(config.distill.dimo.frozen_params)
  trained = optim.num_trained(frozen['teacher'], patterns)
  assert 0 < trained < optim.num_trained(frozen['teacher'])
  for key in ('opt_state', 'aux_opt_state'):  # Adam moments exist for the trained parameters only.
    sizes = sum(x.size for x in jax.tree.leaves(state[key]) if x.ndim)
    assert sizes == 2 * trained, key
  assert distill.trained_parameter_count(config, frozen['teacher']) == 2 * trained
  step = jax.jit(train.step, donate_argnums=(0,))
  before = jax.tree.map(np.asarray, state)
  for i in range(3):
    state, metrics = step(state, frozen, {'label': labels}, jax.random.key(10 + i))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert step._cache_size() == 1  # pylint: disable=protected-access  # Traced and compiled once.
  assert int(state['step']) == 3

  def changed(a, b):
    return any(float(np.abs(np.asarray(x) - y).max()) > 0 for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  assert changed(state['params'], before['params']) and changed(state['aux_params'], before['aux_params'])
  # Frozen embeddings stay the teacher's in both trained models.
  for key in ('params', 'aux_params'):
    np.testing.assert_array_equal(state[key]['Embed_0']['word_embeddings']['embedding'],
                                  before[key]['Embed_0']['word_embeddings']['embedding'])


def test_embedding_noise_perturbs_image_tokens_only(setup):
  _, train, frozen, _, labels = setup
  model, n = train.models.teacher, train.models.grid ** 2
  tokens = sampling.student_input(jax.random.key(0), labels.shape[0], n, model.codebook_size, model.mask_id, 0.6)
  t = model.transformer
  embed = maskgit.Embed(t.vocab_size, t.hidden_size, t.max_position_embeddings, t.dropout)
  ids = model.conditioner.sequence(labels, tokens)
  prefix = ids.shape[1] - n

  @jax.jit  # The forwards in one compiled program (run op by op, every op compiles on its own).
  def forwards(params, noise_rng, embed_rng):
    plain = model.logits(params, tokens, labels)
    zero_noise = model.logits(params, tokens, labels, embedding_noise=0.0)
    noisy = model.logits(params, tokens, labels, embedding_noise=0.3, noise_rng=noise_rng)
    variables = {'params': params['Embed_0']}
    clean = embed.apply(variables, ids, True)
    perturbed = embed.apply(variables, ids, True, 0.3, prefix, rngs={'embedding_noise': embed_rng})
    return plain, zero_noise, noisy, clean, perturbed

  plain, zero_noise, noisy, clean, perturbed = forwards(frozen['teacher'], jax.random.key(1), jax.random.key(2))
  np.testing.assert_allclose(zero_noise, plain)
  again = forwards(frozen['teacher'], jax.random.key(1), jax.random.key(2))[2]  # Another call, the same key.
  np.testing.assert_array_equal(noisy, again)
  assert float(jnp.abs(noisy - plain).max()) > 1e-3
  # The embedding layer's output: the condition position is untouched, every image position is perturbed.
  np.testing.assert_array_equal(perturbed[:, :prefix], clean[:, :prefix])
  assert float(jnp.abs(perturbed[:, prefix:] - clean[:, prefix:]).min(axis=-1).min()) > 0


def test_text_dimo_step_trains_both_models_and_keeps_maskgen_embeddings(text_setup):
  config, train, frozen, aux, ids = text_setup
  state = train.init_state(frozen['teacher'])
  assert set(state) == {'step', 'params', 'opt_state', 'ema_params', 'aux_params', 'aux_opt_state'}
  # At init MaskGen's adaLN-Zero gates make teacher and auxiliary predictions equal (no gap, no student gradient):
  # start from the perturbed auxiliary model instead.
  state['aux_params'] = aux
  trained = optim.num_trained(frozen['teacher'], tuple(config.distill.dimo.frozen_params))
  assert 0 < trained < optim.num_trained(frozen['teacher'])  # MaskGen's token table and positions are frozen.
  step = jax.jit(train.step)
  new, metrics = step(state, frozen, {'label': ids}, jax.random.key(10))
  new, metrics = step(new, frozen, {'label': ids}, jax.random.key(11))
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  assert step._cache_size() == 1  # pylint: disable=protected-access
  for key in ('params', 'aux_params'):
    np.testing.assert_array_equal(new[key]['embeddings'], state[key]['embeddings'])
    np.testing.assert_array_equal(new[key]['pos_embed'], state[key]['pos_embed'])
    changes = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), new[key], state[key])
    assert max(jax.tree.leaves(changes)) > 0, key


def test_maskgen_embedding_noise_is_seeded_and_zero_is_off(text_setup):
  _, train, frozen, _, ids = text_setup
  model, n = train.models.teacher, train.models.grid ** 2
  tokens = sampling.student_input(jax.random.key(0), ids.shape[0], n, model.codebook_size, model.mask_id, 0.6)

  @jax.jit
  def forwards(params, noise_rng):
    return (model.logits(params, tokens, ids), model.logits(params, tokens, ids, embedding_noise=0.0),
            model.logits(params, tokens, ids, embedding_noise=0.3, noise_rng=noise_rng))

  plain, zero_noise, noisy = forwards(frozen['teacher'], jax.random.key(1))
  np.testing.assert_array_equal(zero_noise, plain)
  np.testing.assert_array_equal(noisy, forwards(frozen['teacher'], jax.random.key(1))[2])
  assert float(jnp.abs(noisy - plain).max()) > 1e-3
  assert float(jnp.abs(noisy - forwards(frozen['teacher'], jax.random.key(2))[2]).max()) > 1e-3


def test_exported_generator_uses_dimo_settings():
  config = dimo_config('')
  settings = sampling.OneStepSettings.from_distill_config(config.distill)
  assert settings == sampling.OneStepSettings(0.6, 1.0, 'gumbel', 0.1)
  fpd = sampling.OneStepSettings.from_distill_config(demo.get_config().distill)
  assert (fpd.r_init, fpd.mode, fpd.embedding_noise) == (0.95, 'argmax', 0.0)


@pytest.mark.parametrize('key,value,message', [
    ('method', 'dmd', "config.distill.method='dmd'"),
    ('dimo.mask_fraction', 1.5, 'mask_fraction=1.5'),
    ('dimo.embedding_noise', 1.0, 'embedding_noise=1.0'),
    ('dimo.remask_schedule', 'sqrt', "remask_schedule='sqrt'"),
    ('dimo.frozen_params', ('(',), 'bad regular expression'),
])
def test_bad_knobs_get_one_clear_error(key, value, message):
  config = dimo_config()
  section = config.distill
  *path, leaf = key.split('.')
  for p in path:
    section = section[p]
  section[leaf] = value
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace('[', r'\[')):
    distill.validate(config)


def test_distill_seed_changes_only_the_distill_stage():
  a, b = demo.get_config(), demo.get_config()
  b.distill.seed = 3
  assert distill.distill_seed(a) == a.seed + 5 and distill.distill_seed(b) != distill.distill_seed(a)
  assert not np.array_equal(distill.condition_batch(distill.distill_seed(a), 0, 10, a.distill),
                            distill.condition_batch(distill.distill_seed(b), 0, 10, b.distill))


@pytest.mark.slow  # About 3 minutes on 2 cores; run with -m slow.
def test_tiny_pipeline_with_dimo(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'fpd_jax.main', '--config=configs/demo.py:tiny',
                           '--config.distill.method=dimo', f'--workdir={tmp_path}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(tmp_path / 'report.json') as f:
    report = json.load(f)
  assert np.isfinite(report['models']['student_1step']['fd'])
  with open(tmp_path / 'distill' / 'done.json') as f:
    assert json.load(f)['method'] == 'dimo'
  rows = [json.loads(line) for line in open(tmp_path / 'distill' / 'metrics.jsonl')]
  assert {'loss', 'aux_loss', 'aux_teacher_tv', 'grad_norm', 'aux_grad_norm'} <= set(rows[-1])
