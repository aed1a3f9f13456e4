"""Builds the project's models from a config: one place that knows how sizes relate."""

import jax.numpy as jnp

from fpd_jax import conditioning as cond_lib
from fpd_jax.errors import UserError
from fpd_jax.models import maskgit
from fpd_jax.models import vqgan


def token_grid(config) -> int:
  """Side h of the h x h token grid: image size over the tokenizer's downsampling factor."""
  factor = 2 ** (len(config.tokenizer.channel_multipliers) - 1)
  if config.data.image_size % factor:
    raise UserError(f'image size {config.data.image_size} is not divisible by the tokenizer downsampling factor '
                    f'{factor} (2^(len(tokenizer.channel_multipliers)-1)); change one of them.')
  return config.data.image_size // factor


def tokenizer(config, dtype=jnp.float32) -> vqgan.VQGAN:
  """The VQGAN tokenizer of `config.tokenizer`, for `config.data.channels` image channels."""
  return vqgan.from_config(config.tokenizer, output_channels=config.data.channels, dtype=dtype)


def conditioner(config) -> cond_lib.ClassConditioner:
  """The class conditioner (label + K), with a null class for classifier-free guidance unless the config says
  `teacher.null_class = False` (the released ImageNet MaskGIT has none)."""
  return cond_lib.ClassConditioner(codebook_size=config.tokenizer.codebook_size,
                                   num_classes=config.data.num_classes,
                                   with_null_class=config.teacher.get('null_class', True))


def teacher(config, section: str = 'teacher', dtype=jnp.float32) -> maskgit.MaskGITModel:
  """The conditioned MaskGIT transformer of `config.<section>` over the configured token grid."""
  return maskgit.from_config(config[section], conditioner(config), config.tokenizer.codebook_size,
                             num_tokens=token_grid(config) ** 2, dtype=dtype)
