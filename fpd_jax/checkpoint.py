"""Orbax checkpoints: per-stage training state (CheckpointManager) and standalone parameter exports.

Layout of a stage directory `DIR/<stage>/`:
  checkpoints/<step>/   training state {'step', 'params', 'opt_state', ...} (keep-N, resumable)
  export/               the stage's final parameters (what later stages and `fpd_jax.sample` load)
  export_meta.json      what is needed to rebuild the model of the export (e.g. its config)
  done.json             written last: the stage finished (steps, seconds)

Before any restore the stored tree is compared with the one the current config builds, and a mismatch names the
first differing parameter instead of failing inside Orbax or XLA.

Saves are atomic (a temporary directory renamed once complete) and never delete the last good step before the new
one is committed. A restore that fails on damaged files (a truncated or corrupt step) warns and falls back to the
next older step; see `restore_latest`.
"""

import json
import logging
import os
import re
import shutil
import sys
import time
from typing import Any
import uuid

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fpd_jax import sharding
from fpd_jax.errors import UserError

# Every save creates its temporary directory before it returns (Orbax's default creates it in the background,
# tracked by process-wide signals that saves overlapping in threads, e.g. stages run side by side, confuse: a save
# then fails with FileExistsError on `*.orbax-checkpoint-tmp` or waits out a 300 s timeout). Writes stay
# asynchronous.
_ASYNC_OPTIONS = ocp.AsyncOptions(create_directories_asynchronously=False)


def tree_shapes(tree) -> dict[str, tuple]:
  """`{'a/b/c': shape}` for every array leaf of a pytree (arrays, ShapeDtypeStructs or Orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {sharding.path_name(p): tuple(v.shape) for p, v in leaves if hasattr(v, 'shape')}


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
  """A CheckpointManager keeping the `keep` newest steps.

  Saves are atomic: Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only once every file
  (and `commit_success.txt`) is written, so a step directory without that suffix is complete. Steps beyond
  `keep` are deleted only after the new step is committed, so an interrupted save never costs the last good
  checkpoint. Temporary directories left by a killed save are removed when the next manager opens.

  Args:
    directory: the stage's `checkpoints/` directory (created if missing).
    keep: how many of the newest steps to keep (`max_to_keep`).

  Returns:
    The manager (asynchronous saves: call `wait_until_finished()` before relying on the last one).
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True, async_options=_ASYNC_OPTIONS)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def _reason(e: Exception) -> str:
  """`Type: message` on one line: TensorStore's spec dropped, the middle of a long message elided."""
  lines = str(e).strip().splitlines()
  text = re.sub(r'\s*\[tensorstore_spec=.*$', '', lines[0]) if lines else ''
  text = f'{type(e).__name__}: {text}' if text else type(e).__name__
  return text if len(text) <= 240 else f'{text[:80]} ... {text[-150:]}'


class _AbandonedReadsFilter(logging.Filter):
  """Silences the late reports of the reads a failed restore abandoned (see `_silence_abandoned_reads`)."""

  def __init__(self):
    super().__init__()
    self.directories: set[str] = set()
    self.previous_hook = sys.unraisablehook

  def unraisablehook(self, unraisable) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      self.previous_hook(unraisable)

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and 'Task exception was never retrieved' in record.getMessage()
                and any(d in str(error) for d in self.directories))


_abandoned_reads_filter: _AbandonedReadsFilter | None = None


def _silence_abandoned_reads(directory: str) -> None:
  """Keeps a damaged checkpoint's warning on one line.

  When a restore fails, Orbax closes its event loop while TensorStore still completes the other reads; each then
  reports, from a background thread and possibly much later, `RuntimeError: Event loop is closed` (through
  `sys.unraisablehook`) or `Task exception was never retrieved` (asyncio's logger) with a traceback. From the
  first failed restore on, this process drops exactly those reports (the latter only when they name `directory`).
  """
  global _abandoned_reads_filter
  if _abandoned_reads_filter is None:
    _abandoned_reads_filter = _AbandonedReadsFilter()
    sys.unraisablehook = _abandoned_reads_filter.unraisablehook
    logging.getLogger('asyncio').addFilter(_abandoned_reads_filter)
  _abandoned_reads_filter.directories.add(str(directory))


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Renames an unrestorable step to `<step>.corrupt-<time>` (Orbax ignores it; nothing is deleted) and returns
  the new path. The step's number is free again for the resumed run's save."""
  path = os.path.join(mngr.directory, str(step))
  dest = stamped = f'{path}.corrupt-{time.strftime("%Y%m%d-%H%M%S")}'
  n = 1
  while os.path.exists(dest):
    dest, n = f'{stamped}-{n}', n + 1
  os.rename(path, dest)
  return dest


def _restore_step(mngr: ocp.CheckpointManager, step: int, target):
  """Restores one step into the structure of `target`.

  Returns:
    The state.

  Raises:
    UserError: the stored tree differs from `target` (the config's fault, not the checkpoint's).
    Exception: anything else Orbax or TensorStore raise for unreadable or damaged files.
  """
  where = f'checkpoint {mngr.directory}/{step}'
  stored = mngr.item_metadata(step)
  stored = getattr(stored, 'tree', stored)
  if not stored:  # A missing `_METADATA` file reads as None rather than raising.
    raise ValueError('its tree metadata is missing')
  check_compatible(target, stored, where)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract(target)))


def restore_latest(mngr: ocp.CheckpointManager, target) -> tuple[int | None, Any]:
  """Restores the newest step that reads back, into the structure of `target`.

  Steps are tried newest to oldest. A step whose files are unreadable, truncated or corrupt gets a one-line
  warning on stderr naming it and the reason, and the next older step is tried. Once one restores, the bad
  newer steps are renamed to `<step>.corrupt-<time>` (kept for inspection; the resumed run saves those step
  numbers again).

  Args:
    mngr: the stage's manager.
    target: the initial state; its structure, shapes and shardings are those restored.

  Returns:
    `(step, state)`, or `(None, target)` when there is no checkpoint.

  Raises:
    UserError: a checkpoint's parameters differ from the configured model's (never treated as corruption), or no
      checkpoint restores (nothing is renamed then).
  """
  failed = []
  steps = sorted(mngr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      state = _restore_step(mngr, step, target)
    except UserError:
      raise
    except Exception as e:  # Orbax and TensorStore raise many types (ValueError, KeyError, JSONDecodeError...).
      _silence_abandoned_reads(mngr.directory)
      failed.append((step, _reason(e)))
      then = f'trying step {steps[i + 1]}' if i + 1 < len(steps) else 'no older checkpoint'
      print(f'warning: checkpoint {mngr.directory}/{step} does not restore ({failed[-1][1]}); {then}.',
            file=sys.stderr, flush=True)
      continue
    if failed:
      moved = [_set_aside(mngr, s) for s, _ in failed] if jax.process_index() == 0 else ['(on host 0)']
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('fpd_jax:set_aside_corrupt_checkpoints')
      mngr.reload()
      print(f'warning: resuming from step {step}; moved the unrestorable checkpoint(s) to {", ".join(moved)}.',
            file=sys.stderr, flush=True)
    return step, state
  if failed:
    raise UserError(f'no checkpoint in {mngr.directory} restores ('
                    f'{"; ".join(f"step {s}: {r}" for s, r in failed)}); delete that directory to restart the '
                    'stage from scratch.')
  return None, target


def export(directory: str, params, meta: dict | None = None) -> None:
  """Writes parameters as a standalone Orbax checkpoint (atomically), plus `meta` as JSON beside it."""
  directory = os.path.abspath(directory)
  if jax.process_count() > 1:  # Arrays on this process's devices only (e.g. loaded frozen parameters, whole on
    # every process) are not global arrays, which Orbax needs on several processes: they are saved from the host.
    params = jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x,
                          params)
  ckptr = ocp.StandardCheckpointer(async_options=_ASYNC_OPTIONS)
  ckptr.save(directory, params, force=True)
  ckptr.wait_until_finished()
  if meta is not None and jax.process_index() == 0:  # Orbax writes collectively; the JSON only once.
    with open(directory + '_meta.json', 'w') as f:
      json.dump(meta, f, indent=1, default=_json_default)


def load_export(directory: str, target, what: str):
  """Restores an `export()`ed parameter tree into the structure (and shardings) of `target`; leaves of `target`
  without a sharding are placed on this process's first device."""
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
  # Leaves without a target sharding go to this process's first device, never to the sharding the export was
  # written with: evaluation and sampling then run without cross-device collectives, whatever mesh trained it.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  placed = jax.tree.map(lambda x: x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                          sharding=local),
                        abstract(target))
  return ckptr.restore(directory, placed)


def load_stage_params(pretrained: str, workdir: str, stage: str, init, seed: int, import_hint: str):
  """Parameters of a model that a stage trains or that is imported, as `config.<stage>.pretrained` says.

  Args:
    pretrained: '' (the stage's export `workdir/<stage>/export`), a directory written by an import tool (its
      `--out`, holding `<stage>/export`, or that `<stage>/` itself), or 'random' (a random init, for smoke tests and
      benchmarks at the real size).
    workdir: the run's workdir.
    stage: 'teacher' or 'tokenizer'.
    init: `rng -> params` of the configured model (abstractly evaluated for the restore target).
    seed: the seed of the random init (the one the stage's training would draw).
    import_hint: the import command to name when `pretrained` holds nothing.
  """
  if pretrained == 'random':
    return jax.jit(init)(jax.random.split(jax.random.key(seed))[0])
  target = jax.eval_shape(init, jax.random.key(0))
  if not pretrained:
    return load_export(os.path.join(workdir, stage, 'export'), target, f'the {stage}')
  if '://' in pretrained:
    raise UserError(f'config.{stage}.pretrained={pretrained}: remote paths are not read directly; copy the '
                    'import to a local or mounted (e.g. gcsfuse) directory and point to it.')
  candidates = [os.path.join(pretrained, stage, 'export'), os.path.join(pretrained, 'export')]
  found = [c for c in candidates if os.path.isdir(c)]
  if not found:
    raise UserError(f'config.{stage}.pretrained={pretrained} holds no imported {stage} ({candidates[0]} and '
                    f'{candidates[1]} are missing); run {import_hint} --out={pretrained} first.')
  return load_export(found[0], target, f'the pretrained {stage} (config.{stage}.pretrained)')


def load_export_meta(directory: str, what: str = 'the export') -> dict:
  """The JSON written beside an export."""
  path = os.path.abspath(directory) + '_meta.json'
  if not os.path.isdir(directory):
    raise UserError(f'{what} not found at {os.path.abspath(directory)}; run the stage that writes it first.')
  if not os.path.exists(path):
    raise UserError(f'{path} is missing; the export at {directory} is incomplete. Rerun the stage.')
  with open(path) as f:
    return json.load(f)


def check_export_destinations(destinations, overwrite: bool) -> None:
  """Raises UserError if `write_exports` could not place a directory at each of `destinations`.

  A destination must not exist unless `overwrite` (then it must be a directory), and its parent, where it exists,
  must be a directory. Messages name the `--overwrite` and `--out` flags of the import tools that write exports.
  """
  for dest in destinations:
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    if os.path.lexists(parent) and not os.path.isdir(parent):
      raise UserError(f'{parent} is not a directory, so {dest} cannot be written; pass another --out.')
    if os.path.lexists(dest) and not overwrite:
      raise UserError(f'{dest} already exists; pass --overwrite to replace it, or another --out.')
    if os.path.lexists(dest) and not os.path.isdir(dest):
      raise UserError(f'{dest} exists and is not a directory; remove it or pass another --out.')


def _topmost_missing(path: str) -> str | None:
  """The outermost directory of `path` (itself or an ancestor) that does not exist yet, or None."""
  top = None
  while not os.path.lexists(path):
    top, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return top


def _remove_empty(path: str, top: str | None) -> None:
  """Removes `path` and its ancestors up to `top` (the directories a failed write created) while they are empty."""
  if top is None:
    return
  while os.path.isdir(path) and not os.listdir(path):
    os.rmdir(path)
    if path == top:
      break
    path = os.path.dirname(path)


def _rename_into_place(staged: dict[str, str]) -> None:
  """Renames every staged directory to its destination (`{destination: staged}`, all or none), then deletes the
  directories they replace.

  Raises:
    OSError: a rename failed; every destination and staged directory is then back as it was.
  """
  aside, placed = {}, []
  try:
    for dest in staged:
      if os.path.lexists(dest):
        aside[dest] = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.old-{uuid.uuid4().hex[:12]}')
        os.rename(dest, aside[dest])
    for dest, tmp in staged.items():
      os.rename(tmp, dest)
      placed.append(dest)
  except OSError:
    for dest in placed:  # Put everything back as it was.
      os.rename(dest, staged[dest])
    for dest, old in aside.items():
      os.rename(old, dest)
    raise
  for old in aside.values():
    shutil.rmtree(old, ignore_errors=True)


def write_exports(parts: dict[str, tuple[Any, dict | None]], overwrite: bool = False, log=None) -> None:
  """Writes parameter trees as `DEST/export/` + `DEST/export_meta.json` (see `export`), all or nothing.

  Each part is written into a temporary directory `.<name>.tmp-<id>` beside its destination (created with the
  umask's permissions, so the result is as readable as a normal directory, unlike `tempfile.mkdtemp`'s 0700).
  Once every part is complete and the destinations are checked again, they are all renamed into place; an existing
  destination (only with `overwrite`) is moved aside first and deleted after. If a write or a rename fails, no part
  is placed, replaced destinations are restored, and the temporary directories and any parent directories this call
  created are removed. The renames need a local (POSIX) file system.

  Args:
    parts: `{destination directory: (params, meta)}`; params are numpy or JAX arrays, meta goes to the JSON.
    overwrite: replace existing destinations.
    log: called with a progress line before each part is written, or None.

  Raises:
    UserError: a destination exists (without `overwrite`), is not a directory, or cannot be written (the message
      names the path and the fix). Nothing is left under the destinations' parents then.
    ValueError: two destinations are the same directory or one lies inside another.
  """
  dests = {os.path.abspath(d): v for d, v in parts.items()}
  if len(dests) != len(parts) or any(a != b and os.path.commonpath([a, b]) == a for a in dests for b in dests):
    raise ValueError(f'the destinations {sorted(dests)} must be distinct and not nested')
  check_export_destinations(dests, overwrite)
  parents = sorted({os.path.dirname(d) for d in dests})
  created = {parent: _topmost_missing(parent) for parent in parents}
  where = next(iter(dests)) if len(dests) == 1 else f'under {os.path.commonpath(list(dests))}'
  staged = {}
  try:
    for dest, (params, meta) in dests.items():
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      tmp = os.path.join(os.path.dirname(dest), f'.{os.path.basename(dest)}.tmp-{uuid.uuid4().hex[:12]}')
      staged[dest] = tmp
      os.makedirs(tmp)  # Honours the umask (mkdtemp's 0700 would stay on the renamed directory).
      if log is not None:
        log(f'{os.path.basename(dest)}: writing the Orbax export...')
      arrays = jax.tree.map(jnp.asarray, params)
      export(os.path.join(tmp, 'export'), arrays, meta)
      del arrays  # Free the device copy before the next part.
    check_export_destinations(staged, overwrite)  # Still free after the (possibly long) write?
    _rename_into_place(staged)
    staged = {}
  except OSError as e:
    raise UserError(f'cannot write {where} ({e.strerror or type(e).__name__}); free space or pass another '
                    '--out.') from e
  finally:
    for tmp in staged.values():
      shutil.rmtree(tmp, ignore_errors=True)
    for parent in reversed(parents):  # Deepest first, so a shared created ancestor empties last.
      _remove_empty(parent, created[parent])


def _json_default(x):
  if hasattr(x, 'to_dict'):
    return x.to_dict()
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f'not JSON serialisable: {type(x)}')
