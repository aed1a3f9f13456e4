"""Stage `tokenizer`: trains the VQGAN tokenizer (reconstruction + codebook/commitment losses).

Codebook health: usage counts are accumulated in the train state and every `dead_code_restart_every` steps the
codes no image used since the last restart are re-seeded from random encoder outputs of the current batch.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fpd_jax import batching
from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import sampling
from fpd_jax import sharding
from fpd_jax.data import mnist
from fpd_jax.errors import UserError
from fpd_jax.models import build
from fpd_jax.models import vqgan
from fpd_jax.train import loop
from fpd_jax.train import optim


def validate(config) -> None:
  """Checks `config.tokenizer`'s tiling (a named fix on a bad value)."""
  tiles, grid = config.tokenizer.get('tiles_per_side', 1), build.token_grid(config)
  if tiles < 1 or grid % tiles:
    raise UserError(f'config.tokenizer.tiles_per_side={tiles} must be >= 1 and divide the {grid}x{grid} token grid '
                    f'(config.data.image_size={config.data.image_size}); 1 encodes whole images.')


def make_train_step(model, tx, cfg):
  """The pure tokenizer train step `(state, batch, rng) -> (state, metrics)`; `loop.run` jits it."""
  restart_every = cfg.dead_code_restart_every

  def step(state, batch, rng):
    images = batch['image']

    def loss_fn(params):
      recon, aux = model.apply({'params': params}, images)
      recon_mse = jnp.mean((recon - images) ** 2)
      return recon_mse + aux['quantizer_loss'], (recon_mse, aux)

    grads, (recon_mse, aux) = jax.grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    counts = state['usage'] + jnp.bincount(aux['indices'].reshape(-1), length=cfg.codebook_size)
    if restart_every:
      restart = (state['step'] + 1) % restart_every == 0
      raw = aux['raw'].reshape(-1, aux['raw'].shape[-1])
      new_codebook = vqgan.restart_dead_codes(params['quantizer']['codebook'], counts, raw, rng)
      params['quantizer']['codebook'] = jnp.where(restart, new_codebook, params['quantizer']['codebook'])
      dead = jnp.where(restart, jnp.sum(counts == 0), 0)
      counts = jnp.where(restart, jnp.zeros_like(counts), counts)
    else:
      dead = jnp.sum(counts == 0)
    metrics = {'loss': recon_mse + aux['quantizer_loss'], 'recon_mse': recon_mse,
               'quantizer_loss': aux['quantizer_loss'],
               'batch_codebook_usage': vqgan.codebook_usage(aux['indices'], cfg.codebook_size),
               'restarted_codes': dead.astype(jnp.float32)}
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, 'usage': counts}, metrics

  return step


def init_params(config, rng):
  """Initial tokenizer parameters for the configured image size."""
  size, channels = config.data.image_size, config.data.channels
  return build.tokenizer(config).init(rng, jnp.zeros((1, size, size, channels)))['params']


def run(config, workdir: str) -> dict:
  """Trains the tokenizer on the train split and exports its parameters to `DIR/tokenizer/export`."""
  stage_dir = os.path.join(workdir, 'tokenizer')
  cfg = config.tokenizer
  model = build.tokenizer(config)
  batches = mnist.batch_dataset(mnist.data_source(os.path.join(workdir, 'data'), 'train'), cfg.batch_size,
                                seed=config.seed + 1, **sharding.host_shard(cfg.batch_size))
  tx = optim.make_optimizer(cfg, config.train.grad_clip)
  init_rng, rng = jax.random.split(jax.random.key(config.seed + 1))

  def init_state():
    params = init_params(config, init_rng)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'usage': jnp.zeros((cfg.codebook_size,), jnp.int32)}

  state = loop.run('tokenizer', stage_dir, loop.loop_config(config, cfg), init_state,
                   make_train_step(model, tx, cfg), lambda s: batches[s], rng,
                   partitioner=sharding.Partitioner.from_config(config))
  ckpt_lib.export(os.path.join(stage_dir, 'export'), state['params'], {'config': config.to_dict()})
  return {'steps': cfg.num_steps}


def load(config, workdir: str):
  """(model, params) of the tokenizer; `config.tokenizer.pretrained` says where the parameters come from.

  - '' (default): the tokenizer stage's export `DIR/tokenizer/export` of `workdir`.
  - a directory written by `python -m fpd_jax.tools.import_maskgit` (its `--out`, or the `tokenizer/` inside it):
    the imported released MaskGIT VQGAN.
  - 'random': a random init with the configured shapes, from `config.seed` as the tokenizer stage draws it (smoke
    tests and benchmarks at the real size).
  """
  return build.tokenizer(config), ckpt_lib.load_stage_params(
      config.tokenizer.get('pretrained', ''), workdir, 'tokenizer', lambda rng: init_params(config, rng),
      config.seed + 1, 'python -m fpd_jax.tools.import_maskgit --tokenizer=tokenizer_imagenet256_checkpoint')


@functools.partial(jax.jit, static_argnums=(0,))
def _encode(model, params, images):
  return model.apply({'params': params}, images, method='encode_to_indices')


def encode_images(model, params, images: np.ndarray) -> np.ndarray:
  """Token grids `[N, h, w]` of uint8 or [0,1] float images `[N, H, W, C]`, in batches."""
  return batching.map_batches(lambda x: _encode(model, params, x), images)


def encode_and_reconstruct(model, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(token grids `[N, h, w]`, images `[N, H, W, C]` decoded from them, clipped to [0, 1] as samples are): what the
  tokenizer keeps of real images, so the best any generator over its tokens can draw."""
  grid = encode_images(model, params, images)
  decode = jax.jit(lambda p, t: sampling.decode_tokens(model, p, t, grid.shape[1]))  # One program, not op by op.
  return grid, batching.map_batches(lambda t: decode(params, t), grid.reshape(len(grid), -1))


def reconstruct_images(model, params, images: np.ndarray) -> np.ndarray:
  """Images `[N, H, W, C]` encoded to tokens and decoded back (`encode_and_reconstruct`'s images)."""
  return encode_and_reconstruct(model, params, images)[1]


def tokenize_split(config, workdir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Flattened tokens `[N, h*w]` int32 and labels of a data split, with the trained tokenizer."""
  model, params = load(config, workdir)
  arrays = mnist.load_arrays(os.path.join(workdir, 'data'), split)
  tokens = encode_images(model, params, arrays['image'])
  return tokens.reshape(len(tokens), -1).astype(np.int32), arrays['label']
