"""Shared fixtures, and one persistent XLA compilation cache for the whole test session.

Many tests compile the same tiny programs again (each pipeline, CLI subprocess and stage builds fresh jitted
functions); with one cache directory shared by the session and its subprocesses (`JAX_COMPILATION_CACHE_DIR`), each
program is compiled once per session. `FPD_JAX_TEST_CACHE=DIR` keeps the cache between sessions. The pytest-xdist
workers (`-n 2` in pytest.ini) share it too: this file runs in the controller first, and the workers it starts
inherit `JAX_COMPILATION_CACHE_DIR` (the controller deletes the directory at exit).

The tests' programs are tiny: XLA:CPU spends far more time compiling them than running them, so the session (and
its subprocesses, through `XLA_FLAGS`) compiles at LLVM optimisation level 0, about half the compile time. An
`XLA_FLAGS` that already sets `--xla_backend_optimization_level` is kept as it is.
"""

import atexit
import os
import shutil
import tempfile

_OPT_LEVEL = '--xla_backend_optimization_level'
if _OPT_LEVEL not in os.environ.get('XLA_FLAGS', ''):  # Before JAX's backend starts (it reads XLA_FLAGS once).
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_OPT_LEVEL}=0".strip()

import jax
import jax.numpy as jnp
import pytest

from fpd_jax.models import build
from fpd_jax.train import distill
from fpd_jax.train import eval_net
from fpd_jax.train import tokenizer as tokenizer_stage


def _share_compilation_cache() -> None:
  # xdist workers and a pytest subprocess of a test (tests/multidevice) inherit their parent's cache.
  cache = os.environ.get('FPD_JAX_TEST_CACHE') or os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if not cache:
    cache = tempfile.mkdtemp(prefix='fpd_jax_test_cache_')
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = cache  # Subprocesses (CLI runs) read it when they import jax.
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


_share_compilation_cache()


def _tiny_fpd(config):
  """(models, random frozen params {'teacher', 'tokenizer', 'features'}, step-0 labels) of a demo config's FPD."""
  models = distill.build_models(config, distill.feature_encoder_of(config))
  grid = build.token_grid(config)
  keys = jax.random.split(jax.random.key(0), 3)
  net = eval_net.build_net(config.feature_net, config.data.num_classes)

  @jax.jit  # One compiled program instead of every initializer op compiled on its own.
  def init(keys):
    return {
        'teacher': models.teacher.init(keys[0], grid * grid, jnp.zeros((1,), jnp.int32))['params'],
        'tokenizer': tokenizer_stage.init_params(config, keys[1]),
        'features': eval_net.init_params(net, config, keys[2]),
    }

  frozen = init(keys)
  labels = jnp.asarray(distill.condition_batch(0, 0, config.data.num_classes, config.distill))
  return models, frozen, labels


@pytest.fixture(scope='session')
def tiny_fpd():
  """Builds the FPD models, random frozen parameters and labels of a (tiny) demo config: `tiny_fpd(config)`."""
  return _tiny_fpd
