r"""Imports official DINOv2 / DINOv3 ViT weights as an Orbax export for `fpd_jax.models.dino`.

  python -m fpd_jax.tools.import_dino --weights=dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth \
      --layout=dinov3_vitb16 --out=checkpoints/dinov3_vitb16
  python -m fpd_jax.tools.import_dino --weights=dinov2_vitb14_pretrain.pth --layout=dinov2_vitb14 --out=DIR

`--weights` is the official backbone state dict: a `torch.save` `.pth` file as released by facebookresearch/dinov2
and facebookresearch/dinov3 (read with numpy only, `fpd_jax.weights_io`; no torch needed), or a
`.safetensors` file holding the same official names. `--layout` names the architecture (`dino.LAYOUTS`).

Every official name is mapped explicitly to our parameter path (`TABLE`, `BLOCK_TABLE`): conv kernels OIHW ->
HWIO, linear weights [out, in] -> [in, out], LayerNorm weight -> scale. Every name and shape is checked against the
model the layout builds; the first missing key, unexpected key or wrong shape is named, and nothing is written.
Entries the model legitimately does not need are listed in `unused_keys`: `mask_token` (masked-token training
only), DINOv3's `rope_embed.periods` (recomputed from the layout; the file's values must agree) and the
`bias_mask` buffers of DINOv3's qkv (folded into the bias: the key bias is zero after import; the mask must be the
reference's [1, 0, 1]). DINOv2 training checkpoints' chunked names (`blocks.<chunk>.<i>.`) are accepted.

The output directory holds `export/` (Orbax, `checkpoint.load_export`) and `export_meta.json` (layout,
architecture, source file and sha256); point the feature encoder config's `weights` at it. The directory is
written under a temporary name and renamed into place when complete; an existing one is replaced only with
`--overwrite`.
"""

import dataclasses
import os
import re

from absl import flags
import flax
import jax
import numpy as np

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import cli
from fpd_jax import weights_io
from fpd_jax.errors import UserError
from fpd_jax.models import dino

# (official name, our path, transform). Transforms: None (as is), 'linear' ([out, in] -> [in, out]), 'conv'
# (OIHW -> HWIO). Entries whose path the layout's model does not have (e.g. pos_embed in DINOv3) are skipped.
TABLE = (
    ('patch_embed.proj.weight', 'patch_embed/proj/kernel', 'conv'),
    ('patch_embed.proj.bias', 'patch_embed/proj/bias', None),
    ('cls_token', 'cls_token', None),
    ('pos_embed', 'pos_embed', None),  # DINOv2.
    ('register_tokens', 'register_tokens', None),  # DINOv2 with registers.
    ('storage_tokens', 'storage_tokens', None),  # DINOv3.
    ('norm.weight', 'norm/scale', None),
    ('norm.bias', 'norm/bias', None),
)
# The same for block i: 'blocks.{i}.' + official suffix -> 'blocks_{i}/' + our suffix.
BLOCK_TABLE = (
    ('norm1.weight', 'norm1/scale', None),
    ('norm1.bias', 'norm1/bias', None),
    ('attn.qkv.weight', 'attn/qkv/kernel', 'linear'),
    ('attn.qkv.bias', 'attn/qkv/bias', None),  # Times `attn.qkv.bias_mask` where the file has it.
    ('attn.proj.weight', 'attn/proj/kernel', 'linear'),
    ('attn.proj.bias', 'attn/proj/bias', None),
    ('ls1.gamma', 'ls1/gamma', None),
    ('norm2.weight', 'norm2/scale', None),
    ('norm2.bias', 'norm2/bias', None),
    ('mlp.fc1.weight', 'mlp/fc1/kernel', 'linear'),
    ('mlp.fc1.bias', 'mlp/fc1/bias', None),
    ('mlp.fc2.weight', 'mlp/fc2/kernel', 'linear'),
    ('mlp.fc2.bias', 'mlp/fc2/bias', None),
    ('ls2.gamma', 'ls2/gamma', None),
)
_CHUNKED = re.compile(r'^blocks\.\d+\.(\d+)\.')  # DINOv2 `block_chunks > 0`: blocks.<chunk>.<i>.<rest>.


def name_table(config: dino.ViTConfig) -> list[tuple[str, str, str | None]]:
  """(official name, our path, transform) for every parameter of the model of `config`."""
  rows = list(TABLE)
  for i in range(config.depth):
    rows += [(f'blocks.{i}.{a}', f'blocks_{i}/{b}', t) for a, b, t in BLOCK_TABLE]
  expected = expected_shapes(config)
  return [row for row in rows if row[1] in expected]


def expected_shapes(config: dino.ViTConfig) -> dict[str, tuple[int, ...]]:
  """{our path: shape} of the model of `config`."""
  return ckpt_lib.tree_shapes(dino.abstract_params(config))


def unused_keys(config: dino.ViTConfig) -> list[str]:
  """Official entries the model does not take as parameters (each is checked or documented in the module doc)."""
  keys = ['mask_token']
  if config.family == 'dinov3':
    keys.append('rope_embed.periods')
    if config.mask_k_bias:
      keys += [f'blocks.{i}.attn.qkv.bias_mask' for i in range(config.depth)]
  return keys


def convert(state: dict[str, np.ndarray], config: dino.ViTConfig, source: str) -> dict:
  """Maps an official state dict onto our parameter tree, checking every name and shape.

  Args:
    state: {official name: array} (e.g. from `weights_io.read_weights`).
    config: the architecture the weights must fit.
    source: the file, for messages.

  Returns:
    Nested dicts of float32 numpy arrays with the structure of `dino.abstract_params(config)`.

  Raises:
    UserError: naming the first missing key, unexpected key, wrong shape, non-numeric entry, a `bias_mask` that is
      not the reference's, or `rope_embed.periods` that disagree with the layout.
  """
  fix = 'pass the official state dict of this layout, or the --layout the file was trained with'
  renamed = {}
  for key, value in state.items():
    key = _CHUNKED.sub(r'blocks.\1.', key)
    if key in renamed:
      raise UserError(f'{source}: entry {key} appears twice (chunked and plain block names); pass a plain state '
                      'dict.')
    renamed[key] = value
  state = renamed
  expected = expected_shapes(config)
  table = name_table(config)
  allowed = set(unused_keys(config))
  known = {name for name, _, _ in table} | allowed
  for key in state:  # File order: the first key the layout does not know.
    if key not in known:
      raise UserError(f'{source} has entry {key} {tuple(np.shape(state[key]))}, which a {_describe(config)} does '
                      f'not have (unused key); {fix}.')
  for name, path, transform in table:
    if name not in state:
      raise UserError(f'{source} lacks entry {name} (missing key; expected shape '
                      f'{weights_io.torch_shape(expected[path], transform)} for a {_describe(config)}); {fix}.')
  flat = {}
  for name, path, transform in table:
    value = state[name]
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
      raise UserError(f'{source}: entry {name} is {getattr(value, "dtype", type(value).__name__)}, not a float '
                      f'array; {fix}.')
    want = weights_io.torch_shape(expected[path], transform)
    if tuple(value.shape) != want:
      raise UserError(f'{source}: entry {name} has shape {tuple(value.shape)} but a {_describe(config)} needs '
                      f'{want} (wrong shape); {fix}.')
    flat[path] = np.ascontiguousarray(weights_io.to_flax(value.astype(np.float32), transform))
  if config.family == 'dinov3':
    _check_rope_periods(state, config, source)
    if config.mask_k_bias:
      for i in range(config.depth):
        _fold_bias_mask(state, flat, config, i, source)
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _describe(config: dino.ViTConfig) -> str:
  return (f'{config.family} ViT (dim {config.dim}, depth {config.depth}, heads {config.heads}, patch '
          f'{config.patch_size}, {config.num_registers} registers)')


def _check_rope_periods(state: dict, config: dino.ViTConfig, source: str) -> None:
  """The file's `rope_embed.periods` (if any) must be the layout's (we recompute them)."""
  if 'rope_embed.periods' not in state:
    return
  ours = dino.rope_periods(config)
  theirs = np.asarray(state['rope_embed.periods'], np.float32)
  if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=1e-5, atol=0):
    raise UserError(f'{source}: rope_embed.periods {theirs.ravel()[:4].tolist()}... differ from the layout\'s '
                    f'{ours[:4].tolist()}... (RoPE base/periods); pass the --layout the file was trained with.')


def _fold_bias_mask(state: dict, flat: dict, config: dino.ViTConfig, i: int, source: str) -> None:
  """Multiplies block i's qkv bias by the file's `bias_mask` (as `LinearKMaskedBias` does at every call)."""
  key = f'blocks.{i}.attn.qkv.bias_mask'
  if key not in state:
    return  # Our model drops the key bias anyway (mask_k_bias).
  mask = np.asarray(state[key], np.float32)
  d = config.dim
  reference = np.concatenate([np.ones(d), np.zeros(d), np.ones(d)]).astype(np.float32)
  if mask.shape != (3 * d,) or not np.array_equal(mask, reference):
    raise UserError(f'{source}: {key} is not the reference mask [1]*{d} + [0]*{d} + [1]*{d} (it has NaN, or '
                    'other values); pass a released DINOv3 state dict.')
  path = f'blocks_{i}/attn/qkv/bias'
  flat[path] = flat[path] * mask


# ---------------------------------------------------------------------------------------------------------------
# Reading files.


def read_weights(path: str, key: str | None = None) -> dict[str, np.ndarray]:
  """{name: array} of an official state dict file (`.safetensors` or `torch.save`; `weights_io.read_weights`).

  Args:
    path: the file.
    key: for a `.pth` holding a nested checkpoint, the entry to take (e.g. 'model').
  """
  if not os.path.isfile(path):
    raise UserError(f'{path} not found; pass the official DINO state dict file (.pth or .safetensors) as --weights.')
  return weights_io.read_weights(path, key=key)


# ---------------------------------------------------------------------------------------------------------------
# Writing.


def import_weights(weights: str, layout_name: str, out: str, overwrite: bool = False, key: str | None = None,
                   overrides: dict | None = None, log=print) -> dict:
  """Reads, checks and writes one official state dict as `OUT/export` + `OUT/export_meta.json`.

  Args:
    weights: the official `.pth` or `.safetensors` file.
    layout_name: a name of `dino.LAYOUTS`.
    out: output directory (must not exist unless `overwrite`).
    overwrite: replace an existing `out`.
    key: nested-checkpoint entry (`.pth` only).
    overrides: ViTConfig fields to change from the layout (sizes of a non-released model).
    log: where progress lines go.

  Returns:
    The meta written beside the export.

  Raises:
    UserError: a bad file, a name or shape that does not fit (named), or an output that exists or cannot be
      written. Nothing is left under `out` then.
  """
  config = dino.vit_config({'layout': layout_name, **(overrides or {})})
  out = os.path.abspath(out)
  ckpt_lib.check_export_destinations([out], overwrite)  # Before reading.
  state = read_weights(weights, key)
  params = convert(state, config, weights)
  sha256, size = weights_io.sha256(weights)
  count = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  meta = {'layout': layout_name, 'vit': dataclasses.asdict(config),
          'source': {'file': os.path.abspath(weights), 'sha256': sha256, 'bytes': size},
          'num_params': count, 'unused_entries': sorted(k for k in unused_keys(config) if k in state),
          'imported_by': 'fpd_jax.tools.import_dino'}
  log(f'{os.path.basename(weights)} fits {layout_name}: {len(jax.tree.leaves(params))} arrays, {count:,} '
      f'parameters (sha256 {sha256[:16]}...)')
  # OUT/export + OUT/export_meta.json, where `dino.load_params` reads them (`dino.EXPORT`); all or nothing.
  ckpt_lib.write_exports({out: (params, meta)}, overwrite)
  log(f'wrote {out} (export/ + export_meta.json); set the feature encoder weights to it')
  return meta


# ---------------------------------------------------------------------------------------------------------------
# Command line. Flags are defined only when this module runs as a program, so importing it has no side effects.


def _define_flags() -> dict[str, flags.FlagHolder]:
  return {
      'weights': flags.DEFINE_string('weights', None, 'Official state dict: .pth (torch.save) or .safetensors.'),
      'layout': flags.DEFINE_enum('layout', None, list(dino.LAYOUTS), 'Architecture of the weights.'),
      'out': flags.DEFINE_string('out', None, 'Output directory (export/ + export_meta.json).'),
      'key': flags.DEFINE_string('key', None, "Entry of a nested .pth checkpoint to import (e.g. 'model')."),
      'overwrite': flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.'),
  }


def _run(v: dict) -> None:
  import_weights(v['weights'], v['layout'], v['out'], v['overwrite'], v['key'])


if __name__ == '__main__':
  cli.run_tool(_define_flags, _run, ['weights', 'layout', 'out'])
