"""The multi-bandwidth drift loss (DESIGN.md §1.3 step 6; Drifting Models, Deng et al. 2026, arXiv 2602.04770).

FPD matches the student's feature distribution to the teacher-refined target distribution with a drift field:
every student feature x is moved toward nearby target features (positives y⁺) and away from nearby student
features (negatives y⁻), and the student is regressed onto its drifted self. At equilibrium (student and target
distributions equal) attraction and repulsion cancel and the drift vanishes.

Per group of samples sharing a condition (same class / prompt), with x = student features `[C, S]`,
y⁺ = target features `[C⁺, S]` and y⁻ = the student features themselves (self pair excluded):

1. Scale. s = mean Euclidean distance between x and all of [y⁻; y⁺] (self pairs excluded; stop-gradient).
   Features are normalised by s/√S (x̃ = x·√S/s, same factor for the targets), so the mean distance becomes √S,
   and distances are measured in units of s: dist(x̃, ỹ)/√S = dist(x, y)/s.
2. Kernel logits −dist/τ for each bandwidth τ (default `DEFAULT_TEMPERATURES` = 0.02, 0.05, 0.2), the x–y⁻
   diagonal set to −inf.
3. Affinity A = sqrt(softmax over the targets [y⁻; y⁺] (each row) · softmax over x (each column)).
   W⁺ = A⁺ · ΣA⁻ and W⁻ = A⁻ · ΣA⁺ (row sums of the other block).
4. Drift V_τ(x) = Σ_j W⁺_ij y⁺_j − Σ_j W⁻_ij y⁻_j − (ΣW⁺ − ΣW⁻)_i x_i. (The row sums of W⁺ and W⁻ are both
   ΣA⁺·ΣA⁻, so the last term is zero up to rounding; it is kept as the spec writes it, making V explicitly a weighted sum of
   differences y − x.)
5. V = Σ_τ V_τ / RMS(V_τ), the RMS taken over the group's whole `[C, S]` array (bandwidths computed with
   `jax.vmap`, groups with `jax.vmap` too).
6. Loss = mean over all `C·S` elements of (x̃ − stop_gradient(x̃ + V))², i.e. mean(V²) in value; its gradient
   w.r.t. x̃ is −2V/(C·S). (Per-element mean, not per-sample squared norm: the value does not grow with the
   feature size, and since each V_τ has unit mean square the loss lies in [0, len(temperatures)²].)

Everything is float32 and jittable; softmaxes are max-subtracted and safe when a whole row or column is masked.
The public functions are `jax.jit`-wrapped (fast when called eagerly; inlined when traced inside a caller's jit);
`num_groups` and `exclude_self` are static arguments, temperatures may be a traced 1-D array.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

DEFAULT_TEMPERATURES = (0.02, 0.05, 0.2)  # Kernel bandwidths τ, in units of the mean pairwise distance s.
_SCALE_EPS = 1e-6  # Guards the division by the scale s (all features identical).
# Floor on the mean square of V_τ before dividing by its RMS (features are normalised to unit scale, so this is an
# RMS of 1e-6, the float32 cancellation error of Σ W⁺y⁺ − Σ W⁻y⁻ − (ΣW⁺ − ΣW⁻)x). Above it, every V_τ gets unit RMS:
# on the demo the smallest raw mean squares seen are 1.4e-7 at the first FPD step and 6.3e-9 after 600 steps (288
# fields each), where the floor changes a weight by < 1e-4. Below it the field is rounding noise (random-weight
# models give mean squares down to 1e-17):
# dividing by its own RMS would turn noise into a unit-weight direction, so it keeps its tiny weight instead.
_RMS_EPS = 1e-12
_HIGHEST = jax.lax.Precision.HIGHEST  # f32 matmuls at full precision on TPU/GPU (distances need it).


def _as_matrix(x: jax.Array) -> jax.Array:
  """`[C, ...]` -> float32 `[C, S]`."""
  x = jnp.asarray(x)
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def pairwise_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Euclidean distances between the rows of `x [C, S]` and `y [M, S]`, `[C, M]`.

  Uses the matmul form ‖x‖² + ‖y‖² − 2x·y on inputs centred at x's mean (translation invariant, and centring
  keeps the cancellation error small), clamped at 0, with a safe square root.
  """
  centre = jnp.mean(x, axis=0, keepdims=True)
  x = x - centre
  y = y - centre
  sq = (jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1)[None, :] -
        2.0 * jnp.matmul(x, y.T, precision=_HIGHEST))
  return jnp.sqrt(jnp.maximum(sq, 1e-30))


def _masked_softmax(logits: jax.Array, axis: int) -> jax.Array:
  """Softmax along `axis` that tolerates −inf entries; an all −inf slice gives zeros (not NaN)."""
  m = jnp.max(logits, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(logits - m)
  z = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(z > 0, z, 1.0)


def _self_mask(num_x: int, num_neg: int, exclude_self: bool) -> jax.Array | None:
  """Boolean `[C, C]` diagonal marking the x_i–y⁻_i self pairs, or None when not excluded."""
  if not exclude_self:
    return None
  if num_x != num_neg:
    raise ValueError(f'exclude_self needs the negatives to be x itself, but x has {num_x} rows and the '
                     f'negatives {num_neg}.')
  return jnp.eye(num_x, dtype=bool)


@functools.partial(jax.jit, static_argnames=('exclude_self',))
def feature_scale(x: jax.Array, y_pos: jax.Array, y_neg: jax.Array, exclude_self: bool = True) -> jax.Array:
  """The scale s: mean Euclidean distance between x and all of [y⁻; y⁺] (stop-gradient).

  Args:
    x: Student features `[C, S]`.
    y_pos: Positive (target) features `[C⁺, S]`.
    y_neg: Negative features `[C⁻, S]` (the student features themselves in FPD).
    exclude_self: Leave the C zero-distance x_i–y⁻_i pairs out of the mean (requires C⁻ = C).

  Returns:
    Scalar float32 s, with no gradient.
  """
  x, y_pos, y_neg = (jax.lax.stop_gradient(_as_matrix(a)) for a in (x, y_pos, y_neg))
  c = x.shape[0]
  d_pos = pairwise_distance(x, y_pos)
  d_neg = pairwise_distance(x, y_neg)
  mask = _self_mask(c, y_neg.shape[0], exclude_self)
  count = d_pos.size + d_neg.size
  if mask is not None:
    d_neg = jnp.where(mask, 0.0, d_neg)
    count -= c
  return (jnp.sum(d_pos) + jnp.sum(d_neg)) / max(count, 1)


@functools.partial(jax.jit, static_argnames=('exclude_self',))
def normalize_features(x: jax.Array, y_pos: jax.Array, y_neg: jax.Array,
                       exclude_self: bool = True) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Divides all features by s/√S, so the mean x–[y⁻; y⁺] distance becomes √S.

  Args:
    x: Student features `[C, S]` (gradients flow through the result; the factor itself is stop-gradient).
    y_pos: Positive features `[C⁺, S]`.
    y_neg: Negative features `[C⁻, S]`.
    exclude_self: Passed to `feature_scale`.

  Returns:
    `(x̃, ỹ⁺, ỹ⁻, s)`: the normalised float32 features and the scale s.
  """
  x, y_pos, y_neg = (_as_matrix(a) for a in (x, y_pos, y_neg))
  s = feature_scale(x, y_pos, y_neg, exclude_self)
  factor = jnp.sqrt(jnp.float32(x.shape[-1])) / (s + _SCALE_EPS)
  return x * factor, y_pos * factor, y_neg * factor, s


@functools.partial(jax.jit, static_argnames=('exclude_self',))
def drift_field(x: jax.Array, y_pos: jax.Array, y_neg: jax.Array, temperature: float | jax.Array,
                exclude_self: bool = False) -> jax.Array:
  """The drift V_τ for one bandwidth, before RMS normalisation (Drifting Models, Algorithm 2).

  Inputs are expected in normalised units (`normalize_features`): distances are divided by √S, i.e. measured
  in units of the scale s, before the kernel logits −dist/τ.

  Args:
    x: Student features `[C, S]`.
    y_pos: Positive features `[C⁺, S]`.
    y_neg: Negative features `[C⁻, S]`.
    temperature: Bandwidth τ (scalar; may be traced, e.g. under `jax.vmap`).
    exclude_self: Mask the x_i–y⁻_i diagonal with −inf (the negatives are x itself; requires C⁻ = C).

  Returns:
    `[C, S]` float32 drift Σ W⁺y⁺ − Σ W⁻y⁻ − (ΣW⁺ − ΣW⁻)·x.
  """
  x, y_pos, y_neg = (_as_matrix(a) for a in (x, y_pos, y_neg))
  c, s_dim = x.shape
  num_neg = y_neg.shape[0]
  unit = jnp.sqrt(jnp.float32(s_dim)) * jnp.asarray(temperature, jnp.float32)
  logit_neg = -pairwise_distance(x, y_neg) / unit
  logit_pos = -pairwise_distance(x, y_pos) / unit
  mask = _self_mask(c, num_neg, exclude_self)
  if mask is not None:
    logit_neg = jnp.where(mask, -jnp.inf, logit_neg)
  logits = jnp.concatenate([logit_neg, logit_pos], axis=1)  # [C, C⁻ + C⁺], targets ordered [y⁻; y⁺].
  affinity = jnp.sqrt(_masked_softmax(logits, axis=1) * _masked_softmax(logits, axis=0))
  a_neg, a_pos = affinity[:, :num_neg], affinity[:, num_neg:]
  w_pos = a_pos * jnp.sum(a_neg, axis=1, keepdims=True)
  w_neg = a_neg * jnp.sum(a_pos, axis=1, keepdims=True)
  w_diff = jnp.sum(w_pos, axis=1, keepdims=True) - jnp.sum(w_neg, axis=1, keepdims=True)
  return (jnp.matmul(w_pos, y_pos, precision=_HIGHEST) - jnp.matmul(w_neg, y_neg, precision=_HIGHEST) -
          w_diff * x)


def rms_normalize(v: jax.Array) -> jax.Array:
  """v / RMS(v), the RMS over the whole array; a drift at float32 rounding level (mean square below `_RMS_EPS`)
  is not amplified to unit RMS, and a zero drift stays zero."""
  return v / jnp.sqrt(jnp.mean(jnp.square(v)) + _RMS_EPS)


@functools.partial(jax.jit, static_argnames=('exclude_self',))
def multi_bandwidth_drift(x_norm: jax.Array, ypos_norm: jax.Array, yneg_norm: jax.Array,
                          temperatures: Sequence[float] | jax.Array = DEFAULT_TEMPERATURES,
                          exclude_self: bool = True) -> jax.Array:
  """V = Σ_τ V_τ / RMS(V_τ), the bandwidths computed with `jax.vmap` over `temperatures`.

  The pairwise distances do not depend on τ, so vmap computes them once.

  Args:
    x_norm: Normalised student features `[C, S]`.
    ypos_norm: Normalised positive features `[C⁺, S]`.
    yneg_norm: Normalised negative features `[C⁻, S]`.
    temperatures: Bandwidths τ, a sequence or 1-D array.
    exclude_self: See `drift_field`; True when the negatives are `x_norm` itself (the FPD setting).

  Returns:
    `[C, S]` float32 drift in normalised units.
  """
  temps = jnp.asarray(temperatures, jnp.float32).reshape(-1)

  def one(tau):
    return rms_normalize(drift_field(x_norm, ypos_norm, yneg_norm, tau, exclude_self))

  return jnp.sum(jax.vmap(one)(temps), axis=0)


@jax.jit
def drift_loss_group(x: jax.Array, y_pos: jax.Array,
                     temperatures: Sequence[float] | jax.Array = DEFAULT_TEMPERATURES) -> jax.Array:
  """The drift loss of one group; the negatives are the student features x themselves (self pair excluded).

  Args:
    x: Student features `[C, ...]` (flattened to `[C, S]`); gradients flow to them. C ≥ 2 is needed for any
      signal: with a single sample there are no negatives and the drift is zero.
    y_pos: Target features `[C⁺, ...]` (stop-gradient).
    temperatures: Bandwidths τ.

  Returns:
    Scalar float32 mean((x̃ − stop_gradient(x̃ + V))²) over all `C·S` elements.
  """
  x = _as_matrix(x)
  y_pos = jax.lax.stop_gradient(_as_matrix(y_pos))
  x_n, ypos_n, _, _ = normalize_features(x, y_pos, x, exclude_self=True)
  x_sg = jax.lax.stop_gradient(x_n)
  v = jax.lax.stop_gradient(multi_bandwidth_drift(x_sg, ypos_n, x_sg, temperatures, exclude_self=True))
  return jnp.mean(jnp.square(x_n - jax.lax.stop_gradient(x_n + v)))


def group_batch(features: jax.Array, num_groups: int) -> jax.Array:
  """Reshapes a batch `[B, ...]` whose groups are contiguous into `[G, B/G, S]` float32.

  Args:
    features: `[B, ...]`, samples `g·C .. (g+1)·C − 1` forming group g (same class / prompt).
    num_groups: G (static); must divide B.

  Returns:
    `[G, C, S]` with S the product of the trailing dimensions.
  """
  features = jnp.asarray(features)
  b = features.shape[0]
  if num_groups < 1 or b % num_groups:
    raise ValueError(f'num_groups={num_groups} must be positive and divide the batch size {b}.')
  return features.reshape(num_groups, b // num_groups, -1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=('num_groups',))
def drift_loss(features: jax.Array, targets: jax.Array, num_groups: int,
               temperatures: Sequence[float] | jax.Array = DEFAULT_TEMPERATURES) -> jax.Array:
  """The drift loss of one feature set, `drift_loss_group` vmapped over groups and averaged.

  Args:
    features: Student features `[B, ...]`, grouped contiguously (see `group_batch`).
    targets: Target features `[B⁺, ...]`, grouped the same way (group g of the targets is the positives of group
      g of the student); stop-gradient.
    num_groups: G (static).
    temperatures: Bandwidths τ.

  Returns:
    Scalar float32 loss (mean over groups).
  """
  if jnp.shape(features)[1:] != jnp.shape(targets)[1:]:
    raise ValueError(f'student features {jnp.shape(features)} and targets {jnp.shape(targets)} must have the '
                     'same per-sample shape.')
  x = group_batch(features, num_groups)
  y = group_batch(targets, num_groups)
  temps = jnp.asarray(temperatures, jnp.float32).reshape(-1)
  losses = jax.vmap(drift_loss_group, in_axes=(0, 0, None))(x, y, temps)
  return jnp.mean(losses)


@functools.partial(jax.jit, static_argnames=('num_groups',))
def multi_layer_drift_loss(
    student_features: Sequence[jax.Array], target_features: Sequence[jax.Array], num_groups: int,
    temperatures: Sequence[float] | jax.Array = DEFAULT_TEMPERATURES) -> tuple[jax.Array, list[jax.Array]]:
  """L_drift = Σ_j Loss_j over feature sets j (e.g. encoder layers), each `[B, ...]`.

  Args:
    student_features: Per-layer student features, each `[B, ...]` (flattened per sample).
    target_features: Per-layer target features, same layers in the same order.
    num_groups: G (static), shared by all layers.
    temperatures: Bandwidths τ.

  Returns:
    `(total, per_layer)`: the scalar sum and the list of per-layer scalar losses.
  """
  if len(student_features) != len(target_features):
    raise ValueError(f'{len(student_features)} student feature sets but {len(target_features)} target sets.')
  if not student_features:
    raise ValueError('multi_layer_drift_loss needs at least one feature set.')
  per_layer = [drift_loss(x, y, num_groups, temperatures) for x, y in zip(student_features, target_features)]
  return sum(per_layer[1:], per_layer[0]), per_layer
