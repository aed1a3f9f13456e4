"""The text-to-image half: data, text encoder, MaskGen blocks, text conditioner, GenEval-lite, tiny pipeline, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import t2i_demo
from fpd_jax import ablations
from fpd_jax import compare
from fpd_jax import conditioning as cond_lib
from fpd_jax import sampling
from fpd_jax import stages
from fpd_jax.data import captions
from fpd_jax.data import mnist
from fpd_jax.data import t2i
from fpd_jax.errors import UserError
from fpd_jax.eval import geneval_lite
from fpd_jax.models import clip_text
from fpd_jax.models import build
from fpd_jax.models import maskgen
from fpd_jax.tools import binding_probe
from fpd_jax.tools import layout_toy
from fpd_jax.train import optim
from fpd_jax.train import t2i as t2i_stage
from fpd_jax.train import teacher as teacher_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = captions.WordTokenizer(context_length=12)


def _text_tower(**kw):
  net = clip_text.TextTransformer(vocab_size=TOK.vocab_size, context_length=12, width=16, num_layers=3, num_heads=2,
                                  embed_dim=8, **kw)
  ids = TOK.encode(['a red three to the left of a blue seven', 'two nines'])
  return net, jax.jit(net.init)(jax.random.key(0), ids)['params'], ids


# ---- tokenizer and data


def test_tokenizer_round_trip_and_layout():
  ids = TOK.encode(['A red three to the left of a blue seven', ''])
  assert TOK.decode(ids) == ['a red three to the left of a blue seven', '']
  assert ids[0, 0] == TOK.bos_id and ids[0, 11] == TOK.eos_id and ids[1, 2] == 0
  assert list(ids[1, :2]) == [TOK.bos_id, TOK.eos_id] and np.argmax(ids[0]) == 11  # EOT = argmax (CLIP pooling).


@pytest.mark.parametrize('prompts,message', [
    (['a purple three'], r"unknown word\(s\) \['purple'\] in prompt 'a purple three'; the demo vocabulary is: a "),
    (['a red three to the left of a blue seven and a one'], r'has 13 words, more than the context of 10 words'),
])
def test_tokenizer_errors_are_one_line(prompts, message):
  with pytest.raises(UserError, match=message) as e:
    TOK.encode(prompts)
  assert '\n' not in str(e.value)


def test_empty_prompts_file(tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_text('\n  \n')
  with pytest.raises(UserError, match='prompts file .* is empty; write one prompt a line'):
    captions.read_prompts_file(str(path))
  path.write_text('a seven\n\ntwo nines\n')
  assert captions.read_prompts_file(str(path)) == ['a seven', 'two nines']


def test_training_captions_avoid_held_out_combinations_and_layouts_match():
  rng = np.random.default_rng(0)
  prompts = [t2i.random_prompt(rng) for _ in range(3000)]
  assert not any(p.held_out for p in prompts)
  assert {p.family for p in prompts} == set(t2i.FAMILIES)
  for p in prompts[:300]:  # Every sampled layout satisfies its own caption.
    digits, colours = t2i.sample_layout(p, rng)
    assert geneval_lite.check(p, digits, np.where(digits == t2i.EMPTY, -1, colours)), p.caption
  evals = t2i.eval_prompts(40)
  assert len(evals) == 240 and all(sum(p.family == f for p in evals) == 40 for f in t2i.FAMILIES)
  trained = {p.caption for p in prompts}
  held = [p for p in evals if p.held_out]
  assert len(held) == 60 and not trained & {p.caption for p in held}
  TOK.encode([p.caption for p in evals])  # Every caption fits the vocabulary and context.


# ---- text encoder


def test_digit_bank_crops_mnist_margin_so_digits_fill_their_cells():
  # MNIST digits sit in a 20x20 box of the 28x28 image; shrinking the whole image left them ~10 px of a 14 px cell.
  images = np.zeros((10, 28, 28, 1), np.uint8)
  images[:, 4:24, 4:24] = 255
  bank = t2i.DigitBank(images, np.arange(10), cell=16)
  glyph = bank.by_class[3][0]
  assert glyph.shape == (14, 14)
  rows = np.flatnonzero(glyph.max(1) > 0.5)
  assert rows[-1] - rows[0] + 1 >= 12  # The box spans nearly the whole glyph (10 rows without the crop).
  cell = bank.draw_cell(3, 1, np.random.default_rng(0))  # Green: PALETTE[1].
  assert cell.shape == (16, 16, 3) and cell[..., 0].max() == 0 and cell[..., 1].max() > 0.9


def test_text_encoder_is_causal_and_pools_the_eot_token():
  net, params, ids = _text_tower(state_layer=-1)
  apply = jax.jit(net.apply)  # Three calls, one compiled program.
  states, pooled = apply({'params': params}, ids)
  assert states.shape == (2, 12, 16) and pooled.shape == (2, 8)
  changed = ids.copy()
  changed[0, 5] = TOK.vocabulary.index('green')  # A later token.
  states2, pooled2 = apply({'params': params}, changed)
  np.testing.assert_allclose(states2[0, :5], states[0, :5], atol=1e-6)  # Earlier states do not see it.
  assert not np.allclose(states2[0, 5:], states[0, 5:]) and not np.allclose(pooled2[0], pooled[0])
  padded = ids.copy()
  padded[1, 5:] = 7  # Tokens after <eos> (at 3) change neither the pooled vector ...
  np.testing.assert_allclose(apply({'params': params}, padded)[1][1], pooled[1], atol=1e-6)
  # ... which is ln_final(last states)[argmax(ids)] @ text_projection.
  eot = np.argmax(ids, -1)
  x = states[np.arange(2), eot]
  ln = params['ln_final']
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + clip_text.LN_EPS) * ln['scale'] + ln['bias']
  np.testing.assert_allclose(pooled, x @ params['text_projection'], atol=1e-5)


def test_text_encoder_parameter_names_follow_open_clip():
  net, params, _ = _text_tower()
  block = params['resblocks_0']
  assert set(params) == {'token_embedding', 'positional_embedding', 'ln_final', 'text_projection'} | {
      f'resblocks_{i}' for i in range(3)}
  assert set(block) == {'ln_1', 'attn', 'ln_2', 'mlp'} and set(block['mlp']) == {'c_fc', 'c_proj'}
  assert block['attn']['in_proj']['kernel'].shape == (16, 48) and params['positional_embedding'].shape == (12, 16)


# ---- MaskGen


def test_joint_block_shapes_and_adaln_zero_identity_at_init():
  x, c, y = (jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(0), 3),
                                                     [(2, 16, 32), (2, 12, 32), (2, 32)]))
  for pre_only in (False, True):
    block = maskgen.JointBlock(32, 4, context_pre_only=pre_only)
    params = jax.jit(block.init)(jax.random.key(1), x, c, y)['params']
    apply = jax.jit(block.apply)  # Two calls, one compiled program.
    c_out, x_out = apply({'params': params}, x, c, y)
    np.testing.assert_allclose(x_out, x, atol=1e-6)  # Gates are zero at init: identity.
    if pre_only:
      assert c_out is None
    else:
      np.testing.assert_allclose(c_out, c, atol=1e-6)
    # Non-zero modulation makes the block act on both streams (the identity above is not vacuous).
    params = jax.tree.map(lambda p: p + 0.05, params)
    c_out, x_out = apply({'params': params}, x, c, y)
    assert x_out.shape == x.shape and not np.allclose(x_out, x)
    assert pre_only or (c_out.shape == c.shape and not np.allclose(c_out, c))


def test_joint_block_qk_norm_makes_attention_independent_of_query_key_scale():
  """With qk_norm, scaling the query and key projections (what lets attention logits grow until softmax saturates)
  leaves the block's output unchanged; without it the output changes."""
  x, c, y = (jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(0), 3),
                                                     [(2, 16, 32), (2, 12, 32), (2, 32)]))
  for qk_norm in (True, False):
    block = maskgen.JointBlock(32, 4, qk_norm=qk_norm)
    params = jax.tree.map(lambda p: p + 0.05, jax.jit(block.init)(jax.random.key(1), x, c, y)['params'])
    norms = {'norm_q', 'norm_k', 'norm_added_q', 'norm_added_k'}
    assert (norms <= set(params)) == qk_norm and (not qk_norm or params['norm_q']['scale'].shape == (8,))
    scaled = {**params, **{n: jax.tree.map(lambda w: w * 30.0, params[n])  # Kernel and bias.
                           for n in ('to_q', 'to_k', 'add_q_proj', 'add_k_proj')}}
    apply = jax.jit(block.apply)
    (c0, x0), (c1, x1) = apply({'params': params}, x, c, y), apply({'params': scaled}, x, c, y)
    same = np.allclose(x0, x1, atol=1e-4) and np.allclose(c0, c1, atol=1e-4)
    assert same == qk_norm


def test_maskgen_model_interface_and_tied_head():
  text, text_params, ids = _text_tower()
  conditioner = cond_lib.TextConditioner(TOK.bos_id, TOK.eos_id)
  net = maskgen.MaskGenTransformer(codebook_size=16, num_tokens=64, hidden_size=32, num_layers=2, num_heads=2,
                                   micro_condition_dim=8)
  model = maskgen.MaskGenModel(net, conditioner, text, text_params)
  params = jax.jit(lambda rng: model.init(rng, 64, ids))(jax.random.key(1))['params']
  assert params['embeddings'].shape == (17, 32) and model.mask_id == 16  # K codes + the mask token, no head bias.
  assert 'context_pre_only' not in str(params) and 'norm1_context' in params['blocks_1']
  assert params['blocks_1']['norm1_context']['kernel'].shape[-1] == 2 * 32  # Last block: AdaLN-Continuous.
  tokens = jnp.full((2, 64), model.mask_id)

  @jax.jit  # The forwards and the decode in one compiled program (run op by op, every op compiles on its own).
  def outputs(params):
    logits = model.logits(params, tokens, ids)
    null = model.logits(params, tokens, conditioner.null(jnp.asarray(ids)))
    guided = [model.guided_logits(params, tokens, ids, w) for w in (0.0, 2.0)]
    out = sampling.iterative_decode(model, params, ids, jax.random.key(2), num_tokens=64, num_steps=3,
                                    cfg_scale=2.0, cfg_schedule='cosine', temperature=1.3, temperature_end=0.5,
                                    schedule='arccos')
    return logits, null, guided, out

  logits, null, guided, out = outputs(params)
  assert logits.shape == (2, 64, 16)
  for w, guided_w in zip((0.0, 2.0), guided):
    np.testing.assert_allclose(guided_w, (1 + w) * logits - w * null, atol=1e-4)
  assert out.shape == (2, 64) and np.all((out >= 0) & (out < 16))


def test_guidance_ramp_and_class_defaults():
  assert sampling.guidance_at(0, 4, 2.0) == 2.0  # Constant: the class path's behaviour.
  ramp = [float(sampling.guidance_at(s, 4, 2.0, 'cosine')) for s in range(4)]
  assert ramp == sorted(ramp) and abs(ramp[-1] - 2.0) < 1e-6 and ramp[0] < 0.5


# ---- text conditioner


def test_text_conditioner_null_drop_group_key():
  conditioner = cond_lib.TextConditioner(TOK.bos_id, TOK.eos_id)
  ids = jnp.asarray(TOK.encode(['a seven', 'two nines', 'a seven', 'a red one and a green eight']))
  null = conditioner.null(ids)
  np.testing.assert_array_equal(null, np.broadcast_to(TOK.encode([''])[0], ids.shape))
  np.testing.assert_array_equal(conditioner.drop(ids, jax.random.key(0), 0.0), ids)
  np.testing.assert_array_equal(conditioner.drop(ids, jax.random.key(0), 1.0), null)
  many = jnp.tile(ids, (50, 1))
  dropped = np.asarray(conditioner.drop(many, jax.random.key(1), 0.5))
  is_null = np.all(dropped == np.asarray(null[:1]), -1)
  assert np.all(is_null | np.all(dropped == np.asarray(many), -1)) and 0.3 < is_null.mean() < 0.7
  keys = np.asarray(conditioner.group_key(ids))
  assert keys[0] == keys[2] and len(set(keys.tolist())) == 3
  rng = np.random.default_rng(0)
  distinct = sorted({t2i.random_prompt(rng).caption for _ in range(5000)} | {p.caption for p in t2i.eval_prompts()})
  assert len(set(np.asarray(conditioner.group_key(jnp.asarray(TOK.encode(distinct)))).tolist())) == len(distinct)


# ---- GenEval-lite validation


@pytest.fixture(scope='module')
def cell_classifier(tmp_path_factory):
  """A workdir with the MNIST data and the demo's evaluation network, exactly as the demo trains it (real cells)."""
  workdir = str(tmp_path_factory.mktemp('t2i_eval'))
  mnist.build_dataset(os.path.join(workdir, 'data'))
  config = t2i_demo.get_config()
  config.train.log_every = 100  # Logging only: the eval_net section is the demo's, unchanged.
  summary = t2i_stage.run_eval_net(config, workdir)
  net, params, _ = t2i_stage.eval_net_stage.load('eval_net', config.eval_net, config, workdir)
  return config, workdir, net, params, summary


@pytest.mark.slow  # Trains the demo's eval_net (1200 steps): ~3.5 min on the loaded 2-core CPU; run with -m slow.
def test_scorer_real_canvases_pass_and_shuffled_prompts_fail(cell_classifier):
  config, workdir, net, params, summary = cell_classifier
  assert summary['test_accuracy'] > 0.95
  prompts = [p for p in t2i.eval_prompts(40) for _ in range(4)]
  real = t2i.canvas_batch(t2i_stage.bank(config, workdir, 'test'), prompts, np.random.default_rng(0))
  digits, colours = geneval_lite.detect(net, params, real['image'])
  score = geneval_lite.score(prompts, digits, colours)
  shuffled = [prompts[i] for i in np.random.default_rng(1).permutation(len(prompts))]
  bad = geneval_lite.score(shuffled, digits, colours)
  print(f'\neval_net test accuracy {summary["test_accuracy"]:.4f}\nreal canvases {score}\nshuffled prompts {bad}')
  assert set(score) == set(t2i.FAMILIES) | {'overall', 'held_out_overall', 'seen_overall'}
  assert score['overall'] >= 0.95 and score['held_out_overall'] >= 0.95, score
  assert bad['overall'] <= 0.25, bad
  digit_cells = real['digits'] != t2i.EMPTY  # The colour of every drawn digit is found exactly ...
  np.testing.assert_array_equal(colours[digit_cells], real['colours'][digit_cells])
  assert np.all(colours[~digit_cells] == -1) and np.all(digits[~digit_cells] == t2i.EMPTY)  # ... and every empty.


# ---- the tiny pipeline end to end, and the CLI


@pytest.fixture(scope='module')
def tiny_t2i(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('t2i_tiny'))
  config = t2i_demo.get_config('tiny')
  timings = stages.run_pipeline(config, workdir)
  return config, workdir, timings


# In the default run (~90 s on 2 cores): the tiny pipeline is the one test of the t2i evaluate stage.
def test_tiny_t2i_pipeline_end_to_end(tiny_t2i):
  config, workdir, timings = tiny_t2i
  assert list(timings) == list(config.stages)
  report = json.load(open(os.path.join(workdir, 'report.json')))
  assert set(report['models']) == {'teacher_1step', 'teacher_2step', 'student_1step'}
  for name, row in report['models'].items():
    g = row['geneval_lite']
    assert set(g) == set(t2i.FAMILIES) | {'overall', 'held_out_overall', 'seen_overall'}
    assert 0 <= g['overall'] <= 1 and np.isfinite(row['fd']) and row['images_per_sec'] > 0
    assert row['num_samples'] == config.evaluate.num_samples
    assert os.path.exists(os.path.join(workdir, 'samples', f'{name}.png'))
  recon = report['tokenizer_reconstructions']  # The tokenizer's ceiling: real canvases encoded and decoded.
  assert set(recon['geneval_lite']) == set(t2i.FAMILIES) | {'overall', 'held_out_overall', 'seen_overall'}
  assert recon['fd'] >= 0
  assert os.path.exists(os.path.join(workdir, 'samples', 'tokenizer_reconstructions.png'))
  text = open(os.path.join(workdir, 'report.md')).read()
  assert 'GenEval-lite' in text and 'real canvases through the tokenizer' in text
  assert set(report['timings_s']) == set(config.stages)


def test_repa_targets_give_each_token_its_cell_features(tiny_t2i):  # Reuses the tiny pipeline's feature_net.
  config, workdir, _ = tiny_t2i
  targets_of = t2i_stage.repa_target_fn(config, workdir)
  canvases = t2i.canvas_batch(t2i_stage.bank(config, workdir, 'test'), t2i.eval_prompts(2)[:6],
                              np.random.default_rng(0))['image']
  targets = targets_of(canvases)
  grid = build.token_grid(config)
  assert targets.shape == (6, grid * grid, config.feature_net.feature_dim) and np.all(np.isfinite(targets))
  cells = t2i.cell_of_token(grid)
  for c in range(4):  # One vector per cell, shared by its tokens; cells of other content differ.
    np.testing.assert_array_equal(targets[:, cells == c], np.repeat(targets[:, cells == c][:, :1], grid ** 2 // 4, 1))
  swapped = canvases.copy()
  half = canvases.shape[1] // 2
  swapped[:, :half, :half], swapped[:, :half, half:] = canvases[:, :half, half:], canvases[:, :half, :half]
  moved = targets_of(swapped)  # Swapping the top cells swaps their targets.
  np.testing.assert_allclose(moved[:, cells == 0], targets[:, cells == 1], atol=1e-5)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_sample_cli_prompt_and_errors(tiny_t2i, tmp_path):  # Reuses the tiny pipeline: ~25 s more.
  _, workdir, _ = tiny_t2i
  out = tmp_path / 'x.png'
  res = _cli('fpd_jax.sample', f'--workdir={workdir}', '--model=student',
             '--prompt=a red three to the left of a blue seven', '--num=4', f'--out={out}')
  assert res.returncode == 0, res.stderr
  assert out.exists()
  images, caps = t2i_stage.sample_prompts(workdir, 'teacher', 2, ['a seven', 'two nines'], 3, 0, 4)
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8 and caps[3] == 'two nines'
  (tmp_path / 'empty.txt').write_text('')
  for flag, message in [('--prompt=a purple seven', "error: unknown word(s) ['purple']"),
                        (f'--prompts_file={tmp_path / "empty.txt"}', 'is empty; write one prompt a line')]:
    res = _cli('fpd_jax.sample', f'--workdir={workdir}', '--model=student', flag, f'--out={out}')
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_ablations_on_the_tiny_pipeline(tiny_t2i):  # Reuses the tiny pipeline and its compiled distill step.
  config, workdir, _ = tiny_t2i
  rows = ablations.run(config, workdir, only=['fpd'])
  assert list(rows) == ['fpd'] and set(compare.TextTask.metrics) <= set(rows['fpd'])
  assert 0 <= rows['fpd']['geneval_lite'] <= 1 and np.isfinite(rows['fpd']['fd'])
  text = open(os.path.join(workdir, 'ablations.md')).read()
  assert '| fpd | - |' in text and 'GenEval-lite held-out' in text
  with pytest.raises(UserError, match='unknown variant.*gann'):
    ablations.run(config, workdir, only=['gann'])


@pytest.mark.slow  # Compiles the GAN's distill step: ~55 s on 2 cores.
def test_gan_ablation_reads_real_canvases(tiny_t2i):
  config, workdir, _ = tiny_t2i
  rows = ablations.run(config, workdir, only=['gan'])
  assert np.isfinite(rows['gan']['fd'])
  with open(os.path.join(workdir, 'ablations', 'gan', 'metrics.jsonl')) as f:
    assert 'gan_discriminator' in json.loads(f.readlines()[-1])  # The critic trained on real canvases.


@pytest.mark.slow  # A diagnostic tool (~25 s on 2 cores on top of the tiny pipeline): the slow suite.
def test_binding_probe_on_the_tiny_pipeline(tiny_t2i, tmp_path):  # Reuses the tiny pipeline.
  _, workdir, _ = tiny_t2i
  out = tmp_path / 'binding.json'
  results = binding_probe.run(workdir, num=4, steps=2, seed=0, families=['two_object', 'position'], out=str(out),
                              text_num=50)
  assert json.load(open(out))['families'] == results and set(results) == {'two_object', 'position'}
  assert set(results['position']['text']) == {'first', 'second', 'relation'}
  assert all(0 <= v <= 1 for r in results.values() for v in r['text'].values())
  for r in results.values():
    i, g = r['infill'], r['generate']
    assert all(0 <= i[k] <= 1 for k in ('check', 'named', 'copied_first', 'empty'))
    assert i['named'] + i['copied_first'] + i['empty'] <= 1
    assert 0 <= g['digits_per_canvas'] <= 4 and 0 <= g['first_present'] <= 1
    assert set(r['caption']) == {'true', 'roles_swapped', 'digit_changed', 'empty', 'words_only', 'pooled_only'}
    assert all(np.isfinite(v) and v > 0 for v in r['caption'].values())
  assert 'on_its_side' in results['position']['generate']
  with pytest.raises(UserError, match='--families=counting: choose among two_object,position,color_attr'):
    binding_probe.run(workdir, 4, 2, 0, ['counting'])
  res = _cli('fpd_jax.tools.binding_probe', f'--workdir={tmp_path}')
  assert res.returncode == 2 and 'the teacher not found' in res.stderr, res.stderr


def test_layout_toy_cell_tokens_round_trip_and_flag_errors():
  rng = np.random.default_rng(0)
  prompts = [t2i.random_prompt(rng, f) for f in t2i.FAMILIES for _ in range(5)]
  for colours in (False, True):
    tokens = layout_toy.layout_tokens(prompts, np.random.default_rng(1), colours)
    digits, cols = layout_toy.cells_of_tokens(tokens, colours)
    want_digits, want_cols = zip(*(t2i.sample_layout(p, np.random.default_rng(1)) for p in prompts[:1]))
    assert tokens.shape == (30, 4) and tokens.max() < 1 + 10 * (7 if colours else 1)
    np.testing.assert_array_equal(digits[0], want_digits[0])
    if colours:
      np.testing.assert_array_equal(cols[0][digits[0] != t2i.EMPTY], want_cols[0][digits[0] != t2i.EMPTY])
    # The layouts satisfy their prompts (colour checks only where the tokens carry colours).
    ok = [geneval_lite.check(p, d, c) for p, d, c in zip(prompts, digits, cols) if colours or not p.colours
          or all(x < 0 for x in p.colours)]
    assert all(ok) and len(ok) >= 20
  with pytest.raises(UserError, match='--families=shapes: choose among'):
    layout_toy.run('/nonexistent', 10, ['shapes'], True)
  with pytest.raises(UserError, match='names colours: add --colours'):
    layout_toy.run('/nonexistent', 10, ['position', 'color_attr'], True)
  with pytest.raises(UserError, match='the text encoder not found'):
    layout_toy.run('/nonexistent', 10, ['position'], True)
  with pytest.raises(UserError, match='--batch_size=0 must be > 0'):
    layout_toy.run('/nonexistent', 10, ['position'], True, batch_size=0)


def test_layout_toy_teacher_config_spans_the_toys_steps():
  teacher = t2i_demo.get_config().teacher
  teacher.repa.weight, teacher.mask_block_prob = 0.5, 0.5
  cfg = layout_toy.toy_teacher_config(teacher, 6000, qk_norm=True, batch_size=256)
  # The cosine schedule decays over the toy's own steps (not the demo teacher's 1,500), at the asked batch.
  assert (cfg.num_steps, cfg.batch_size, cfg.qk_norm, cfg.mask_block_prob, cfg.repa.weight) == (6000, 256, True, 0, 0)
  assert layout_toy.toy_teacher_config(teacher, 10, qk_norm=False).batch_size == teacher.batch_size
  assert (teacher.num_steps, teacher.repa.weight) == (1500, 0.5)  # The workdir's config is left as it was.


@pytest.mark.slow  # A diagnostic tool (~30 s on 2 cores on top of the tiny pipeline): the slow suite.
def test_layout_toy_on_the_tiny_pipeline(tiny_t2i, tmp_path):
  _, workdir, _ = tiny_t2i
  out = tmp_path / 'toy.json'
  result = layout_toy.run(workdir, 3, ['two_object', 'position'], qk_norm=True, out=str(out), log=lambda *a: None,
                          batch_size=6)
  assert json.load(open(out)) == json.loads(json.dumps(result)) and result['batch_size'] == 6
  assert set(result['scores']) == {'1', '4'} and all(0 <= v <= 1 for s in result['scores'].values()
                                                        for v in s.values())
  for m in result['marginals'].values():
    assert len(m['three']) == 4 and all(0 <= a + b <= 1 for a, b in zip(m['three'], m['five']))


def test_binding_probe_caption_edits_change_only_the_roles_or_one_digit():
  rng = np.random.default_rng(0)
  position = t2i.Prompt('position', (4, 6), (-1, -1), relation='left')
  colours = t2i.Prompt('color_attr', (3, 6), (0, 1))
  assert binding_probe.swap_roles(position).caption == 'a four to the right of a six'
  assert binding_probe.swap_roles(colours).caption == 'a green three and a red six'
  assert binding_probe.swap_roles(t2i.Prompt('two_object', (1, 2), (-1, -1))).caption == 'a two and a one'
  for p in (position, colours):
    for _ in range(20):
      changed = binding_probe.change_digit(p, rng)
      assert len(set(changed.digits) - set(p.digits)) == 1 and changed.colours == p.colours
      for _ in range(4):  # No layout of the prompt satisfies the changed caption.
        digits, cols = t2i.sample_layout(p, rng)
        assert not geneval_lite.check(changed, digits, np.where(digits == t2i.EMPTY, -1, cols))


def test_binding_probe_on_its_side_reads_the_relation():
  e = t2i.EMPTY
  left, below = (t2i.Prompt('position', (4, 6), (-1, -1), relation=r) for r in ('left', 'below'))
  assert binding_probe.on_its_side([left], np.array([[4, 6, e, e]])) == 1.0
  assert binding_probe.on_its_side([left], np.array([[6, 4, e, e]])) == 0.0
  assert binding_probe.on_its_side([below, below], np.array([[6, e, 4, e], [4, e, 6, 6]])) == 0.4  # 2 of 5 cells.
  assert binding_probe.on_its_side([left], np.array([[e, 1, e, e]])) is None


def test_binding_probe_ridge_accuracy_reads_what_the_features_hold():
  rng = np.random.default_rng(0)
  labels = rng.integers(7, size=500)
  onehot = np.eye(7)[labels] + 0.1 * rng.normal(size=(500, 7))
  assert binding_probe.ridge_accuracy(onehot, labels, 7) == 1.0
  assert binding_probe.ridge_accuracy(rng.normal(size=(500, 7)), labels, 7) < 0.35  # Chance: 1/7.


def test_t2i_stage_dependencies_let_independent_stages_overlap():
  order = tuple(t2i_demo.get_config().stages)
  assert stages.dependencies('text_encoder', order, 't2i') == ('data',)
  assert stages.dependencies('teacher', order, 't2i') == ('data', 'tokenizer', 'text_encoder')
  assert stages.dependencies('eval_net', order, 't2i') == ('data',)
  assert 'text_encoder' in stages.dependencies('distill', order, 't2i')
  assert stages.dependencies('evaluate', order, 't2i') == order[:-1]
  # A task without a table (the released-MaskGen pipeline) runs its stages in order.
  assert stages.dependencies('distill', ('data', 'teacher', 'distill'), 'maskgen') == ('data', 'teacher')


@pytest.mark.parametrize('size, prob', [(3, 0.5), (0, 0.5), (4, 1.5)])
def test_block_masking_settings_fail_with_the_fix(size, prob):
  config = t2i_demo.get_config('tiny')
  config.teacher.mask_block_size, config.teacher.mask_block_prob = size, prob
  with pytest.raises(UserError, match='mask_block_prob=.* block side a divisor of the 8x8 token grid'):
    stages.validate(config)
  config.teacher.mask_block_size, config.teacher.mask_block_prob = 4, 0.5
  stages.validate(config)


def test_codebook_embedding_init_follows_the_codebook_and_keeps_the_rest():
  codebook = jax.random.normal(jax.random.key(0), (16, 8)).at[3].set(0.0).at[5].set(0.0)  # Codes 3 and 5 alike.
  params = {'embeddings': 0.02 * jax.random.normal(jax.random.key(1), (18, 32)), 'pos_embed': jnp.ones((1, 4, 32))}
  out = maskgen.init_embeddings_from_codebook(params, codebook, jax.random.key(2))
  rows = np.asarray(out['embeddings'])
  np.testing.assert_array_equal(rows[16:], params['embeddings'][16:])  # The mask row and the extra row stay.
  np.testing.assert_array_equal(out['pos_embed'], params['pos_embed'])
  np.testing.assert_allclose(rows[3], rows[5], atol=1e-7)  # Equal codes -> equal rows.
  assert 0.01 < rows[:16].std() < 0.04  # The table's init scale.
  # Row similarity follows code similarity: the rows' Gram matrix correlates with the codebook's.
  book = np.asarray(codebook - codebook.mean(0))
  assert np.corrcoef((book @ book.T).ravel(), (rows[:16] @ rows[:16].T).ravel())[0, 1] > 0.5


def test_unknown_embedding_init_fails_with_the_choices():
  config = t2i_demo.get_config('tiny')
  config.teacher.embedding_init = 'clip'
  with pytest.raises(UserError, match=r"embedding_init='clip': choose one of \('random', 'codebook'\)"):
    stages.validate(config)


def test_repa_projector_loss_and_train_step():
  """REPA: the projector reads the aligned block, leaves the logits as they are, and the teacher step trains it."""
  text, text_params, ids = _text_tower()
  conditioner = cond_lib.TextConditioner(TOK.bos_id, TOK.eos_id)
  make = lambda dim: maskgen.MaskGenModel(maskgen.MaskGenTransformer(
      codebook_size=16, num_tokens=16, hidden_size=32, num_layers=2, num_heads=2, micro_condition_dim=8,
      repa_dim=dim, repa_layer=0, repa_hidden=8), conditioner, text, text_params)
  model, plain = make(6), make(0)
  params = jax.jit(lambda rng: model.init(rng, 16, ids))(jax.random.key(1))['params']
  assert params['repa_projector']['fc3']['kernel'].shape == (8, 6)
  assert 'repa_projector' not in jax.eval_shape(lambda rng: plain.init(rng, 16, ids), jax.random.key(1))['params']
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 17)
  (logits, projection), plain_logits = jax.jit(  # One program (each compile costs seconds here).
      lambda p: (model.logits_and_repa(p, tokens, ids), model.logits(p, tokens, ids)))(params)
  assert projection.shape == (2, 16, 6)
  np.testing.assert_allclose(logits, plain_logits, atol=1e-6)
  loss, cosine = maskgen.repa_loss(projection, projection)
  np.testing.assert_allclose((loss, cosine), (0.0, 1.0), atol=1e-5)
  np.testing.assert_allclose(maskgen.repa_loss(projection, -3.0 * projection)[0], 2.0, atol=1e-5)

  config = t2i_demo.get_config('tiny')
  config.teacher.repa.weight = 0.5
  tx = optim.make_optimizer(config.teacher, 1.0)
  step = jax.jit(teacher_stage.make_train_step(model, tx, config.teacher))
  batch = {'tokens': tokens, 'label': jnp.asarray(ids), 'repa_target': jax.random.normal(jax.random.key(3), (2, 16, 6))}
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': jax.jit(tx.init)(params)}
  new, metrics = step(state, batch, jax.random.key(4))
  new = step(new, batch, jax.random.key(5))[0]  # The first step's learning rate is 0 (warmup).
  assert -1.0 <= metrics['repa_cosine'] <= 1.0
  np.testing.assert_allclose(metrics['loss'], metrics['token_loss'] + 0.5 * (1 - metrics['repa_cosine']), rtol=1e-5)
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), new['params'], params)
  assert moved['repa_projector']['fc1']['kernel'] > 0 and moved['blocks_0']['to_q']['kernel'] > 0
  assert moved['blocks_1']['to_q']['kernel'] > 0  # The token loss still trains the block after the aligned one.


def test_cell_of_token_follows_the_canvas_cells():
  cells = t2i.cell_of_token(8).reshape(8, 8)
  np.testing.assert_array_equal(cells[:4, :4], 0)  # Top-left ...
  np.testing.assert_array_equal(cells[:4, 4:], 1)
  np.testing.assert_array_equal(cells[4:, :4], 2)
  np.testing.assert_array_equal(cells[4:, 4:], 3)  # ... bottom-right (t2i.cell_position's order).
  assert t2i.cell_position(int(t2i.cell_of_token(2)[1])) == (0, 1)


def test_repa_teacher_waits_for_the_feature_network_and_checks_its_settings():
  config = t2i_demo.get_config('tiny')
  order = tuple(config.stages)
  assert 'feature_net' not in stages.dependencies('teacher', order, 't2i', config)  # Off by default.
  config.teacher.repa.weight = 0.5
  with pytest.raises(UserError, match="list 'feature_net' before 'teacher'"):
    stages.validate(config)
  config.stages = ('data', 'tokenizer', 'text_encoder', 'eval_net', 'feature_net', 'teacher', 'distill', 'evaluate')
  stages.validate(config)
  assert stages.dependencies('teacher', tuple(config.stages), 't2i', config) == (
      'data', 'tokenizer', 'text_encoder', 'feature_net')
  config.teacher.repa.layer = config.teacher.num_layers
  with pytest.raises(UserError, match=r'repa.layer=2: the teacher has blocks 0..1'):
    stages.validate(config)


def test_score_splits_seen_and_held_out_combinations():
  """Canvases that pass every seen colour prompt and fail every held-out one: seen_overall 1, held_out_overall 0."""
  seen = t2i.Prompt('colors', (0,), (1,))  # (digit 0, green) is seen; (0, red) and (0, yellow) are held out.
  held = t2i.Prompt('colors', (0,), (0,))
  assert not seen.held_out and held.held_out
  digits = np.array([[0, 10, 10, 10]] * 2)
  colours = np.array([[1, -1, -1, -1]] * 2)  # A green zero: right for `seen`, wrong colour for `held`.
  score = geneval_lite.score([seen, held], digits, colours)
  assert score['seen_overall'] == 1.0 and score['held_out_overall'] == 0.0 and score['colors'] == 0.5
