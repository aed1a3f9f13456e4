"""Tests for the MaskGIT VQGAN tokenizer (fpd_jax/models/vqgan.py).

The golden tests load a small checkpoint in the released format and compare with what the reference
implementation (google-research/maskgit) computed from it (tests/fixtures/maskgit_small/).
"""

import functools
import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fpd_jax.errors import UserError
from fpd_jax.models import vqgan

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
SMALL = FIXTURES / 'maskgit_small'


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} for a nested dict of arrays or ShapeDtypeStructs."""
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def _global_norm(tree) -> float:
  """L2 norm of all leaves of a pytree, as a Python float."""
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def _random_variables(model: vqgan.VQGAN, image_shape: tuple[int, ...]) -> dict:
  """Variables with the model's tree, filled with small random numbers."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(image_shape))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), abstract)


def _apply(model: vqgan.VQGAN, method=None):
  """`model.apply(variables, *args, method=method)`, jitted (one compile instead of many eager ops)."""
  return jax.jit(functools.partial(model.apply, method=method))


def _demo_model(dtype=jnp.float32) -> vqgan.VQGAN:
  """The demo tokenizer size (configs/demo.py): 28x28x1 -> 7x7 tokens, K=64, D=16."""
  cfg = ml_collections.ConfigDict(dict(
      filters=32, channel_multipliers=(1, 1, 2), num_res_blocks=1, embedding_dim=16, codebook_size=64,
      commitment_cost=0.25))
  return vqgan.from_config(cfg, output_channels=1, dtype=dtype)


@pytest.fixture(scope='module')
def small():
  """(model, variables, golden) for the small released-format checkpoint."""
  cfg = ml_collections.ConfigDict(json.loads((SMALL / 'config.json').read_text())['tokenizer'])
  model = vqgan.from_config(cfg, output_channels=3)
  params = vqgan.load_released_params(str(SMALL / 'tokenizer.msgpack'))
  golden = dict(np.load(SMALL / 'golden.npz'))
  return model, {'params': params}, golden


@pytest.fixture(scope='module')
def demo():
  """(model, variables) of a demo-size model with random parameters (no `init`: it is slow to compile)."""
  model = _demo_model()
  return model, _random_variables(model, (1, 28, 28, 1))


# ---- Golden: the released architecture, parameter for parameter and output for output.


def test_golden_param_tree_matches_checkpoint(small):
  model, variables, golden = small
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(golden['tokenizer_image']))
  assert _flat_shapes(abstract) == _flat_shapes(variables)


def test_golden_encode_to_indices(small):
  model, variables, golden = small
  ids = _apply(model, vqgan.VQGAN.encode_to_indices)(variables, golden['tokenizer_image'])
  assert ids.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(ids), golden['tokenizer_indices'])


def test_golden_decode_from_indices(small):
  model, variables, golden = small
  images = _apply(model, vqgan.VQGAN.decode_from_indices)(variables, golden['decode_ids'])
  np.testing.assert_allclose(np.asarray(images), golden['decoded'], atol=1e-5, rtol=1e-5)


def test_imagenet_param_tree_matches_release_manifest():
  manifest = json.loads((FIXTURES / 'maskgit_param_manifest.json').read_text())['tokenizer_imagenet256']
  model = vqgan.VQGAN(filters=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=2,
                      embedding_dim=256, codebook_size=1024, output_channels=3)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
  expected = {name: tuple(shape) for name, shape in manifest.items()}
  assert _flat_shapes(abstract) == expected


# ---- Building blocks.


def test_downsample_is_tf_style_average_pool():
  # On an odd size the padded cells must not count: a constant image stays constant.
  x = jnp.ones((1, 3, 3, 2))
  np.testing.assert_array_equal(np.asarray(vqgan.downsample(x)), np.ones((1, 2, 2, 2)))
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  np.testing.assert_allclose(np.asarray(vqgan.downsample(x))[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])


def test_upsample_is_nearest():
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
  expected = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], np.float32)
  np.testing.assert_array_equal(np.asarray(vqgan.upsample(x))[0, :, :, 0], expected)


# ---- Demo size and training behaviour.


def test_demo_model_maps_28x28_to_7x7_tokens_and_back(demo):
  model, variables = demo
  images = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
  recon, aux = _apply(model)(variables, images)
  assert recon.shape == (3, 28, 28, 1)
  assert aux['quantizer_loss'].shape == ()
  ids = aux['indices']
  assert ids.shape == (3, 7, 7) and ids.dtype == jnp.int32
  assert int(ids.min()) >= 0 and int(ids.max()) < 64
  decoded = _apply(model, vqgan.VQGAN.decode_from_indices)(variables, ids)
  assert decoded.shape == (3, 28, 28, 1)
  assert model.apply(variables, method=vqgan.VQGAN.codebook).shape == (64, 16)


def test_tiles_round_trip_and_tiled_tokens_see_their_tile_only():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  tiles = vqgan.to_tiles(x, 2)
  np.testing.assert_array_equal(tiles[5], x[1, :4, 4:])  # Image 1, tile (0, 1): row-major.
  np.testing.assert_array_equal(vqgan.from_tiles(tiles, 2), x)
  cfg = ml_collections.ConfigDict(dict(filters=8, channel_multipliers=(1, 2), num_res_blocks=1, embedding_dim=4,
                                       codebook_size=16, norm_groups=4, tiles_per_side=2))
  model = vqgan.from_config(cfg, output_channels=3)
  variables = _random_variables(model, (1, 16, 16, 3))
  ink = jax.random.uniform(jax.random.key(1), (8, 8, 3))
  images = jnp.zeros((3, 16, 16, 3)).at[1, :8, :8].set(ink).at[2, 8:, 8:].set(ink)  # Ink in one tile of 1 and 2.
  recon, aux = _apply(model)(variables, images)
  raw = np.asarray(aux['raw'])  # Encoder outputs [3, 8, 8, D] (before quantization): 4x4 per tile.
  assert aux['indices'].shape == (3, 8, 8) and recon.shape == images.shape
  np.testing.assert_allclose(raw[1, 4:], raw[0, 4:], atol=1e-6)  # Empty tiles: the same latents whatever else
  np.testing.assert_allclose(raw[2, :4], raw[0, :4], atol=1e-6)  # is drawn in the image.
  assert np.abs(raw[1, :4, :4] - raw[0, :4, :4]).max() > 1e-3
  ids = _apply(model, vqgan.VQGAN.encode_to_indices)(variables, images)
  decoded = np.asarray(_apply(model, vqgan.VQGAN.decode_from_indices)(variables, ids))
  np.testing.assert_allclose(decoded[1, 8:], decoded[0, 8:], atol=1e-6)  # Decoded tile by tile, too.
  whole = vqgan.from_config(ml_collections.ConfigDict({**cfg.to_dict(), 'tiles_per_side': 1}), output_channels=3)
  raw_whole = np.asarray(_apply(whole)(variables, images)[1]['raw'])
  assert np.abs(raw_whole[1, 4:] - raw_whole[0, 4:]).max() > 1e-3  # Whole images: ink anywhere moves every latent.


def test_encode_returns_codebook_values_and_consistent_loss(demo):
  model, variables = demo
  images = jax.random.uniform(jax.random.key(2), (2, 28, 28, 1))
  quantized, aux = _apply(model, vqgan.VQGAN.encode)(variables, images)
  codes = model.apply(variables, aux['indices'], method=vqgan.VQGAN.embed)
  np.testing.assert_array_equal(
      np.asarray(aux['indices']),
      np.asarray(_apply(model, vqgan.VQGAN.encode_to_indices)(variables, images)))
  np.testing.assert_allclose(np.asarray(quantized), np.asarray(codes), atol=1e-5)
  sq_error = float(jnp.mean((codes - aux['raw'])**2))
  np.testing.assert_allclose(float(aux['quantizer_loss']), 1.25 * sq_error, rtol=1e-5)


def test_straight_through_gradient_reaches_encoder(demo):
  model, variables = demo
  images = jax.random.uniform(jax.random.key(3), (2, 28, 28, 1))

  def reconstruction_loss(params):  # No quantizer loss: the encoder gets gradient only through the STE.
    recon, _ = model.apply({'params': params}, images)
    return jnp.mean((recon - images)**2)

  grads = jax.jit(jax.grad(reconstruction_loss))(variables['params'])
  encoder_norm = _global_norm(grads['encoder'])
  assert np.isfinite(encoder_norm) and encoder_norm > 0
  np.testing.assert_array_equal(np.asarray(grads['quantizer']['codebook']), 0.0)


def test_quantizer_loss_trains_codebook(demo):
  model, variables = demo
  images = jax.random.uniform(jax.random.key(4), (2, 28, 28, 1))

  def quantizer_loss(params):
    _, aux = model.apply({'params': params}, images)
    return aux['quantizer_loss']

  grads = jax.jit(jax.grad(quantizer_loss))(variables['params'])
  assert _global_norm(grads['quantizer']) > 0
  assert _global_norm(grads['encoder']) > 0  # Commitment term.
  assert _global_norm(grads['decoder']) == 0


def test_init_builds_the_abstract_tree():
  model = vqgan.VQGAN(filters=32, channel_multipliers=(1,), num_res_blocks=1, embedding_dim=4,
                      codebook_size=8, output_channels=1)
  images = jnp.zeros((1, 4, 4, 1))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert _flat_shapes(variables) == _flat_shapes(jax.eval_shape(model.init, jax.random.key(0), images))
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(variables))


def test_bfloat16_compute_keeps_shapes_and_float32_params():
  model = _demo_model(dtype=jnp.bfloat16)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
  variables = _random_variables(model, (1, 28, 28, 1))
  recon, aux = _apply(model)(variables, jnp.full((2, 28, 28, 1), 0.5))
  assert recon.shape == (2, 28, 28, 1) and aux['indices'].shape == (2, 7, 7)


# ---- Codebook health.


def test_codebook_usage_hand_example():
  indices = jnp.array([[0, 1], [1, 3]])
  assert float(vqgan.codebook_usage(indices, 8)) == pytest.approx(3 / 8)
  np.testing.assert_array_equal(np.asarray(vqgan.code_counts(indices, 5)), [1, 2, 0, 1, 0])
  assert float(jax.jit(vqgan.codebook_usage, static_argnums=1)(jnp.arange(4), 4)) == 1.0


@pytest.mark.parametrize('num_outputs', [40, 3])  # More and fewer encoder outputs than codes.
def test_restart_dead_codes_replaces_exactly_the_dead_codes(num_outputs):
  codebook = jnp.arange(10 * 4, dtype=jnp.float32).reshape(10, 4)
  counts = jnp.array([3, 0, 1, 0, 0, 7, 1, 1, 0, 2])
  dead = np.asarray(counts) == 0
  outputs = -1.0 - jnp.arange(num_outputs * 4, dtype=jnp.float32).reshape(num_outputs, 1, 4)
  new = np.asarray(jax.jit(vqgan.restart_dead_codes)(codebook, counts, outputs, jax.random.key(0)))
  np.testing.assert_array_equal(new[~dead], np.asarray(codebook)[~dead])
  candidates = {tuple(row) for row in np.asarray(outputs).reshape(-1, 4)}
  assert all(tuple(row) in candidates for row in new[dead])
  if num_outputs >= len(counts):
    assert len({tuple(row) for row in new[dead]}) == dead.sum()  # Distinct seeds when there are enough.


# ---- Loading released checkpoints.


def test_load_released_params_missing_file(tmp_path):
  with pytest.raises(UserError, match='not found'):
    vqgan.load_released_params(str(tmp_path / 'nope.msgpack'))


def test_load_released_params_invalid_file(tmp_path):
  bad = tmp_path / 'bad.msgpack'
  bad.write_bytes(b'\xc1 definitely not msgpack')
  with pytest.raises(UserError, match='not a valid flax msgpack'):
    vqgan.load_released_params(str(bad))
