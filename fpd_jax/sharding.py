"""Device mesh and partitioning from the config (DESIGN.md §4): one place that decides where arrays live.

`config.mesh` names the sizes of two mesh axes, `data` and `fsdp` (-1 = all remaining devices), and a list of
partition rules: regular expressions on parameter paths (e.g. `TransformerLayer_3/Mlp_0/intermediate_output/
kernel`, optimizer states and EMA copies included: their paths end with the parameter's path) mapped to a
`PartitionSpec`. The first rule whose pattern matches (`re.search`) wins; a dimension whose size the mesh axis does
not divide stays replicated (e.g. a vocabulary of 2025 over 4 devices). The batch is split over both axes: `fsdp`
is data parallelism whose parameters (and optimizer state) are sharded too.

    partitioner = sharding.Partitioner.from_config(config)
    state = partitioner.init(init_state)                     # created already sharded: jit(out_shardings=...)
    step = partitioner.jit_step(train_step, state)          # in/out shardings + donated state
    state, metrics = step(state, partitioner.batch(batch), rng)

With several processes (`config.distributed`), each host reads its slice of the batch (`host_shard`, `host_rows`) and
`batch()` assembles the global array from the per-host pieces.

Sampling and evaluation (`rows`, `gather`): every process holds the whole (small) batch of labels; `rows()` splits it
over the batch axes, padded to a multiple of `data_parallel` by repeating its last row, and `gather()` brings the
result back to every process as numpy, where the caller drops the padding. A sample's randomness depends only on the
batch key and its row: JAX's partitionable threefry (`jax_threefry_partitionable`, on by default) draws each
element's bits from its index in the global array, whatever the sharding, and rows appended at the end leave the
bits of the others unchanged. So a sharded evaluation gives the same samples as one device for the same seed.
"""

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.experimental import multihost_utils
import numpy as np

from fpd_jax import batching
from fpd_jax.errors import UserError

AXES = ('data', 'fsdp')
BATCH_AXES = AXES  # The batch is split over every axis.


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of the `AXES` for `num_devices`, resolving one -1 to the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in AXES]
  if sizes.count(-1) > 1:
    raise UserError(f'config.mesh: at most one axis may be -1 (got {dict(zip(AXES, sizes))}).')
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f'config.mesh axis sizes must be positive or -1 (got {dict(zip(AXES, sizes))}).')
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % fixed:
      raise UserError(f'config.mesh {dict(zip(AXES, sizes))}: {num_devices} devices are not divisible by {fixed}; '
                      'change the mesh sizes.')
    sizes[sizes.index(-1)] = num_devices // fixed
  if int(np.prod(sizes)) != num_devices:
    raise UserError(f'config.mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices but '
                    f'{num_devices} are available; set the sizes so that their product is {num_devices} '
                    '(or one of them to -1).')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The `(data, fsdp)` mesh over `devices` (default: all), compiler-chosen (Auto) axes."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def path_name(path) -> str:
  """'a/b/c' of a pytree key path (dict keys, attributes, sequence indices)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def spec_for(name: str, shape: tuple[int, ...], rules, mesh: Mesh) -> P:
  """The PartitionSpec of the first rule matching `name`, with undividable dimensions replicated."""
  for pattern, spec in rules:
    if re.search(pattern, name):
      break
  else:
    return P()
  out = []
  for dim, axis in zip(shape, tuple(spec)):  # A spec shorter than the shape leaves the rest replicated.
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out.append(axis if axes and dim % size == 0 else None)
  return P(*out)


def tree_shardings(tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the partition rules."""
  def one(path, leaf):
    return NamedSharding(mesh, spec_for(path_name(path), tuple(np.shape(leaf)), rules, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


def host_shard(batch_size: int) -> dict[str, int]:
  """`{shard_index, shard_count}` of this host's rows of a global batch, for the data pipeline's arguments."""
  if batch_size % jax.process_count():
    raise UserError(f'batch size {batch_size} is not divisible by the {jax.process_count()} hosts; use a multiple.')
  return {'shard_index': jax.process_index(), 'shard_count': jax.process_count()}


def host_rows(global_batch, index: int | None = None, count: int | None = None):
  """Host `index`'s rows `[index * B/count, (index + 1) * B/count)` of a batch every host computed whole (e.g. the
  labels of a distillation step, the record indices of a data batch); default: this process of all."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count

  def one(x):
    n = len(x) // count
    return x[index * n:(index + 1) * n]
  return jax.tree.map(one, global_batch)


def _from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array with `sharding` from a value every process holds whole (each places its own shards)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


@dataclasses.dataclass
class Partitioner:
  """Places states and batches on a mesh and jits steps with explicit shardings.

  Attributes:
    mesh: the device mesh.
    rules: ((regex, spec), ...) partition rules for parameters and states.
  """
  mesh: Mesh
  rules: tuple = ()

  @classmethod
  def from_config(cls, config, devices=None) -> 'Partitioner':
    """From `config.mesh` (sizes and rules); without a mesh section: all devices on the data axis."""
    mesh_cfg = config.get('mesh') or {'data': -1, 'fsdp': 1, 'rules': ()}
    rules = tuple((str(p), tuple(s) if s is not None else ()) for p, s in mesh_cfg.get('rules', ()))
    for pattern, _ in rules:
      try:
        re.compile(pattern)
      except re.error as e:
        raise UserError(f'config.mesh.rules: bad regular expression {pattern!r} ({e}).') from e
    return cls(make_mesh(mesh_cfg, devices), rules)

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(BATCH_AXES))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def data_parallel(self) -> int:
    """Number of batch shards (the product of all axes)."""
    return int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))

  def shardings(self, tree):
    """Shardings of a state or parameter tree by the rules."""
    return tree_shardings(tree, self.mesh, self.rules)

  def abstract(self, tree):
    """ShapeDtypeStructs of `tree` carrying its rule shardings (to lower or compile without arrays)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree,
                        self.shardings(tree))

  def init(self, init_fn: Callable[[], Any]):
    """Runs `init_fn` jitted with out_shardings: parameters are created where they live."""
    shardings = self.shardings(jax.eval_shape(init_fn))
    return jax.jit(init_fn, out_shardings=shardings)()

  def put(self, tree):
    """Places an existing (host or device) tree onto its rule shardings, e.g. frozen parameters.

    With several processes the tree must be whole on every process (as loaded parameters are): each process places
    its own shards from its host copy (a device_put of a process-local array onto devices of other processes would
    be a cross-host transfer, which the CPU backend refuses).
    """
    shardings = self.shardings(tree)
    if jax.process_count() == 1:
      return jax.device_put(tree, shardings)
    return jax.tree.map(_from_host, jax.device_get(tree), shardings)

  def batch(self, batch):
    """This host's rows of a global batch -> global arrays split over the batch axes."""
    sharding = self.batch_sharding
    if jax.process_count() == 1:
      return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)

  def replicate(self, tree):
    """A tree every process holds whole (host or single-device arrays) -> copies on every device of the mesh."""
    return jax.tree.map(lambda x: _from_host(x, self.replicated), jax.device_get(tree))

  def rows(self, batch) -> tuple[Any, int]:
    """A batch every process holds whole -> (global arrays split over the batch axes, its number of rows).

    The rows are padded to a multiple of `data_parallel` by repeating the last one; drop them after `gather`.
    """
    n = len(jax.tree.leaves(batch)[0])
    return jax.tree.map(lambda x: _from_host(batching.pad_rows(x, self.data_parallel), self.batch_sharding),
                        batch), n

  def gather(self, tree):
    """Global arrays (any sharding) -> numpy arrays of their whole value on every process."""
    return multihost_utils.process_allgather(tree, tiled=True)

  def jit_step(self, step_fn: Callable, state, *frozen):
    """`step_fn(state, *frozen, batch, rng) -> (state, metrics)` jitted with shardings; `state` is donated.

    Args:
      step_fn: the pure train step.
      state: an example state (arrays or ShapeDtypeStructs) giving the tree structure.
      *frozen: example frozen trees (not trained, e.g. teacher parameters) passed between state and batch.
    """
    state_sh = self.shardings(state)
    frozen_sh = tuple(self.shardings(f) for f in frozen)
    return jax.jit(step_fn, in_shardings=(state_sh, *frozen_sh, self.batch_sharding, self.replicated),
                   out_shardings=(state_sh, self.replicated), donate_argnums=(0,))
