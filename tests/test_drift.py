"""Tests for the multi-bandwidth drift loss (DESIGN.md §1.3 step 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpd_jax.distill import drift

TEMPS = drift.DEFAULT_TEMPERATURES


def _normal(seed, shape, scale=1.0, shift=0.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape) + shift).astype(np.float32)


def _cdist(a, b):
  return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


def _softmax(z, axis):
  z = z - z.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def _reference_drift(x, y_pos, y_neg, tau, exclude_self):
  """The spec written out directly in float64 numpy (features already in normalised units)."""
  x, y_pos, y_neg = (np.asarray(a, np.float64) for a in (x, y_pos, y_neg))
  unit = np.sqrt(x.shape[1]) * tau
  logit_neg = -_cdist(x, y_neg) / unit
  if exclude_self:
    logit_neg[np.arange(len(x)), np.arange(len(x))] = -np.inf
  logits = np.concatenate([logit_neg, -_cdist(x, y_pos) / unit], axis=1)
  a = np.sqrt(_softmax(logits, 1) * _softmax(logits, 0))
  a_neg, a_pos = a[:, :len(y_neg)], a[:, len(y_neg):]
  w_pos = a_pos * a_neg.sum(1, keepdims=True)
  w_neg = a_neg * a_pos.sum(1, keepdims=True)
  return w_pos @ y_pos - w_neg @ y_neg - (w_pos.sum(1) - w_neg.sum(1))[:, None] * x


def _energy_distance(a, b):
  """Energy distance 2E‖a−b‖ − E‖a−a'‖ − E‖b−b'‖ (zero iff the two distributions are equal)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return 2 * _cdist(a, b).mean() - _cdist(a, a).mean() - _cdist(b, b).mean()


@pytest.mark.parametrize('exclude_self', [False, True])
def test_drift_field_matches_reference(exclude_self):
  x = _normal(0, (8, 4))
  y_pos = _normal(1, (6, 4), shift=0.5)
  y_neg = x if exclude_self else _normal(2, (8, 4), shift=-0.5)
  for tau in TEMPS + (1.0,):
    got = drift.drift_field(x, y_pos, y_neg, tau, exclude_self=exclude_self)
    np.testing.assert_allclose(np.asarray(got), _reference_drift(x, y_pos, y_neg, tau, exclude_self),
                               rtol=1e-4, atol=1e-5)


def test_drift_vanishes_when_positives_equal_negatives():
  x = _normal(3, (8, 4))
  y = _normal(4, (6, 4), shift=0.3)
  for tau in TEMPS:
    v = drift.drift_field(x, y, y, tau, exclude_self=False)
    assert v.shape == x.shape
    np.testing.assert_allclose(np.asarray(v), 0.0, atol=1e-6)


def test_lone_positive_attracts_x():
  """With negatives symmetric around x their pull cancels: V is exactly along y⁺ − x."""
  s = 4
  x = _normal(5, (1, s))
  y_pos = x + _normal(6, (1, s))
  eye = np.eye(s, dtype=np.float32)
  y_neg = np.concatenate([x + 0.7 * eye, x - 0.7 * eye])
  d = (y_pos - x)[0]
  for tau in TEMPS + (1.0,):
    v = np.asarray(drift.drift_field(x, y_pos, y_neg, tau, exclude_self=False))[0]
    assert np.linalg.norm(v) > 0
    np.testing.assert_allclose(v @ d / (np.linalg.norm(v) * np.linalg.norm(d)), 1.0, atol=1e-4)


def test_drift_points_toward_positives_with_self_negatives():
  """The FPD setting (negatives = the student itself): far targets pull every student sample toward them."""
  x = _normal(7, (8, 4))
  y_pos = _normal(8, (8, 4), scale=0.3, shift=4.0)
  x_n, y_n, _, _ = drift.normalize_features(x, y_pos, x)
  v = np.asarray(drift.multi_bandwidth_drift(x_n, y_n, x_n, TEMPS))
  direction = np.asarray(y_n).mean(0) - np.asarray(x_n)
  cos = np.sum(v * direction, -1) / (np.linalg.norm(v, axis=-1) * np.linalg.norm(direction, axis=-1))
  assert np.all(cos > 0.5), cos


def test_normalize_features_mean_distance_is_sqrt_dim():
  c, s_dim = 8, 16
  x = _normal(9, (c, s_dim), scale=7.0)
  y_pos = _normal(10, (6, s_dim), scale=7.0, shift=3.0)
  x_n, y_n, yneg_n, s = drift.normalize_features(x, y_pos, x)
  d_pos, d_neg = _cdist(np.asarray(x_n), np.asarray(y_n)), _cdist(np.asarray(x_n), np.asarray(yneg_n))
  mean = (d_pos.sum() + d_neg.sum()) / (d_pos.size + d_neg.size - c)  # self pairs (zeros) excluded
  np.testing.assert_allclose(mean, np.sqrt(s_dim), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(x_n) * float(s) / np.sqrt(s_dim), x, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='exclude_self'):
    drift.feature_scale(x, y_pos, y_pos, exclude_self=True)


def test_multi_bandwidth_vmap_equals_loop():
  x = _normal(11, (8, 4))
  y_pos = _normal(12, (6, 4), shift=0.5)
  x_n, y_n, _, _ = drift.normalize_features(x, y_pos, x)
  got = drift.multi_bandwidth_drift(x_n, y_n, x_n, TEMPS, exclude_self=True)
  want = 0.0
  for tau in TEMPS:
    v = drift.rms_normalize(drift.drift_field(x_n, y_n, x_n, tau, exclude_self=True))
    np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(v**2))), 1.0, rtol=1e-4)  # unit RMS per bandwidth
    want = want + v
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_loss_equals_mean_squared_drift_and_gradient_is_minus_drift():
  """loss = mean(V²) in value; d loss / d x = −2V/(C·S) · √S/s (the scale s is stop-gradient)."""
  c, s_dim = 8, 4
  x = _normal(13, (c, 2, 2))  # features [C, ...] are flattened to [C, S]
  y_pos = _normal(14, (c, 2, 2), shift=1.0)
  loss, grad = jax.jit(jax.value_and_grad(drift.drift_loss_group))(x, y_pos, jnp.asarray(TEMPS))
  x_n, y_n, _, s = drift.normalize_features(x.reshape(c, -1), y_pos.reshape(c, -1), x.reshape(c, -1))
  v = drift.multi_bandwidth_drift(x_n, y_n, x_n, TEMPS)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), float(jnp.mean(v**2)), rtol=1e-4)
  want = -2.0 * np.asarray(v) / (c * s_dim) * np.sqrt(s_dim) / float(s)
  np.testing.assert_allclose(np.asarray(grad).reshape(c, -1), want, rtol=1e-4, atol=1e-7)


def test_grouping_vmap_equals_loop():
  g, c = 3, 8
  x = _normal(15, (g * c, 4))
  y = _normal(16, (g * c, 4), shift=0.5)
  got = drift.drift_loss(x, y, g)
  want = np.mean([float(drift.drift_loss_group(x[i * c:(i + 1) * c], y[i * c:(i + 1) * c])) for i in range(g)])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert drift.group_batch(x, g).shape == (g, c, 4)
  with pytest.raises(ValueError, match='divide'):
    drift.group_batch(x, 5)


def test_multi_layer_sums_layers():
  g = 3  # same [24, 4] layer shape as test_grouping_vmap_equals_loop (one compile), plus a [24, 2, 2, 2] layer
  xs = [_normal(17, (24, 4)), _normal(18, (24, 2, 2, 2))]
  ys = [_normal(19, (24, 4), shift=1.0), _normal(20, (24, 2, 2, 2), shift=-1.0)]
  total, per_layer = drift.multi_layer_drift_loss(xs, ys, g)
  assert len(per_layer) == 2
  for x, y, layer_loss in zip(xs, ys, per_layer):
    np.testing.assert_allclose(float(layer_loss), float(drift.drift_loss(x, y, g)), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(per_layer[0] + per_layer[1]), rtol=1e-6)


def test_degenerate_inputs_are_finite():
  """A collapsed student (all samples equal) and a single-sample group give finite losses and gradients."""
  y = _normal(21, (8, 4), shift=2.0)
  for x in (np.zeros((8, 4), np.float32), np.zeros((1, 4), np.float32)):
    loss, grad = jax.value_and_grad(drift.drift_loss_group)(x, y[:x.shape[0]])
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_gradient_descent_moves_student_toward_targets():
  """Student features as free parameters: a few drift-loss steps shrink the energy distance to the targets."""
  g, c, s_dim = 2, 16, 8
  x = _normal(22, (g * c, s_dim))
  y = _normal(23, (g * c, s_dim), scale=0.5, shift=2.0)
  step = jax.jit(jax.value_and_grad(lambda x: drift.drift_loss(x, y, g)))
  loss, grad = step(x)
  assert np.isfinite(float(loss))
  assert float(jnp.abs(grad).max()) > 0
  before = _energy_distance(x, y)
  for _ in range(15):
    _, grad = step(x)
    x = x - 20.0 * grad
  after = _energy_distance(x, y)
  assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize('mean_square', [1.0, 1e-4, 6e-9])
def test_every_bandwidth_of_real_size_gets_unit_rms(mean_square):
  """Each V_τ is divided by its own RMS: down to the smallest drift measured on the demo (mean square 6.3e-9, a
  trained student), a bandwidth's weight is not shrunk by the floor (unit RMS within 1e-4)."""
  v = _normal(24, (8, 4))
  v = v * np.sqrt(mean_square / np.mean(np.square(np.asarray(v, np.float64))))
  got = np.asarray(drift.rms_normalize(v), np.float64)
  np.testing.assert_allclose(np.sqrt(np.mean(np.square(got))), 1.0, rtol=1e-4)


def test_rounding_noise_drift_is_not_amplified_and_zero_stays_zero():
  """A field at float32 rounding level (RMS 1e-9 in unit-scale features) keeps a tiny weight instead of becoming a
  unit-RMS direction; an all-zero field stays zero."""
  v = _normal(25, (8, 4)) * 1e-9
  assert float(jnp.sqrt(jnp.mean(jnp.square(drift.rms_normalize(v))))) < 1e-2
  np.testing.assert_array_equal(drift.rms_normalize(jnp.zeros((8, 4))), 0.0)
