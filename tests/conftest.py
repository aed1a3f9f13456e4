"""Shared fixtures."""

import jax
import jax.numpy as jnp
import pytest

from fpd_jax.models import build
from fpd_jax.train import distill
from fpd_jax.train import eval_net
from fpd_jax.train import tokenizer as tokenizer_stage


def _tiny_fpd(config):
  """(models, random frozen params {'teacher', 'tokenizer', 'features'}, step-0 labels) of a demo config's FPD."""
  models = distill.build_models(config, distill.feature_encoder_of(config))
  grid = build.token_grid(config)
  keys = jax.random.split(jax.random.key(0), 3)
  net = eval_net.build_net(config.feature_net, config.data.num_classes)
  frozen = {
      'teacher': models.teacher.init(keys[0], grid * grid, jnp.zeros((1,), jnp.int32))['params'],
      'tokenizer': tokenizer_stage.init_params(config, keys[1]),
      'features': eval_net.init_params(net, config, keys[2]),
  }
  labels = jnp.asarray(distill.condition_batch(0, 0, config.data.num_classes, config.distill))
  return models, frozen, labels


@pytest.fixture(scope='session')
def tiny_fpd():
  """Builds the FPD models, random frozen parameters and labels of a (tiny) demo config: `tiny_fpd(config)`."""
  return _tiny_fpd
