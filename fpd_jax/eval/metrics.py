"""Sample-quality metrics in the feature space of an evaluation network (DESIGN.md §3).

All functions are pure numpy (float64 internally); numpy or jax arrays are converted to host arrays on entry:
  * Fréchet distance (FD) between Gaussians fitted to two feature sets — FID when the features are InceptionV3's;
  * precision/recall of k-NN manifolds (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models");
  * class accuracy of conditional samples under the evaluation classifier.
"""

import numpy as np

# Rows of one block of the pairwise-distance matrix: 1,024 x 5,000 float64 is 40 MB.
_ROW_CHUNK = 1024


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
  """Fits a Gaussian to a feature set.

  Args:
    feats: [N, D] features, N >= 2.

  Returns:
    (mu [D], sigma [D, D]): the mean and the unbiased (N - 1) covariance, float64, as in standard FID code.
  """
  feats = _as_2d(feats, 'feats')
  if feats.shape[0] < 2:
    raise ValueError(f'gaussian_stats needs at least 2 samples, got {feats.shape[0]}.')
  return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

  The trace term is computed without a general (non-symmetric) matrix square root: sigma1 sigma2 has the same
  eigenvalues as the symmetric PSD matrix M = sigma1^(1/2) sigma2 sigma1^(1/2), so
  tr((sigma1 sigma2)^(1/2)) = sum(sqrt(eig(M))). Both steps use symmetric eigendecompositions, which are stable
  for singular covariances (e.g. fewer samples than dimensions) and never produce imaginary parts; round-off
  negative eigenvalues are clipped to zero.

  Args:
    mu1: [D] mean of the first Gaussian.
    sigma1: [D, D] covariance of the first Gaussian (symmetric PSD).
    mu2: [D] mean of the second Gaussian.
    sigma2: [D, D] covariance of the second Gaussian.

  Returns:
    The squared Fréchet distance as a Python float (>= 0), i.e. the quantity reported as FID.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'Inconsistent shapes: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, '
                     f'sigma2 {sigma2.shape}; expected [D] and [D, D].')
  sqrt_sigma1 = _sqrtm_psd(sigma1)
  m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  eig = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
  diff = mu1 - mu2
  fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
  return float(max(fd, 0.0))


def frechet_distance(feats_a, feats_b) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets.

  Args:
    feats_a: [N_a, D] features (e.g. of real images).
    feats_b: [N_b, D] features (e.g. of generated images).

  Returns:
    The squared Fréchet distance (FD; FID for InceptionV3 pool features) as a Python float.
  """
  mu_a, sigma_a = gaussian_stats(feats_a)
  mu_b, sigma_b = gaussian_stats(feats_b)
  return frechet_distance_from_stats(mu_a, sigma_a, mu_b, sigma_b)


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
  """Precision and recall of k-NN manifolds (Kynkäänniemi et al. 2019).

  The manifold of a set is the union of balls centred on its samples, each with radius the distance to that
  sample's k-th nearest neighbour within the set (itself excluded). Precision is the fraction of fake samples
  inside the real manifold (fidelity); recall is the fraction of real samples inside the fake manifold
  (coverage). Distances are Euclidean, computed in float64 in row blocks, so 5,000 x 5,000 needs ~40 MB.

  Args:
    real_feats: [N_r, D] features of real images, N_r > k.
    fake_feats: [N_f, D] features of generated images, N_f > k.
    k: Neighbour rank that sets each radius.

  Returns:
    (precision, recall) as Python floats in [0, 1].
  """
  real = _as_2d(real_feats, 'real_feats')
  fake = _as_2d(fake_feats, 'fake_feats')
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f'Feature sizes differ: real {real.shape}, fake {fake.shape}.')
  if k < 1 or k >= min(len(real), len(fake)):
    raise ValueError(f'k={k} must be in [1, min(N_real, N_fake) - 1] = [1, {min(len(real), len(fake)) - 1}].')
  real_radii2 = _knn_radii_sq(real, k)
  fake_radii2 = _knn_radii_sq(fake, k)
  precision = _inside_manifold(fake, real, real_radii2).mean()
  recall = _inside_manifold(real, fake, fake_radii2).mean()
  return float(precision), float(recall)


def class_accuracy(logits_or_preds, labels) -> float:
  """Fraction of samples whose predicted class equals its label.

  Args:
    logits_or_preds: [N, C] logits (or probabilities), argmaxed over the last axis, or [N] integer predictions.
    labels: [N] integer labels (for conditional samples: the class they were generated for).

  Returns:
    The accuracy as a Python float in [0, 1].
  """
  labels = np.asarray(labels).reshape(-1)
  preds = np.asarray(logits_or_preds)
  if preds.ndim == 2:
    preds = preds.argmax(axis=-1)
  preds = preds.reshape(-1)
  if preds.shape != labels.shape:
    raise ValueError(f'{preds.shape[0]} predictions for {labels.shape[0]} labels.')
  if labels.size == 0:
    raise ValueError('class_accuracy needs at least one sample.')
  return float((preds == labels).mean())


def _as_2d(x, name: str) -> np.ndarray:
  """Converts `x` to a float64 [N, D] array, rejecting other ranks and non-finite values."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f'{name} must be [N, D], got shape {x.shape}.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} contains NaN or Inf.')
  return x


def _sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
  eig, vec = np.linalg.eigh(0.5 * (sigma + sigma.T))
  return (vec * np.sqrt(np.clip(eig, 0.0, None))) @ vec.T


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [len(a), len(b)], clipped at 0 against round-off."""
  d2 = (a * a).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d2, 0.0)


def _knn_radii_sq(feats: np.ndarray, k: int) -> np.ndarray:
  """Squared distance from each sample to its k-th nearest other sample in the same set."""
  n = len(feats)
  sq = (feats * feats).sum(axis=1)
  radii = np.empty(n, np.float64)
  for start in range(0, n, _ROW_CHUNK):
    stop = min(start + _ROW_CHUNK, n)
    d2 = _sq_dists(feats[start:stop], feats, sq)
    d2[np.arange(stop - start), np.arange(start, stop)] = np.inf  # Exclude self (not exact duplicates).
    radii[start:stop] = np.partition(d2, k - 1, axis=1)[:, k - 1]
  return radii


def _inside_manifold(queries: np.ndarray, centres: np.ndarray, radii_sq: np.ndarray) -> np.ndarray:
  """Boolean [len(queries)]: whether each query lies within some centre's ball (distance <= its radius)."""
  sq = (centres * centres).sum(axis=1)
  inside = np.empty(len(queries), bool)
  for start in range(0, len(queries), _ROW_CHUNK):
    stop = min(start + _ROW_CHUNK, len(queries))
    inside[start:stop] = (_sq_dists(queries[start:stop], centres, sq) <= radii_sq[None, :]).any(axis=1)
  return inside
