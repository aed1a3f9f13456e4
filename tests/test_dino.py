"""Tests for the DINO ViTs, their importer and the DINO feature encoder (fpd_jax/models/dino.py,
fpd_jax/tools/import_dino.py).

Golden data (tests/fixtures/dino_*), computed offline with the official PyTorch code (facebookresearch/dinov2 at
b8931f7, facebookresearch/dinov3 at 6876159; torch 2.13.0+cpu, float32, XFORMERS_DISABLED) for three small
random-weight models (dim 64, depth 3, 4 heads, MLP ratio 4, LayerScale and norms randomised too):

- dinov2_tiny14: `DinoVisionTransformer(img_size=70, patch_size=14, init_values=1.0, block_chunks=0,
  num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)` (a 5x5 position embedding);
- dinov2_tiny14_reg: the same with img_size=42 (3x3), 4 registers, interpolate_antialias=True, offset 0.0;
- dinov3_tiny16: `DinoVisionTransformer(img_size=64, patch_size=16, pos_embed_rope_base=100,
  normalize_coords='separate', rope dtype fp32, layerscale_init=1e-5, norm_layer='layernormbf16',
  n_storage_tokens=4, mask_k_bias=True)` after `init_weights()` (the reference's bias_mask) and randomisation
  (including the key bias, which the mask must drop).

`dino_<layout>.pth` is the model's `state_dict()` (torch.save), `dino_golden_<layout>.npz` holds for two input
sizes `in<k>_images` (normalised, NHWC), `in<k>_blocks` (outputs of blocks 0, 1, 2), `in<k>_x_norm`
(forward_features' normalised cls, register and patch tokens) and `in<k>_inter_norm_0_2`
(`get_intermediate_layers(n=[0, 2], norm=True)`). `dino_golden_interp.npz` holds F.interpolate of a random 37x37
map (the released ViT-B/14 position grid) to 16 and 64 as DINOv2 calls it (bicubic with scale factor
(n + 0.1) / 37; antialiased bicubic to size n).
"""

import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax.errors import UserError
from fpd_jax.models import dino
from fpd_jax.tools import import_dino

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
REPO = pathlib.Path(__file__).parent.parent
TINY = ('dinov2_tiny14', 'dinov2_tiny14_reg', 'dinov3_tiny16')
ATOL = 2e-5  # Measured max |ours - reference| is ~6e-6 on values of magnitude ~7.


def _state(layout: str) -> dict[str, np.ndarray]:
  return import_dino.read_weights(str(FIXTURES / f'dino_{layout}.pth'))


@pytest.fixture(scope='module')
def golden_params():
  """{layout: params converted from the golden .pth}."""
  return {name: import_dino.convert(_state(name), dino.LAYOUTS[name], name) for name in TINY}


def _highest_precision(fn):
  """`fn` jitted and run with float32 matmuls (GPUs would otherwise use TF32 for float32 inputs)."""
  jitted = jax.jit(fn)

  def run(*args):
    with jax.default_matmul_precision('highest'):
      return jitted(*args)

  return run


def _apply(config: dino.ViTConfig, dtype=jnp.float32):
  model = dino.VisionTransformer(config, dtype=dtype)
  return _highest_precision(lambda p, x: model.apply({'params': p}, x, taps=(0, 1, 2)))


@pytest.mark.parametrize('layout', TINY)
def test_matches_reference(layout, golden_params):
  config = dino.LAYOUTS[layout]
  golden = np.load(FIXTURES / f'dino_golden_{layout}.npz')
  apply = _apply(config)
  prefix = config.num_prefix_tokens
  for k in range(2):  # Two input sizes: a resized (or RoPE-only) grid and a non-square one.
    out = apply(golden_params[layout], jnp.asarray(golden[f'in{k}_images']))
    blocks = np.stack([np.asarray(b) for b in out['blocks']])
    np.testing.assert_allclose(blocks, golden[f'in{k}_blocks'], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(out['x_norm']), golden[f'in{k}_x_norm'], rtol=0, atol=ATOL)
    normed = np.stack([np.asarray(out['blocks_norm'][t])[:, prefix:] for t in (0, 2)])
    np.testing.assert_allclose(normed, golden[f'in{k}_inter_norm_0_2'], rtol=0, atol=ATOL)
  assert np.abs(golden['in0_blocks']).max() > 1.0  # Not trivially small values.


def test_position_embedding_resize_matches_reference():
  golden = np.load(FIXTURES / 'dino_golden_interp.npz')
  src = golden['src'].astype(np.float64)
  for n in (16, 64):
    for key, layout in (('offset', 'dinov2_vitb14'), ('antialias', 'dinov2_vitb14_reg')):
      rows, cols = dino.pos_embed_matrices(dino.LAYOUTS[layout], n, n)
      ours = np.einsum('hi,wj,ijd->hwd', rows, cols, src)
      np.testing.assert_allclose(ours, golden[f'{key}_{n}'], rtol=0, atol=5e-6, err_msg=f'{key} 37 -> {n}')
  assert dino.pos_embed_matrices(dino.LAYOUTS['dinov2_vitb14'], 37, 37) is None  # The native grid: no resize.


def test_bfloat16_compute_is_close(golden_params):
  layout = 'dinov3_tiny16'
  golden = np.load(FIXTURES / f'dino_golden_{layout}.npz')
  out = _apply(dino.LAYOUTS[layout], jnp.bfloat16)(golden_params[layout], jnp.asarray(golden['in0_images']))
  assert out['x_norm'].dtype == jnp.bfloat16
  ref = golden['in0_x_norm']
  err = np.abs(np.asarray(out['x_norm'], np.float32) - ref).max()
  assert err < 0.1 * np.abs(ref).max(), err


@pytest.mark.parametrize('layout', dino.LAYOUTS)
def test_name_table_covers_every_parameter(layout):
  """The explicit table maps one official name onto every parameter of every layout, the released ones
  included. ViT-B counted by hand: 12 blocks of 7,089,408 (qkv 1,771,776 + proj 590,592 + fc1 2,362,368 + fc2
  2,360,064 + norms 3,072 + LayerScales 1,536) + final norm 1,536 + cls 768 + patch conv (DINOv2 14x14:
  452,352 + position embedding 1,370 x 768; DINOv3 16x16: 590,592 + 4 storage tokens). The official totals also
  count mask_token (768), which is not a parameter here."""
  config = dino.LAYOUTS[layout]
  table = import_dino.name_table(config)
  expected = import_dino.expected_shapes(config)
  assert sorted(path for _, path, _ in table) == sorted(expected)
  assert len({name for name, _, _ in table}) == len(table)
  count = sum(int(np.prod(s)) for s in expected.values())
  if layout == 'dinov2_vitb14':
    assert count == 85_072_896 + 1_536 + 768 + 452_352 + 1_052_160 == 86_579_712
  if layout == 'dinov3_vitb16':
    assert count == 85_072_896 + 1_536 + 768 + 590_592 + 3_072 == 85_668_864


def test_import_writes_an_export_that_loads(tmp_path, golden_params):
  layout = 'dinov3_tiny16'
  out = tmp_path / 'dino'
  meta = import_dino.import_weights(str(FIXTURES / f'dino_{layout}.pth'), layout, str(out), log=lambda *_: None)
  assert meta['unused_entries'] == sorted(['mask_token', 'rope_embed.periods'] +
                                          [f'blocks.{i}.attn.qkv.bias_mask' for i in range(3)])
  assert sorted(os.listdir(tmp_path)) == ['dino']  # No temporary directory left.
  cfg = {'layout': layout, 'weights': str(out)}
  params = dino.load_params(cfg)
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep='/')
  want = flax.traverse_util.flatten_dict(golden_params[layout], sep='/')
  assert sorted(flat) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(flat[name], want[name], err_msg=name)
  # The bias mask was folded in: the key bias is zero, the query and value biases are not.
  bias = flat['blocks_0/attn/qkv/bias']
  assert np.all(bias[64:128] == 0) and np.any(bias[:64] != 0) and np.any(bias[128:] != 0)
  with pytest.raises(UserError, match='depth=2'):  # Another architecture than the one imported.
    dino.load_params({**cfg, 'depth': 2})
  with pytest.raises(UserError, match='already exists'):
    import_dino.import_weights(str(FIXTURES / f'dino_{layout}.pth'), layout, str(out), log=lambda *_: None)


def _refused(tmp_path, state: dict, layout: str, match: str) -> None:
  """Importing `state` (written as .safetensors) raises a UserError matching `match` and writes nothing."""
  src = tmp_path / 'weights.safetensors'
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(src))
  with pytest.raises(UserError, match=match):
    import_dino.import_weights(str(src), layout, str(tmp_path / 'out'), log=lambda *_: None)
  assert sorted(os.listdir(tmp_path)) == ['weights.safetensors']
  src.unlink()


def test_import_refuses_bad_state_dicts(tmp_path):
  state = _state('dinov2_tiny14')
  bad = dict(state, **{'blocks.1.mlp.fc1.weight': state['blocks.1.mlp.fc1.weight'][:128]})
  _refused(tmp_path, bad, 'dinov2_tiny14', r'blocks\.1\.mlp\.fc1\.weight has shape \(128, 64\) .* \(256, 64\)')
  missing = {k: v for k, v in state.items() if k != 'blocks.2.ls2.gamma'}
  _refused(tmp_path, missing, 'dinov2_tiny14', r'lacks entry blocks\.2\.ls2\.gamma')
  _refused(tmp_path, dict(state, **{'head.weight': np.zeros((3, 64), np.float32)}), 'dinov2_tiny14',
           r'entry head\.weight .*\(unused key\)')
  _refused(tmp_path, state, 'dinov2_tiny14_reg', r'lacks entry register_tokens')  # Wrong layout.
  v3 = _state('dinov3_tiny16')
  _refused(tmp_path, dict(v3, **{'rope_embed.periods': v3['rope_embed.periods'] * 2}), 'dinov3_tiny16',
           r'rope_embed\.periods')
  mask = v3['blocks.0.attn.qkv.bias_mask'].copy()
  mask[70] = 1.0
  _refused(tmp_path, dict(v3, **{'blocks.0.attn.qkv.bias_mask': mask}), 'dinov3_tiny16',
           r'blocks\.0\.attn\.qkv\.bias_mask')


def test_import_accepts_safetensors_and_chunked_names(tmp_path, golden_params):
  state = _state('dinov2_tiny14')
  chunked = {k.replace('blocks.', 'blocks.0.', 1) if k.startswith('blocks.') else k: v for k, v in state.items()}
  src = tmp_path / 'chunked.safetensors'
  st_numpy.save_file(chunked, str(src))
  params = import_dino.convert(import_dino.read_weights(str(src)), dino.LAYOUTS['dinov2_tiny14'], str(src))
  jax.tree.map(np.testing.assert_array_equal, params, golden_params['dinov2_tiny14'])


def test_import_command_line_error_is_one_line(tmp_path):
  state = _state('dinov3_tiny16')
  del state['blocks.1.attn.qkv.weight']
  src = tmp_path / 'w.safetensors'
  st_numpy.save_file(state, str(src))
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'fpd_jax.tools.import_dino', f'--weights={src}', '--layout=dinov3_tiny16',
       f'--out={out}'], cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith('error: ') and 'blocks.1.attn.qkv.weight' in lines[-1], result.stderr
  assert not out.exists() and sorted(os.listdir(tmp_path)) == ['w.safetensors']


def test_features_shapes_and_gradients(golden_params):
  features = dino.from_config({'layout': 'dinov3_tiny16', 'layers': (0, 2), 'grid': 2, 'image_size': 64})
  params = golden_params['dinov3_tiny16']
  images = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))  # Grey, another size: resized to 64.

  def loss(x):
    out = features(params, x)
    return sum(jnp.sum(jnp.square(f)) for f in out), out

  (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(images)
  assert [f.shape for f in out] == [(3, 2 * 2 * 64)] * 2 == [(3, s) for s in features.feature_sizes]
  assert all(f.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(f))) for f in out)
  assert grad.shape == images.shape and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.min(jnp.sum(jnp.abs(grad), axis=(1, 2, 3)))) > 0  # Every image gets a gradient.


def test_features_pool_patch_tokens_of_tapped_blocks(golden_params):
  """DINOFeatures = the reference's patch tokens of the tapped blocks, on the patch grid, pooled."""
  layout = 'dinov2_tiny14_reg'
  golden = np.load(FIXTURES / f'dino_golden_{layout}.npz')
  features = dino.from_config({'layout': layout, 'layers': (2, 0), 'grid': 2, 'image_size': 56,
                               'final_norm': True})
  # Golden images are already normalised; undo the normalisation the encoder applies.
  images = golden['in0_images'] * np.array(dino.IMAGENET_STD) + np.array(dino.IMAGENET_MEAN)
  out = _highest_precision(features)(golden_params[layout], jnp.asarray(images, jnp.float32))
  for f, j in zip(out, (1, 0)):  # inter_norm_0_2 holds blocks 0 and 2.
    want = golden['in0_inter_norm_0_2'][j].reshape(2, 2, 2, 2, 2, 64).mean(axis=(2, 4)).reshape(2, -1)
    np.testing.assert_allclose(np.asarray(f), want, rtol=0, atol=ATOL)


def test_random_init():
  cfg = {'layout': 'dinov2_tiny14', 'weights': 'random'}
  config = dino.vit_config(cfg)
  a, b = dino.load_params(cfg), dino.load_params({**cfg, 'seed': 1})
  assert ckpt_lib.tree_shapes(a) == ckpt_lib.tree_shapes(dino.abstract_params(config))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(a)))
  assert not np.array_equal(a['blocks_0']['attn']['qkv']['kernel'], b['blocks_0']['attn']['qkv']['kernel'])
  np.testing.assert_array_equal(a['blocks_1']['ls2']['gamma'], np.full(64, config.layer_scale, np.float32))
  assert float(jnp.std(a['blocks_0']['mlp']['fc1']['kernel'])) == pytest.approx(0.02 * 0.88, rel=0.1)


def test_config_errors(tmp_path):
  with pytest.raises(UserError, match='unknown DINO layout'):
    dino.from_config({'layout': 'dinov9'})
  with pytest.raises(UserError, match='not a multiple of the patch size 16'):
    dino.from_config({'layout': 'dinov3_tiny16', 'image_size': 60})
  with pytest.raises(UserError, match='block 3 does not exist'):
    dino.from_config({'layout': 'dinov3_tiny16', 'layers': (1, 3), 'image_size': 64})
  with pytest.raises(UserError, match='needs weights'):
    dino.load_params({'layout': 'dinov3_tiny16'})
  with pytest.raises(UserError, match='not found'):
    dino.load_params({'layout': 'dinov3_tiny16', 'weights': str(tmp_path / 'nothing')})
  bf16 = dino.from_config({'layout': 'dinov3_tiny16', 'dtype': 'bfloat16', 'image_size': 64, 'layers': (0,)})
  assert bf16.model.dtype == jnp.bfloat16
