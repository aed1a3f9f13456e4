"""Tests for the evaluation metrics, image grids and the evaluation classifier (DESIGN.md §3)."""

import jax
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from fpd_jax.eval import evaluate
from fpd_jax.eval import grid
from fpd_jax.eval import metrics
from fpd_jax.models import classifier


def _normal(seed, shape, scale=1.0, shift=0.0):
  return scale * np.random.default_rng(seed).standard_normal(shape) + shift


def _random_spd(seed, d):
  a = np.random.default_rng(seed).standard_normal((d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


# ---- Fréchet distance.


def test_fd_of_a_set_with_itself_is_zero():
  feats = _normal(0, (500, 16))
  assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_fd_from_stats_matches_closed_form_for_diagonal_covariances():
  # For diagonal covariances FD = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2 with s the standard deviations.
  mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
  s1, s2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 1.0, 0.5, 1.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
  got = metrics.frechet_distance_from_stats(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_fd_from_stats_matches_scipy_sqrtm_for_full_covariances():
  d = 12
  mu1, mu2 = _normal(1, d), _normal(2, d)
  sigma1, sigma2 = _random_spd(3, d), _random_spd(4, d)
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covmean)
  got = metrics.frechet_distance_from_stats(mu1, sigma1, mu2, sigma2)
  assert got == pytest.approx(expected, rel=1e-8)


def test_fd_of_samples_approaches_the_gaussian_closed_form():
  n, d = 20000, 4
  std = np.array([1.0, 2.0, 0.5, 1.5])
  shift = np.array([0.5, 0.0, -1.0, 0.0])
  a = _normal(5, (n, d))
  b = _normal(6, (n, d)) * std + shift
  expected = np.sum(shift**2) + np.sum((1.0 - std) ** 2)  # 1.25 + 1.5 = 2.75.
  assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_fd_is_symmetric_and_positive_for_shifted_sets():
  a = _normal(7, (400, 8))
  b = _normal(8, (300, 8), shift=0.5)
  fd_ab, fd_ba = metrics.frechet_distance(a, b), metrics.frechet_distance(b, a)
  assert fd_ab > 1.0  # |shift|^2 = 8 * 0.25 = 2, plus sampling noise.
  assert fd_ab == pytest.approx(fd_ba, rel=1e-8)


def test_fd_is_finite_and_nonnegative_with_singular_covariances():
  # Fewer samples than dimensions: both covariances are rank-deficient.
  a, b = _normal(9, (10, 32)), _normal(10, (12, 32))
  fd = metrics.frechet_distance(a, b)
  assert np.isfinite(fd) and fd >= 0.0


def test_gaussian_stats_and_shape_errors():
  feats = _normal(11, (50, 3)).astype(np.float32)
  mu, sigma = metrics.gaussian_stats(feats)
  assert mu.dtype == np.float64 and sigma.shape == (3, 3)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False))
  with pytest.raises(ValueError):
    metrics.gaussian_stats(feats[:1])
  with pytest.raises(ValueError):
    metrics.frechet_distance_from_stats(mu, sigma, mu[:2], sigma)


# ---- Precision / recall.


def _reference_precision_recall(real, fake, k):
  """Brute force: full distance matrices, explicit sorting."""
  def radii(x):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]
  d = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # [N_f, N_r]
  precision = (d <= radii(real)[None, :]).any(axis=1).mean()
  recall = (d.T <= radii(fake)[None, :]).any(axis=1).mean()
  return precision, recall


def test_precision_recall_identical_sets_are_one():
  feats = _normal(12, (300, 8))
  assert metrics.precision_recall(feats, feats, k=3) == (1.0, 1.0)


def test_precision_recall_far_disjoint_clusters_are_zero():
  real = _normal(13, (200, 8))
  fake = _normal(14, (200, 8), shift=100.0)
  assert metrics.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_half_overlap():
  near, far = _normal(15, (200, 8)), _normal(16, (200, 8), shift=100.0)
  # Fake covers only one of the real modes: every fake sample is realistic, half of the real set is missed.
  precision, recall = metrics.precision_recall(np.concatenate([near, far]), near, k=3)
  assert (precision, recall) == (1.0, 0.5)
  # Independent samples: half of the fake set lands on the real mode, half far from it.
  fake = np.concatenate([_normal(17, (200, 8)), _normal(18, (200, 8), shift=-100.0)])
  precision, recall = metrics.precision_recall(near, fake, k=5)
  assert precision == pytest.approx(0.5, abs=0.05)
  assert recall > 0.9


def test_precision_recall_chunked_matches_brute_force(monkeypatch):
  monkeypatch.setattr(metrics, '_ROW_CHUNK', 7)  # Several blocks, the last one partial.
  real, fake = _normal(19, (60, 5)), _normal(20, (45, 5), scale=1.3, shift=0.4)
  got = metrics.precision_recall(real, fake, k=3)
  np.testing.assert_allclose(got, _reference_precision_recall(real, fake, 3))
  assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_precision_recall_rejects_bad_k():
  feats = _normal(21, (5, 2))
  with pytest.raises(ValueError):
    metrics.precision_recall(feats, feats, k=5)
  with pytest.raises(ValueError):
    metrics.precision_recall(feats, feats, k=0)


# ---- Class accuracy.


def test_class_accuracy_from_logits_and_predictions():
  labels = np.array([0, 1, 2, 1])
  logits = np.array([[5.0, 0.0, 0.0], [0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  assert metrics.class_accuracy(logits, labels) == 0.75
  assert metrics.class_accuracy(np.array([0, 1, 1, 1]), labels) == 0.75
  assert metrics.class_accuracy(jax.numpy.asarray(logits), labels) == 0.75
  with pytest.raises(ValueError):
    metrics.class_accuracy(labels[:3], labels)


# ---- Image grids.


def test_to_uint8_clips_and_rounds():
  x = np.array([-0.5, 0.0, 0.5, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(grid.to_uint8(x), [0, 0, 128, 255, 255])
  u = np.arange(5, dtype=np.uint8)
  assert grid.to_uint8(u) is u


def test_image_grid_shape_dtype_and_placement():
  images = np.zeros((5, 28, 28, 1), np.float32)
  images[4] = 1.0
  g = grid.image_grid(images, rows=2, cols=3, pad=2)
  assert g.dtype == np.uint8 and g.shape == (2 * 28 + 3 * 2, 3 * 28 + 4 * 2, 1)
  # Image 4 sits in row 1, column 1; cell 5 is empty and keeps the pad value.
  np.testing.assert_array_equal(g[32:60, 32:60], 255)
  np.testing.assert_array_equal(g[2:30, 2:30], 0)
  assert np.all(g[32:60, 62:90] == 128)
  rgb = grid.image_grid(np.full((4, 8, 6, 3), 200, np.uint8), rows=2, cols=2, pad=0)
  assert rgb.shape == (16, 12, 3) and np.all(rgb == 200)
  with pytest.raises(ValueError):
    grid.image_grid(images, rows=2, cols=2)


def test_save_png_grey_and_rgb(tmp_path):
  grey = grid.image_grid(np.random.default_rng(0).random((6, 10, 10, 1)), rows=2, cols=3)
  path = tmp_path / 'sub' / 'grey.png'
  grid.save_png(path, grey)
  with Image.open(path) as im:
    assert im.mode == 'L'
    np.testing.assert_array_equal(np.asarray(im), grey[..., 0])
  rgb = grid.image_grid(np.random.default_rng(1).random((2, 10, 10, 3)), rows=1, cols=2)
  grid.save_png(tmp_path / 'rgb.png', rgb)
  with Image.open(tmp_path / 'rgb.png') as im:
    assert im.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(im), rgb)


# ---- Evaluation classifier.


def test_convnet_output_shapes_and_plain_params():
  model = classifier.ConvNet(widths=(8, 16, 16), feature_dim=12, num_classes=10)
  x = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert set(variables) == {'params'}  # GroupNorm: no batch statistics.
  apply = jax.jit(model.apply, static_argnames=('return_features', 'return_layers'))
  logits = apply(variables, x)
  assert logits.shape == (3, 10)
  logits2, features, layers = apply(variables, x, return_features=True, return_layers=True)
  assert features.shape == (3, 12)
  assert [l.shape for l in layers] == [(3, 28, 28, 8), (3, 14, 14, 16), (3, 7, 7, 16)]
  np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-6)
  out = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
  assert [o.shape for o in out] == [(3, 10), (3, 12)]
  out = jax.eval_shape(lambda v: model.apply(v, x, return_layers=True), variables)
  assert out[0].shape == (3, 10) and len(out[1]) == 3


def test_convnet_seeds_give_different_params_and_norm_options():
  model = classifier.ConvNet(widths=(8, 12), feature_dim=8, num_classes=4)
  x = np.zeros((1, 28, 28, 1), np.float32)
  init = jax.jit(model.init)
  p0, p1 = init(jax.random.PRNGKey(0), x), init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(p0) == jax.tree.structure(p1)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)))
  assert classifier.num_groups(12) == 6 and classifier.num_groups(8) == 8 and classifier.num_groups(3) == 3
  for norm in ('layer', 'none'):
    other = classifier.ConvNet(widths=(4,), feature_dim=4, num_classes=2, norm=norm, convs_per_stage=1)
    shapes = jax.eval_shape(other.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(other.apply, shapes, x).shape == (1, 2)
  with pytest.raises(ValueError):
    bad = classifier.ConvNet(widths=(4,), feature_dim=4, num_classes=2, norm='batch')
    jax.eval_shape(bad.init, jax.random.PRNGKey(0), x)


def test_augment_shifts_within_bounds():
  images = np.zeros((16, 28, 28, 1), np.float32)
  images[:, 10:18, 10:18] = 1.0  # A centred square survives any shift of <= 2 pixels intact.
  out = np.asarray(classifier.augment(jax.random.PRNGKey(0), images))
  assert out.shape == images.shape and out.dtype == images.dtype
  np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), 64.0)
  rows = [np.nonzero(o[..., 0].any(axis=1))[0][0] for o in out]
  cols = [np.nonzero(o[..., 0].any(axis=0))[0][0] for o in out]
  assert set(rows) <= set(range(8, 13)) and set(cols) <= set(range(8, 13))
  assert len(set(zip(rows, cols))) > 1  # Images get different shifts.
  np.testing.assert_array_equal(classifier.augment(jax.random.PRNGKey(0), images, max_shift=0), images)


def test_real_data_is_held_out_from_a_disjoint_reference():
  """real_data: num_samples digits, class-balanced like the generated sets, test digits first; the rest is the
  reference, so no scored digit is also a reference digit."""
  rng = np.random.default_rng(0)
  train = {'label': np.repeat(np.arange(10), 45), 'image': np.arange(450)}  # Image = a digit's id.
  test = {'label': np.repeat(np.arange(10), 5), 'image': 1000 + np.arange(50)}
  order = rng.permutation(450)
  train = {k: v[order] for k, v in train.items()}
  for num in (40, 103):
    held, ref = evaluate.split_real(train, test, num, 10, seed=0)
    assert len(held['label']) == num and len(ref['label']) == 500 - num
    assert not set(held['image']) & set(ref['image'])
    np.testing.assert_array_equal(np.bincount(held['label'], minlength=10),
                                  np.bincount(np.arange(num) % 10, minlength=10))
    from_test = held['image'] >= 1000
    assert from_test.sum() == min(num, 50)  # All test digits are used before any train digit.
    again, _ = evaluate.split_real(train, test, num, 10, seed=0)
    np.testing.assert_array_equal(again['image'], held['image'])
  with pytest.raises(evaluate.UserError, match='num_samples=251 leaves too few'):
    evaluate.split_real(train, test, 251, 10, seed=0)
