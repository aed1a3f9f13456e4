"""The released MaskGen-VQ teacher: import of the official files and goldens made with the official code.

tests/fixtures/maskgen_tiny/ holds tiny random configurations of the three official networks (open_clip's CLIP text
tower, bytedance/1d-tokenizer's MaskGen_VQ and TA-TiTok decoder), saved in their own formats, and golden.npz with
their outputs; `make_golden.py` there made them with torch and the official code (versions in its docstring).
clip_vision_golden.npz holds open_clip's image embeddings and preprocessing of the same clip.bin
(`make_clip_vision_golden.py`), for the vision tower and the CLIP score.
bpe_simple_vocab_16e6.txt.gz is open_clip's copy of OpenAI CLIP's BPE vocabulary (MIT licence).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from fpd_jax import conditioning as cond_lib
from fpd_jax import weights_io
from fpd_jax.data import clip_tokenizer
from fpd_jax.errors import UserError
from fpd_jax.eval import clip_score
from fpd_jax.models import clip_vision
from fpd_jax.models import maskgen
from fpd_jax.models import tatitok
from fpd_jax.tools import import_maskgen

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / 'tests' / 'fixtures' / 'maskgen_tiny'
FILES = {'generator': FIXTURES / 'generator.safetensors', 'tokenizer': FIXTURES / 'tokenizer.bin',
         'clip': FIXTURES / 'clip.bin'}
SIZES = {  # The tiny configurations of make_golden.py.
    'teacher': dict(codebook_size=16, num_tokens=8, hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=4.0,
                    micro_condition_dim=16, extra_embedding_rows=1001, text_dim=32),
    'tokenizer': dict(codebook_size=16, token_size=8, num_tokens=8, image_size=32, patch_size=8, width=32,
                      num_layers=1, num_heads=2, text_length=77, text_dim=32),
    'text_encoder': dict(vocab_size=1000, context_length=77, width=32, num_layers=3, num_heads=2, mlp_ratio=4.0,
                         embed_dim=32, activation='quick_gelu', state_layer=-2),
    'clip_vision': dict(image_size=16, patch_size=8, width=16, num_layers=1, num_heads=2, mlp_ratio=4.0, embed_dim=32,
                        activation='quick_gelu'),
}


def _relative_error(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(FIXTURES / 'golden.npz'))


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """{part: (module, params)} imported from the official-format files through the command's code path."""
  out = tmp_path_factory.mktemp('maskgen') / 'out'
  metas = import_maskgen.import_weights(str(out), *map(str, FILES.values()), sizes=SIZES, log=lambda *a: None)
  assert sorted(os.listdir(out)) == ['clip_vision', 'teacher', 'text_encoder', 'tokenizer']
  assert metas['tokenizer']['unused_entries'] == ['encoder.ln_post.weight', 'latent_tokens']
  assert metas['text_encoder']['unused_entries'] == ['logit_scale']  # visual.* went to clip_vision.
  assert metas['clip_vision']['unused_entries'] == [] and metas['clip_vision']['num_arrays'] == 20
  return {part: import_maskgen.load(str(out / part), part) for part in SIZES}


def test_text_tower_matches_open_clip(imported, golden):
  net, params = imported['text_encoder']
  states, pooled, final = jax.jit(lambda p, x: net.apply({'params': p}, x, with_final=True))(
      params, golden['caption_ids'][:2])
  assert _relative_error(states, golden['text_states']) < 1e-5  # Penultimate block, no ln_final.
  assert _relative_error(pooled, golden['pooled'][:, 0]) < 1e-5  # End-of-text state x text_projection.
  assert _relative_error(final, golden['final_states']) < 1e-5  # ln_final of every position (decoder input).


def test_generator_logits_match_maskgen(imported, golden):
  net, params = imported['teacher']
  logits = jax.jit(net.apply)({'params': params}, golden['tokens'], golden['text_states'], golden['pooled'][:, 0],
                     golden['aesthetic'])
  assert logits.shape == golden['logits'].shape == (2, 8, 16)
  assert _relative_error(logits, golden['logits']) < 1e-5


def test_decoder_images_match_tatitok(imported, golden):
  net, params = imported['tokenizer']
  images = jax.jit(net.apply)({'params': params}, golden['generated'], golden['final_states'])
  reference = golden['images'].transpose(0, 2, 3, 1)  # NCHW -> NHWC.
  assert images.shape == reference.shape == (2, 32, 32, 3)
  assert _relative_error(images, reference) < 1e-5
  clamped = tatitok.decode_images(net, params, golden['generated'], golden['final_states'])
  assert float(clamped.min()) >= 0 and float(clamped.max()) <= 1


def test_two_step_generation_equals_maskgen_token_for_token(imported, golden):
  text_net, text_params = imported['text_encoder']
  net, params = imported['teacher']
  model = maskgen.MaskGenModel(net, cond_lib.TextConditioner(bos_id=998, eos_id=999), text_net, text_params,
                               aesthetic_score=6.5)
  tokens = maskgen.generate(model, params, jnp.asarray(golden['caption_ids'][:2]), num_steps=2, guidance_scale=12.0,
                            randomize_temperature=1.5, uniforms=(golden['u1'], golden['u2']))
  np.testing.assert_array_equal(np.asarray(tokens), golden['generated'])


def test_bpe_tokenizer_matches_open_clip(golden):
  tok = clip_tokenizer.ClipTokenizer(str(FIXTURES / 'bpe_simple_vocab_16e6.txt.gz'))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49408, 49406, 49407, 0)
  np.testing.assert_array_equal(tok.encode(list(golden['bpe_prompts'])), golden['bpe_ids'])
  null = tok.encode([''])
  cond = cond_lib.TextConditioner(bos_id=tok.bos_id, eos_id=tok.eos_id)
  np.testing.assert_array_equal(np.asarray(cond.null(jnp.asarray(null))), null)  # CFG's empty caption.


# ---- One-line errors; nothing written.


def _import_generator(tmp_path, state):
  path = tmp_path / 'g.safetensors'
  st_numpy.save_file(state, str(path))
  out = tmp_path / 'out'
  with pytest.raises(UserError) as info:
    import_maskgen.import_weights(str(out), generator=str(path), sizes=SIZES, log=lambda *a: None)
  assert not out.exists() and '\n' not in str(info.value)
  return str(info.value)


def test_errors_name_the_entry_and_the_fix(tmp_path):
  state = weights_io.read_weights(FILES['generator'])
  wrong = dict(state, **{'blocks.1.attn.to_q.weight': np.zeros((32, 31), np.float32)})
  message = _import_generator(tmp_path, wrong)
  assert 'blocks.1.attn.to_q.weight has shape (32, 31)' in message and 'needs (32, 32)' in message
  assert '--generator' in message
  missing = {k: v for k, v in state.items() if k != 'blocks.0.ff.net.2.bias'}
  assert 'lacks entry blocks.0.ff.net.2.bias (missing key' in _import_generator(tmp_path, missing)
  extra = dict(state, **{'blocks.1.attn.to_add_out.weight': np.zeros((32, 32), np.float32)})
  assert 'blocks.1.attn.to_add_out.weight (32, 32), which' in _import_generator(tmp_path, extra)  # Last block.
  untied = dict(state, **{'lm_head.weight': state['embeddings.weight'] + 1})
  assert 'lm_head.weight differs from embeddings.weight' in _import_generator(tmp_path, untied)
  tied = dict(state, **{'lm_head.weight': state['embeddings.weight']})  # As torch.save stores a tied head.
  path = tmp_path / 'tied.safetensors'
  st_numpy.save_file(tied, str(path))
  import_maskgen.import_weights(str(tmp_path / 'ok'), generator=str(path), sizes=SIZES, log=lambda *a: None)
  assert os.listdir(tmp_path / 'ok') == ['teacher']


def test_released_sizes_name_the_first_difference(tmp_path):
  with pytest.raises(UserError, match=r'entry embeddings.weight has shape \(1018, 32\) but the MaskGen-VQ generator '
                     r'\(codebook_size 8192, .*\) needs \(9194, 1024\)'):
    import_maskgen.import_weights(str(tmp_path / 'out'), generator=str(FILES['generator']), log=lambda *a: None)


def test_command_line_error_is_one_line(tmp_path):
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'fpd_jax.tools.import_maskgen', f'--clip={FILES["generator"]}', f'--out={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith('error: ') and '--clip' in lines[-1], result.stderr
  assert not out.exists()


def test_torchscript_clip_imports_the_same_text_tower(tmp_path):
  """OpenAI ships CLIP as a traced TorchScript archive; its text tower imports to the same parameters."""
  sizes = {'text_encoder': SIZES['text_encoder'], 'clip_vision': SIZES['clip_vision']}
  metas = {}
  for name in ('clip.bin', 'clip_torchscript.pt'):
    out = tmp_path / name
    metas[name] = import_maskgen.import_weights(str(out), clip=str(FIXTURES / name), sizes=sizes, log=lambda *a: None)
  assert 'attn_mask' in metas['clip_torchscript.pt']['text_encoder']['unused_entries']
  for part in ('text_encoder', 'clip_vision'):
    a = import_maskgen.load(str(tmp_path / 'clip.bin' / part), part)[1]
    b = import_maskgen.load(str(tmp_path / 'clip_torchscript.pt' / part), part)[1]
    jax.tree.map(np.testing.assert_array_equal, a, b)


# ---- The CLIP vision tower and the CLIP score.


@pytest.fixture(scope='module')
def vision_golden():
  return dict(np.load(FIXTURES / 'clip_vision_golden.npz'))


def test_vision_tower_matches_open_clip(imported, vision_golden, golden):
  net, params = imported['clip_vision']
  embeds = jax.jit(net.apply)({'params': params}, vision_golden['images'].transpose(0, 2, 3, 1))  # NCHW -> NHWC.
  assert embeds.shape == (2, 32)
  assert _relative_error(embeds, vision_golden['image_embeds']) < 1e-5  # clip.encode_image.
  np.testing.assert_array_equal(vision_golden['caption_ids'], golden['caption_ids'][:2])
  assert _relative_error(vision_golden['text_embeds'], golden['pooled'][:, 0]) < 1e-6  # The same clip.bin.


def test_preprocess_is_close_to_open_clips_transform(vision_golden):
  """Bicubic resize + OpenAI mean/std vs open_clip's PIL transform (8-bit rounding; see clip_vision's docstring)."""
  for name in ('raw', 'raw_small'):  # 24 -> 16 px (antialiased) and 12 -> 16 px.
    ours = clip_vision.preprocess(jnp.asarray(vision_golden[name][None] / 255.0), 16)[0]
    reference = vision_golden[f'{name}_preprocessed'].transpose(1, 2, 0)
    assert ours.shape == reference.shape == (16, 16, 3)
    grey_levels = np.abs(np.asarray(ours) - reference) * np.array(clip_vision.OPENAI_STD) * 255
    # Measured on these noise images (every pixel an edge: the worst case for PIL's 8-bit intermediate rows): at
    # most 4.1 (24 px) and 7.3 (12 px) grey levels at a pixel, 0.31 and 0.37 on average.
    assert grey_levels.max() < 8 and grey_levels.mean() < 0.5, (name, grey_levels.max(), grey_levels.mean())
  same = np.full((1, 16, 16, 3), 0.5)
  np.testing.assert_allclose(clip_vision.preprocess(same, 16)[0, 0, 0],
                             (0.5 - np.array(clip_vision.OPENAI_MEAN)) / np.array(clip_vision.OPENAI_STD), rtol=1e-6)


def test_clip_score_is_the_cosine_of_the_official_embeddings(imported, vision_golden):
  image_embeds, text_embeds = vision_golden['image_embeds'], vision_golden['text_embeds']
  cos = np.sum(image_embeds * text_embeds, -1) / (np.linalg.norm(image_embeds, axis=-1) *
                                                  np.linalg.norm(text_embeds, axis=-1))
  expected = 100 * np.maximum(cos, 0)
  np.testing.assert_allclose(clip_score.score_from_embeddings(image_embeds, text_embeds), expected, atol=1e-4)
  # End to end: images in [0, 1] whose preprocessing is the golden input (no resize at 16 px), and their captions;
  # 3 images in batches of 2 (the last one padded).
  images = vision_golden['images'].transpose(0, 2, 3, 1) * np.array(clip_vision.OPENAI_STD) + np.array(
      clip_vision.OPENAI_MEAN)
  ids = vision_golden['caption_ids']
  flipped = np.concatenate([images, images[:1]]), np.concatenate([ids, ids[1:]])  # Image 0 with caption 1.
  score = clip_score.make_scorer(*imported['clip_vision'], *imported['text_encoder'], batch_size=2)
  mean, values = score(*flipped)
  cos_01 = np.dot(image_embeds[0], text_embeds[1]) / np.linalg.norm(image_embeds[0]) / np.linalg.norm(text_embeds[1])
  np.testing.assert_allclose(values, [*expected, 100 * max(cos_01, 0)], atol=1e-3)
  assert mean == pytest.approx(values.mean())


def test_clip_import_names_a_wrong_visual_shape_and_takes_a_text_only_file(tmp_path):
  state = weights_io.read_weights(FILES['clip'])
  sizes = {'text_encoder': SIZES['text_encoder'], 'clip_vision': SIZES['clip_vision']}
  wrong = dict(state, **{'visual.proj': np.zeros((16, 31), np.float32)})
  st_numpy.save_file(wrong, str(tmp_path / 'wrong.safetensors'))
  with pytest.raises(UserError, match=r'entry visual.proj has shape \(16, 31\) but the CLIP ViT-L/14-336 vision tower '
                     r'\(image_size 16, .*\) needs \(16, 32\).*--clip'):
    import_maskgen.import_weights(str(tmp_path / 'out'), clip=str(tmp_path / 'wrong.safetensors'), sizes=sizes,
                                  log=lambda *a: None)
  assert not (tmp_path / 'out').exists()  # Not even the text tower.
  text_only = {k: v for k, v in state.items() if not k.startswith('visual.')}
  st_numpy.save_file(text_only, str(tmp_path / 'text.safetensors'))
  lines = []
  metas = import_maskgen.import_weights(str(tmp_path / 'text'), clip=str(tmp_path / 'text.safetensors'), sizes=sizes,
                                        log=lines.append)
  assert list(metas) == ['text_encoder'] and os.listdir(tmp_path / 'text') == ['text_encoder']
  assert any('no visual.* entries' in line and 'CLIP score' in line for line in lines), lines
  # Over an earlier full import, the text-only file would leave a vision tower of other weights: refused, unchanged.
  import_maskgen.import_weights(str(tmp_path / 'full'), clip=FILES['clip'], sizes=sizes, log=lambda *a: None)
  with pytest.raises(UserError, match=r'clip_vision holds the CLIP ViT-L/14-336 vision tower of an earlier import'):
    import_maskgen.import_weights(str(tmp_path / 'full'), clip=str(tmp_path / 'text.safetensors'), sizes=sizes,
                                  overwrite=True, log=lambda *a: None)
  assert sorted(os.listdir(tmp_path / 'full')) == ['clip_vision', 'text_encoder']
