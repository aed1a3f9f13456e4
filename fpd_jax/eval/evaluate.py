"""Stage `evaluate`: samples every model, measures it, writes the report.

`config.evaluate.metric` picks the measure:

- 'eval_net' (the demo): `num_samples` real digits are held out (`split_real`: all test digits first, then train
  digits, class-balanced like the generated sets) and scored as the `real_data` row; the other real digits are
  the reference of every row. Per model row (`report.json` `models.<name>`): FD of `num_samples` class-balanced
  samples against the reference in the feature space of the project's evaluation network, class accuracy on the
  samples, and k-NN precision/recall against a fixed random subset of the reference of the same size as the
  scored set. `real_data` is measured the same way, so it is the floor a perfect generator would reach. Also the
  tokenizer's reconstruction quality (its `recon_fd`: the held-out digits' reconstructions against the
  reference) and codebook usage, and the evaluation network's test accuracy.
- 'inception' (ImageNet): FID against `evaluate.reference` (an ADM `.npz` or `tfds:NAME/SPLIT`) and the Inception
  Score when the Inception weights hold a classifier (`fpd_jax/eval/fid.py`).

Both add images/s of sampling + decoding measured after compilation, and the time of every stage. Sample grids go
to `DIR/samples/<name>.png`.

Sampling is spread over every device of every process (the batch axes of `config.mesh`): each evaluation batch of
labels is split over the devices (`Partitioner.rows`, padded to a multiple of the device count, the padding
dropped), the model parameters are replicated, and the images are gathered to every process
(`Partitioner.gather`), which then computes the same metrics; only process 0 writes files. Batch `i` uses the key
`fold_in(rng, i)` and each image's randomness is a function of that key and its row (see `fpd_jax/sharding.py`), so
the numbers do not depend on the number of devices or processes.
"""

import os
from typing import Callable

import jax
import numpy as np

from fpd_jax import batching
from fpd_jax import sampling
from fpd_jax import sharding
from fpd_jax.data import mnist
from fpd_jax.errors import UserError
from fpd_jax.eval import fid
from fpd_jax.eval import grid as grid_lib
from fpd_jax.eval import metrics
from fpd_jax.eval import report
from fpd_jax.models import build
from fpd_jax.train import distill as distill_stage
from fpd_jax.train import eval_net as eval_net_stage
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage

# Image generator: (labels [B] int32, rng) -> images [B, H, W, C] in [0, 1] (jax arrays; the labels arrive split
# over the partitioner's batch axes, the parameters it closes over are on the same mesh).
Generator = Callable[[jax.Array, jax.Array], jax.Array]


def measure(config, image_metrics, generate: Generator, rng: jax.Array,
            partitioner: sharding.Partitioner) -> tuple[dict, np.ndarray, np.ndarray]:
  """Samples `evaluate.num_samples` class-balanced images and scores them with `image_metrics(images, labels)`.

  Returns:
    (metrics row with images_per_sec, images, labels).
  """
  cfg = config.evaluate
  labels = (np.arange(cfg.num_samples) % config.data.num_classes).astype(np.int32)
  images, images_per_sec = batching.sample_on_mesh(partitioner, generate, labels, cfg.batch_size, rng, timed=True)
  row = image_metrics(images, labels)
  row['images_per_sec'] = images_per_sec
  return row, images, labels


def split_real(train: dict, test: dict, num_samples: int, num_classes: int, seed: int) -> tuple[dict, dict]:
  """(held_out, reference): `num_samples` real digits to score as `real_data`, and the disjoint rest.

  Class `c` gets as many held-out digits as the generated sets have (`#{i < num_samples: i % num_classes == c}`):
  its test digits first, then train digits, each in a fixed random order (`seed`). Deterministic.

  Raises:
    UserError: `num_samples` leaves a reference smaller than the held-out set (precision/recall need both).
  """
  real = {k: np.concatenate([test[k], train[k]]) for k in ('image', 'label')}  # Test digits first.
  if 2 * num_samples > len(real['label']):
    raise UserError(f'config.evaluate.num_samples={num_samples} leaves too few of the {len(real["label"])} real '
                    f'digits as a disjoint reference; use at most {len(real["label"]) // 2}.')
  rng = np.random.default_rng(seed)
  wanted = np.bincount(np.arange(num_samples) % num_classes, minlength=num_classes)
  held = []
  for c in range(num_classes):
    rows = np.flatnonzero(real['label'] == c)
    is_test = rows < len(test['label'])
    order = np.concatenate([rng.permutation(rows[is_test]), rng.permutation(rows[~is_test])])
    if len(order) < wanted[c]:
      raise UserError(f'only {len(order)} real digits of class {c}; lower config.evaluate.num_samples.')
    held.append(order[:wanted[c]])
  held = np.sort(np.concatenate(held))
  rest = np.setdiff1d(np.arange(len(real['label'])), held)
  return {k: v[held] for k, v in real.items()}, {k: v[rest] for k, v in real.items()}


class Evaluator:
  """Holds the evaluation network, the held-out real digits and the reference statistics; measures generators."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.net, self.params, meta = eval_net_stage.load('eval_net', config.eval_net, config, workdir)
    self.test_accuracy = meta['test_accuracy']
    data_dir = os.path.join(workdir, 'data')
    self.test = mnist.load_arrays(data_dir, 'test')
    self.held_out, self.reference = split_real(mnist.load_arrays(data_dir, 'train'), self.test,
                                               config.evaluate.num_samples, config.data.num_classes, config.seed)
    self.reference_feats = self.features(self.reference['image'])[1]
    self.reference_stats = metrics.gaussian_stats(self.reference_feats)
    self._subset_seed = config.seed + 101

  def features(self, images):
    return eval_net_stage.logits_and_features(self.net, self.params, images)

  def image_metrics(self, images, labels=None) -> dict:
    """FD against the reference, precision/recall against a fixed random reference subset of `len(images)` digits
    (equal counts), and class accuracy when labels are given."""
    logits, feats = self.features(images)
    mu, sigma = metrics.gaussian_stats(feats)
    subset = np.random.default_rng(self._subset_seed).choice(len(self.reference_feats), len(feats), replace=False)
    precision, recall = metrics.precision_recall(self.reference_feats[np.sort(subset)], feats,
                                                 k=self.config.evaluate.knn_k)
    out = {'fd': float(metrics.frechet_distance_from_stats(mu, sigma, *self.reference_stats)),
           'precision': float(precision), 'recall': float(recall), 'num_samples': int(len(images))}
    if labels is not None:
      out['accuracy'] = float(metrics.class_accuracy(logits, labels))
    return out

  def measure(self, generate: Generator, rng: jax.Array,
              partitioner: sharding.Partitioner) -> tuple[dict, np.ndarray, np.ndarray]:
    """Samples `evaluate.num_samples` class-balanced images; returns (metrics row, images, labels)."""
    return measure(self.config, self.image_metrics, generate, rng, partitioner)


class InceptionEvaluator:
  """FID (and IS, when the weights hold a classifier) against the configured reference statistics."""

  def __init__(self, config, partitioner: sharding.Partitioner):
    cfg = config.evaluate
    self.config = config
    self.inception = fid.InceptionMetrics(weights=cfg.get('inception_weights', ''),
                                          classifier=cfg.get('inception_classifier', ''), partitioner=partitioner)
    self.reference = fid.reference_stats(cfg.reference, self.inception, resolution=config.data.image_size,
                                         limit=cfg.get('reference_limit', 0),
                                         tfds_data_dir=config.data.get('tfds_data_dir') or None)

  def image_metrics(self, images, labels=None) -> dict:
    del labels  # FID/IS are unconditional.
    acts = self.inception.activations(images, desc='inception')
    mu, sigma = metrics.gaussian_stats(acts['pool'])
    row = {'fid': float(metrics.frechet_distance_from_stats(mu, sigma, self.reference['mu'],
                                                            self.reference['sigma'])),
           'num_samples': int(len(images))}
    if 'logits' in acts and len(images) >= fid.IS_SPLITS:
      row['inception_score'], row['inception_score_std'] = fid.inception_score(acts['logits'])
    return row

  def measure(self, generate: Generator, rng: jax.Array,
              partitioner: sharding.Partitioner) -> tuple[dict, np.ndarray, np.ndarray]:
    return measure(self.config, self.image_metrics, generate, rng, partitioner)


def tokenizer_metrics(evaluator: Evaluator, config, workdir: str) -> dict:
  """Reconstruction MSE on the test split, FD of the held-out digits' reconstructions against the reference (the
  tokenizer's floor: compare with `real_data`), and codebook usage over the test and held-out digits."""
  model, params = tokenizer_stage.load(config, workdir)
  test = evaluator.test['image']
  test_ids, test_recon = tokenizer_stage.encode_and_reconstruct(model, params, test)
  ids, recon = tokenizer_stage.encode_and_reconstruct(model, params, evaluator.held_out['image'])
  used = np.unique(np.concatenate([np.ravel(test_ids), np.ravel(ids)]))
  return {'recon_mse': float(np.mean((test_recon - batching.as_float_images(test)) ** 2)),
          'recon_fd': evaluator.image_metrics(recon)['fd'],
          'codebook_usage': float(len(used) / config.tokenizer.codebook_size)}


def teacher_generators(config, workdir: str,
                       partitioner: sharding.Partitioner) -> dict[str, tuple[int, Generator]]:
  """`teacher_<T>step` -> (T, generator) for each configured step count (parameters replicated on the mesh)."""
  teacher, teacher_params = teacher_stage.load(config, workdir)
  tokenizer, tokenizer_params = tokenizer_stage.load(config, workdir)
  teacher_params, tokenizer_params = partitioner.replicate((teacher_params, tokenizer_params))
  grid = build.token_grid(config)
  sample = sampling.teacher_image_sampler(teacher, tokenizer, grid, config)  # One program for every step count.
  out = {}
  for steps in config.evaluate.teacher_steps:
    out[f'teacher_{steps}step'] = (steps, lambda labels, rng, steps=steps: sample(
        teacher_params, tokenizer_params, labels, rng, steps))
  return out


METRICS = ('eval_net', 'inception')


def sample_grid(config, images, labels) -> np.ndarray:
  """One row per class of `evaluate.grid_classes` (default: classes 0, 1, ...), `grid_per_class` columns."""
  classes = list(config.evaluate.get('grid_classes', ())) or list(range(config.data.num_classes))
  keep = np.isin(labels, classes)
  remap = {c: i for i, c in enumerate(classes)}
  return grid_lib.class_grid(images[keep], np.array([remap[int(c)] for c in labels[keep]]), len(classes),
                             config.evaluate.grid_per_class)


def run(config, workdir: str, extra_generators: dict | None = None) -> dict:
  """Evaluates all models, writes `report.json`, `report.md` and `samples/*.png`; returns the report."""
  metric = config.evaluate.get('metric', 'eval_net')
  if metric not in METRICS:
    raise UserError(f'config.evaluate.metric={metric!r}; choose one of {METRICS}.')
  rng = jax.random.key(config.seed + 100)
  partitioner = sharding.Partitioner.from_config(config)
  os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
  if metric == 'inception':
    evaluator = InceptionEvaluator(config, partitioner)
  else:
    evaluator = Evaluator(config, workdir)
    grid_lib.save_png(os.path.join(workdir, 'samples', 'real.png'),
                      grid_lib.class_grid(evaluator.held_out['image'], evaluator.held_out['label'],
                                          config.data.num_classes, config.evaluate.grid_per_class))
  generators = teacher_generators(config, workdir, partitioner)
  if 'distill' in config.stages:
    generators['student_1step'] = (1, distill_stage.student_generator(os.path.join(workdir, 'distill', 'export'),
                                                                      partitioner))
  generators.update(extra_generators or {})
  models = {}
  for name, (steps, generate) in generators.items():
    row, images, labels = evaluator.measure(generate, rng, partitioner)
    row['steps'] = steps
    models[name] = row
    grid_lib.save_png(os.path.join(workdir, 'samples', f'{name}.png'), sample_grid(config, images, labels))
    print(f'[evaluate] {name}: ' + ', '.join(f'{k}={v:.4g}' for k, v in row.items()))
  result = {'models': models}
  if metric == 'inception':
    result['reference'] = {'source': evaluator.reference['source'], 'num_images': evaluator.reference['num_images']}
  else:
    result.update(eval_net={'test_accuracy': evaluator.test_accuracy},
                  tokenizer=tokenizer_metrics(evaluator, config, workdir),
                  real_data=evaluator.image_metrics(evaluator.held_out['image'], evaluator.held_out['label']),
                  reference={'source': f'{config.data.name} real digits not in real_data',
                             'num_images': int(len(evaluator.reference['label']))})
  report.write(workdir, result)
  return result
