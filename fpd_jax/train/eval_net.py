"""Stage `eval_net`: the evaluation classifier, trained on the train split only, with its own seed.

Its penultimate features define every quality metric of the report (FD, precision/recall), and its predictions
the class accuracy of conditional samples. Nothing that is trained or distilled ever sees it.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fpd_jax import batching
from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import sharding
from fpd_jax.data import mnist
from fpd_jax.models import classifier
from fpd_jax.train import loop
from fpd_jax.train import optim


def build_net(cfg, num_classes: int) -> classifier.ConvNet:
  """A classifier from a config section with `widths` and `feature_dim` (also used by feature encoders)."""
  return classifier.ConvNet(widths=tuple(cfg.widths), feature_dim=cfg.feature_dim, num_classes=num_classes,
                            convs_per_stage=cfg.get('convs_per_stage', 2))


def make_train_step(net, tx):
  """The pure classifier train step (random-shift augmentation, cross-entropy); `loop.run` jits it."""

  def step(state, batch, rng):
    images = classifier.augment(rng, batch['image'])

    def loss_fn(params):
      logits = net.apply({'params': params}, images, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == batch['label'])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, {'loss': loss, 'accuracy': acc}

  return step


def init_params(net, config, rng):
  size, channels = config.data.image_size, config.data.channels
  return net.init(rng, jnp.zeros((1, size, size, channels)))['params']


def train_classifier(name: str, section, config, workdir: str, batch_fn=None, test: dict | None = None) -> dict:
  """Trains a classifier stage (`eval_net`, or a feature encoder) and exports it with its test accuracy.

  `batch_fn` (step -> this host's batch {'image', 'label'}) and `test` ({'image', 'label'}) replace the MNIST train
  batches and test split (the text pipeline trains cell classifiers on composed cells).
  """
  stage_dir = os.path.join(workdir, name)
  data_dir = os.path.join(workdir, 'data')
  net = build_net(section, config.data.num_classes)
  if batch_fn is None:
    batches = mnist.batch_dataset(mnist.data_source(data_dir, 'train'), section.batch_size, seed=section.seed,
                                  **sharding.host_shard(section.batch_size))
    batch_fn = lambda s: batches[s]
  tx = optim.make_optimizer(section, config.train.grad_clip)
  init_rng, rng = jax.random.split(jax.random.key(section.seed))

  def init_state():
    params = init_params(net, config, init_rng)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  state = loop.run(name, stage_dir, loop.loop_config(config, section), init_state, make_train_step(net, tx),
                   batch_fn, rng, partitioner=sharding.Partitioner.from_config(config))
  test = mnist.load_arrays(data_dir, 'test') if test is None else test
  accuracy = float(np.mean(predict(net, state['params'], test['image']) == test['label']))
  print(f'[{name}] test accuracy {accuracy:.4f}')
  ckpt_lib.export(os.path.join(stage_dir, 'export'), state['params'],
                  {'config': config.to_dict(), 'test_accuracy': accuracy})
  return {'steps': section.num_steps, 'test_accuracy': accuracy}


def run(config, workdir: str) -> dict:
  """Stage `eval_net`."""
  return train_classifier('eval_net', config.eval_net, config, workdir)


def run_feature_net(config, workdir: str) -> dict:
  """Stage `feature_net`: the drift loss's feature encoder (another architecture and seed than eval_net)."""
  return train_classifier('feature_net', config.feature_net, config, workdir)


def load(name: str, section, config, workdir: str):
  """(net, params, meta) of a trained classifier stage."""
  net = build_net(section, config.data.num_classes)
  target = jax.eval_shape(lambda: init_params(net, config, jax.random.key(0)))
  path = os.path.join(workdir, name, 'export')
  params = ckpt_lib.load_export(path, target, f'the {name} network')
  return net, params, ckpt_lib.load_export_meta(path)


@functools.partial(jax.jit, static_argnums=(0,))
def _logits_and_features(net, params, images):
  return net.apply({'params': params}, images, return_features=True)


def logits_and_features(net, params, images: np.ndarray):
  """(logits, features) as numpy for uint8 or [0,1] float images, in batches."""
  return batching.map_batches(lambda x: _logits_and_features(net, params, x), images)


def predict(net, params, images: np.ndarray) -> np.ndarray:
  return np.argmax(logits_and_features(net, params, images)[0], axis=-1)
