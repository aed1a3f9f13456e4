"""Orbax checkpoints: per-stage training state (CheckpointManager) and standalone parameter exports.

Layout of a stage directory `DIR/<stage>/`:
  checkpoints/<step>/   training state {'step', 'params', 'opt_state', ...} (keep-N, resumable)
  export/               the stage's final parameters (what later stages and `fpd_jax.sample` load)
  export_meta.json      what is needed to rebuild the model of the export (e.g. its config)
  done.json             written last: the stage finished (steps, seconds)

Before any restore the stored tree is compared with the one the current config builds, and a mismatch names the
first differing parameter instead of failing inside Orbax or XLA.
"""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fpd_jax.errors import UserError


def _name(path) -> str:
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def tree_shapes(tree) -> dict[str, tuple]:
  """`{'a/b/c': shape}` for every array leaf of a pytree (arrays, ShapeDtypeStructs or Orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {_name(p): tuple(v.shape) for p, v in leaves if hasattr(v, 'shape')}


def first_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
  """A sentence naming the first parameter whose name or shape differs, or None when the trees agree."""
  for name in sorted(set(expected) | set(found)):
    if name not in found:
      return f'parameter {name} {expected[name]} is missing from the checkpoint'
    if name not in expected:
      return f'the checkpoint has parameter {name} {found[name]} that this model does not have'
    if expected[name] != found[name]:
      return f'parameter {name} has shape {found[name]} in the checkpoint but {expected[name]} in this model'
  return None


def check_compatible(expected_tree, found_tree, where: str) -> None:
  """Raises UserError naming the first mismatch between a model's tree and a stored one."""
  problem = first_mismatch(tree_shapes(expected_tree), tree_shapes(found_tree))
  if problem:
    raise UserError(f'{where} does not match the configured model: {problem}. Use the config it was written '
                    'with, or another workdir.')


def abstract(tree):
  """ShapeDtypeStructs (with shardings, when the arrays have them) of a pytree, for restoring."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None))
  return jax.tree.map(one, tree)


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the `keep` newest steps. Saves are atomic (temporary dir, then rename)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def restore_latest(mngr: ocp.CheckpointManager, target) -> tuple[int | None, Any]:
  """Restores the newest step into the structure of `target`; returns (step, state) or (None, target)."""
  step = mngr.latest_step()
  if step is None:
    return None, target
  where = f'checkpoint {mngr.directory}/{step}'
  try:
    stored = mngr.item_metadata(step)
  except Exception as e:  # Orbax raises several types for unreadable metadata.
    raise UserError(f'{where} is unreadable ({type(e).__name__}: {e}); delete it to restart the stage.') from e
  check_compatible(target, getattr(stored, 'tree', stored), where)
  state = mngr.restore(step, args=ocp.args.StandardRestore(abstract(target)))
  return step, state


def export(directory: str, params, meta: dict | None = None) -> None:
  """Writes parameters as a standalone Orbax checkpoint (atomically), plus `meta` as JSON beside it."""
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory, params, force=True)
  ckptr.wait_until_finished()
  if meta is not None:
    with open(directory + '_meta.json', 'w') as f:
      json.dump(meta, f, indent=1, default=_json_default)


def load_export(directory: str, target, what: str):
  """Restores an `export()`ed parameter tree into the structure (and shardings) of `target`."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise UserError(f'{what} not found at {directory}; run the stage that writes it first.')
  ckptr = ocp.StandardCheckpointer()
  try:
    stored = ckptr.metadata(directory)
  except Exception as e:
    raise UserError(f'{what} at {directory} is unreadable ({type(e).__name__}); rerun the stage that '
                    'writes it.') from e
  tree = getattr(stored, 'item_metadata', stored)
  check_compatible(target, getattr(tree, 'tree', tree), f'{what} at {directory}')
  return ckptr.restore(directory, abstract(target))


def load_export_meta(directory: str, what: str = 'the export') -> dict:
  """The JSON written beside an export."""
  path = os.path.abspath(directory) + '_meta.json'
  if not os.path.isdir(directory):
    raise UserError(f'{what} not found at {os.path.abspath(directory)}; run the stage that writes it first.')
  if not os.path.exists(path):
    raise UserError(f'{path} is missing; the export at {directory} is incomplete. Rerun the stage.')
  with open(path) as f:
    return json.load(f)


def _json_default(x):
  if hasattr(x, 'to_dict'):
    return x.to_dict()
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f'not JSON serialisable: {type(x)}')
