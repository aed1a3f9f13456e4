"""The MaskGIT transformer reproduces the released architecture: names, shapes and logits."""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import conditioning
from fpd_jax.models import maskgit

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def _small_transformer():
  cfg = json.load(open(os.path.join(FIXTURES, 'maskgit_small', 'config.json')))['transformer']
  return maskgit.Transformer(vocab_size=cfg['vocab_size'], hidden_size=cfg['hidden_size'],
                             num_layers=cfg['num_layers'], num_heads=cfg['num_heads'], mlp_dim=cfg['mlp_dim'],
                             max_position_embeddings=cfg['max_position_embeddings'], dropout=cfg['dropout'])


def _released_params():
  with open(os.path.join(FIXTURES, 'maskgit_small', 'transformer.msgpack'), 'rb') as f:
    return flax.serialization.msgpack_restore(f.read())['params']


def test_golden_logits_match_reference():
  golden = np.load(os.path.join(FIXTURES, 'maskgit_small', 'golden.npz'))
  model, params = _small_transformer(), _released_params()
  ids = golden['transformer_input_ids']
  assert (ids == -1).any(), 'fixture uses the reference mask id -1'
  logits = model.apply({'params': params}, ids)
  np.testing.assert_allclose(logits, golden['transformer_logits'], atol=2e-5, rtol=1e-5)
  # The mask id -1 and vocab_size - 1 are the same token.
  ids_pos = np.where(ids < 0, model.vocab_size - 1, ids)
  np.testing.assert_array_equal(model.apply({'params': params}, ids_pos), logits)


def test_param_tree_equals_released_file():
  model, params = _small_transformer(), _released_params()
  ids = jnp.zeros((1, model.max_position_embeddings), jnp.int32)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), ids)['params'])
  assert ckpt_lib.tree_shapes(init) == ckpt_lib.tree_shapes(params)


def test_imagenet_shapes_equal_manifest():
  manifest = json.load(open(os.path.join(FIXTURES, 'maskgit_param_manifest.json')))['maskgit_imagenet256']
  model = maskgit.Transformer(vocab_size=2025, hidden_size=768, num_layers=24, num_heads=16, mlp_dim=3072,
                              max_position_embeddings=257)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 257), jnp.int32)))
  ours = {'params/' + k: list(v) for k, v in ckpt_lib.tree_shapes(shapes['params']).items()}
  assert ours == manifest


def test_conditioned_model_slices_codebook_logits_and_cfg_zero_is_plain():
  cond = conditioning.ClassConditioner(codebook_size=16, num_classes=3)
  model = maskgit.MaskGITModel(maskgit.Transformer(vocab_size=16 + 4 + 1, hidden_size=32, num_layers=1,
                                                   num_heads=2, mlp_dim=64, max_position_embeddings=10),
                               cond, codebook_size=16)
  labels = jnp.array([0, 2])
  params = model.init(jax.random.key(1), 9, labels)['params']
  tokens = jnp.array([[model.mask_id] * 9, [3] * 9])
  logits = model.logits(params, tokens, labels)
  assert logits.shape == (2, 9, 16)
  np.testing.assert_array_equal(model.guided_logits(params, tokens, labels, 0.0), logits)
  guided = model.guided_logits(params, tokens, labels, 2.0)
  uncond = model.logits(params, tokens, cond.null(labels))
  np.testing.assert_allclose(guided, 3.0 * logits - 2.0 * uncond, atol=1e-4)
  # The class token sits in front of the image tokens: id = label + K.
  np.testing.assert_array_equal(cond.sequence(labels, tokens)[:, 0], [16, 18])
