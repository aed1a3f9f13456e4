"""Tests for the straight-through lift (DESIGN.md §1.3 step 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpd_jax.distill import ste

B, N, K, D = 2, 5, 7, 3


def _inputs(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  logits = 3.0 * jax.random.normal(k1, (B, N, K))
  codebook = jax.random.normal(k2, (K, D))
  tokens = jax.random.categorical(k3, logits)
  return logits, tokens, codebook


@pytest.mark.parametrize('jit', [False, True])
def test_forward_is_exactly_hard_embedding(jit):
  logits, tokens, codebook = _inputs()
  fn = jax.jit(ste.straight_through_embed) if jit else ste.straight_through_embed
  out = fn(logits, tokens, codebook)
  assert out.shape == (B, N, D)
  assert out.dtype == codebook.dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(codebook)[np.asarray(tokens)])


def test_forward_exact_under_grad_trace():
  """The value seen inside a (jitted) value_and_grad trace is still the hard embedding."""
  logits, tokens, codebook = _inputs(1)

  def f(l):
    out = ste.straight_through_embed(l, tokens, codebook)
    return jnp.sum(out), out

  (_, out), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logits)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(codebook)[np.asarray(tokens)])
  assert np.all(np.isfinite(np.asarray(grad)))


def test_gradient_matches_soft_embedding():
  logits, tokens, codebook = _inputs(2)
  w = jax.random.normal(jax.random.PRNGKey(9), (B, N, D))
  g_ste = jax.grad(lambda l: jnp.sum(w * ste.straight_through_embed(l, tokens, codebook)))(logits)
  g_soft = jax.grad(lambda l: jnp.sum(w * ste.soft_embed(l, codebook)))(logits)
  assert np.abs(np.asarray(g_soft)).max() > 1e-3
  np.testing.assert_allclose(np.asarray(g_ste), np.asarray(g_soft), rtol=1e-5, atol=1e-6)


def test_soft_embed_differs_from_hard():
  logits, tokens, codebook = _inputs(3)
  soft = ste.soft_embed(logits, codebook)
  np.testing.assert_allclose(np.asarray(soft), np.einsum('bnk,kd->bnd', jax.nn.softmax(logits), codebook),
                             rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(soft), np.asarray(codebook)[np.asarray(tokens)])


def test_lift_dispatch_and_unknown_mode():
  logits, tokens, codebook = _inputs(4)
  np.testing.assert_array_equal(np.asarray(ste.lift(logits, tokens, codebook, 'ste')),
                                np.asarray(codebook)[np.asarray(tokens)])
  np.testing.assert_array_equal(np.asarray(ste.lift(logits, tokens, codebook, 'soft')),
                                np.asarray(ste.soft_embed(logits, codebook)))
  with pytest.raises(ValueError, match='Unknown lift mode'):
    ste.lift(logits, tokens, codebook, 'hard')


def test_shape_mismatch_raises():
  logits, tokens, codebook = _inputs(5)
  with pytest.raises(ValueError, match='codebook'):
    ste.straight_through_embed(logits[..., :-1], tokens, codebook)
