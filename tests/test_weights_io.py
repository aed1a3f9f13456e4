"""Tests for fpd_jax.weights_io: reading safetensors and PyTorch archives with numpy and a restricted unpickler.

Fixtures (made offline with torch 2.13 in a throwaway venv; torch is never imported here):
  * tests/fixtures/torch_state_dict.pth: `torch.save` of
      {'model': OrderedDict(f32=B, f32_t=B.t(), f32_slice=B[1:3, 2:5], f32_shared=B, f16=B.half(), bf16=B.bfloat16(),
                            i64=arange(-3, 5).reshape(2, 4), scalar=tensor(3.5), empty=zeros(0, 3),
                            param=Parameter(B[0].clone()), boolean=tensor([True, False, True])),
       'nested': {'inner': {'w': B[:, 0].clone()}}, 'epoch': 7, 'name': 'fixture',
       'list': [B[0, :2].clone(), ones(2, float64)]}
    with B = arange(24, float32).reshape(4, 6) / 8 - 1 (exact in float16 and bfloat16);
    torch_state_dict_legacy.pth: the same object saved with `_use_new_zipfile_serialization=False`.
  * tests/fixtures/torch_script_module.pt: `torch.jit.save(torch.jit.script(net))` of a module with
    block.conv (Conv2d 2->3, no bias), block.bn (BatchNorm2d), head (Linear 3->2) and a buffer `scale`;
    torch_script_module_expected.npz holds its `state_dict()` as numpy arrays.
Other archives (malicious, corrupt, big-endian) are written by hand below with raw pickle opcodes.
"""

import json
import os
import pathlib
import struct
import zipfile

import numpy as np
import pytest

from fpd_jax.errors import UserError
from fpd_jax import weights_io

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
B = np.arange(24, dtype=np.float32).reshape(4, 6) / 8 - 1


# ---- A minimal protocol-2 pickle writer, to craft archives without torch.


class Global:
  def __init__(self, module, name):
    self.module, self.name = module, name


class Call:
  """`fn(*args)` through the REDUCE opcode."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args


class PersId:
  def __init__(self, value):
    self.value = value


def _encode(v) -> bytes:
  if isinstance(v, Global):
    return b'c' + f'{v.module}\n{v.name}\n'.encode()
  if isinstance(v, Call):
    return _encode(v.fn) + _encode(tuple(v.args)) + b'R'
  if isinstance(v, PersId):
    return _encode(v.value) + b'Q'
  if v is None:
    return b'N'
  if v is True or v is False:
    return b'\x88' if v else b'\x89'
  if isinstance(v, int) and -2**31 <= v < 2**31:
    return b'J' + struct.pack('<i', v)
  if isinstance(v, int):  # LONG1: little-endian two's complement.
    raw = v.to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
    return b'\x8a' + bytes([len(raw)]) + raw
  if isinstance(v, str):
    raw = v.encode()
    return b'X' + struct.pack('<I', len(raw)) + raw
  if isinstance(v, tuple):
    return b'(' + b''.join(_encode(x) for x in v) + b't'
  if isinstance(v, dict):
    return b'}(' + b''.join(_encode(k) + _encode(x) for k, x in v.items()) + b'u'
  raise TypeError(v)


def _pickle(obj) -> bytes:
  return b'\x80\x02' + _encode(obj) + b'.'


def _tensor(storage_type, key, numel, offset, size, stride):
  storage = PersId(('storage', Global('torch', storage_type), key, 'cpu', numel))
  return Call(Global('torch._utils', '_rebuild_tensor_v2'), storage, offset, tuple(size), tuple(stride), False,
              Call(Global('collections', 'OrderedDict')))


def _write_archive(path, obj, storages=None, byteorder=None, prefix='archive'):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr(f'{prefix}/data.pkl', _pickle(obj))
    if byteorder:
      z.writestr(f'{prefix}/byteorder', byteorder)
    for key, raw in (storages or {}).items():
      z.writestr(f'{prefix}/data/{key}', raw)
  return str(path)


# ---- Real torch files.


def test_state_dict_fixture_all_dtypes_views_and_nesting():
  state = weights_io.load_state_dict(FIXTURES / 'torch_state_dict.pth')
  expected = {
      'model.f32': B, 'model.f32_t': B.T, 'model.f32_slice': B[1:3, 2:5], 'model.f32_shared': B,
      'model.f16': B.astype(np.float16), 'model.bf16': B, 'model.i64': np.arange(-3, 5).reshape(2, 4),
      'model.scalar': np.float32(3.5), 'model.empty': np.zeros((0, 3), np.float32), 'model.param': B[0],
      'model.boolean': np.array([True, False, True]), 'nested.inner.w': B[:, 0], 'list.0': B[0, :2],
      'list.1': np.ones(2)}
  assert list(state) == list(expected)  # File order; non-array leaves ('epoch', 'name') are left out.
  dtypes = {'model.f16': np.float16, 'model.i64': np.int64, 'model.boolean': np.bool_, 'list.1': np.float64}
  for name, want in expected.items():
    got = state[name]
    assert got.dtype == dtypes.get(name, np.float32), name
    assert got.shape == np.shape(want), name
    np.testing.assert_array_equal(got, want, err_msg=name)
    assert got.flags.c_contiguous and got.flags.owndata, name
  state['model.f32_slice'][0, 0] = 99.0  # Views are copies: writing one does not change another.
  assert state['model.f32_shared'][1, 2] == B[1, 2]


def test_state_dict_key_selects_a_nested_entry():
  assert list(weights_io.load_state_dict(FIXTURES / 'torch_state_dict.pth', key='nested.inner')) == ['w']
  model = weights_io.load_state_dict(FIXTURES / 'torch_state_dict.pth', key='model')
  assert 'f32' in model and 'f32_t' in model
  with pytest.raises(UserError, match=r"no entry 'teacher'.*'model'"):
    weights_io.load_state_dict(FIXTURES / 'torch_state_dict.pth', key='teacher')
  with pytest.raises(UserError, match='holds no tensor'):
    weights_io.load_state_dict(FIXTURES / 'torch_state_dict.pth', key='name')


def test_legacy_format_reads_the_same_arrays(tmp_path):
  legacy = weights_io.load_state_dict(FIXTURES / 'torch_state_dict_legacy.pth')
  current = weights_io.load_state_dict(FIXTURES / 'torch_state_dict.pth')
  assert list(legacy) == list(current)
  for name, value in current.items():
    assert legacy[name].dtype == value.dtype, name
    np.testing.assert_array_equal(legacy[name], value, err_msg=name)
  assert list(weights_io.load_state_dict(FIXTURES / 'torch_state_dict_legacy.pth', key='nested.inner')) == ['w']
  with pytest.raises(UserError, match='not a TorchScript archive'):
    weights_io.load_torchscript_arrays(FIXTURES / 'torch_state_dict_legacy.pth')
  data = (FIXTURES / 'torch_state_dict_legacy.pth').read_bytes()
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(data[:len(data) - 40])  # Storages truncated.
  with pytest.raises(UserError, match='corrupt'):
    weights_io.load_state_dict(cut)
  cut.write_bytes(data[:300])  # Pickle truncated.
  with pytest.raises(UserError, match='corrupt'):
    weights_io.load_state_dict(cut)
  evil = tmp_path / 'evil.pth'
  marker = tmp_path / 'pwned'
  evil.write_bytes(_pickle(0x1950a86a20f9469cfc6c) + _pickle(1001) + _pickle({'little_endian': True})
                   + _pickle({'w': Call(Global('os', 'system'), f'touch {marker}')}))
  with pytest.raises(UserError, match=r'refusing to load the global os\.system'):
    weights_io.load_state_dict(evil)
  assert not marker.exists()


def test_torchscript_arrays_by_module_path():
  arrays = weights_io.load_torchscript_arrays(FIXTURES / 'torch_script_module.pt')
  expected = np.load(FIXTURES / 'torch_script_module_expected.npz')
  assert sorted(arrays) == sorted(expected.files)
  for name in expected.files:
    assert arrays[name].dtype == expected[name].dtype, name
    np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)
  assert arrays['block.conv.weight'].shape == (3, 2, 3, 3)


def test_state_dict_loader_refuses_torchscript_classes():
  with pytest.raises(UserError, match=r'refusing to load the global __torch__'):
    weights_io.load_state_dict(FIXTURES / 'torch_script_module.pt')


# ---- Hand-made archives.


def test_crafted_archive_bfloat16_float16_int64_strides_offsets(tmp_path):
  bf16 = (B.view(np.uint32) >> 16).astype('<u2').tobytes()  # B is exact in bfloat16.
  obj = {'a': _tensor('BFloat16Storage', '0', 24, 0, (6, 4), (1, 6)),      # transposed
         'b': _tensor('HalfStorage', '1', 24, 7, (2, 2), (6, 2)),           # offset + step 2
         'c': _tensor('LongStorage', '2', 3, 0, (3,), (1,))}
  path = _write_archive(tmp_path / 'x.pth', obj, {'0': bf16, '1': B.astype('<f2').tobytes(),
                                                  '2': np.array([5, -6, 7], '<i8').tobytes()})
  state = weights_io.load_state_dict(path)
  np.testing.assert_array_equal(state['a'], B.T)
  assert state['a'].dtype == np.float32
  np.testing.assert_array_equal(state['b'], B.ravel()[[7, 9, 13, 15]].reshape(2, 2))
  assert state['b'].dtype == np.float16
  np.testing.assert_array_equal(state['c'], [5, -6, 7])


def test_big_endian_archive(tmp_path):
  obj = {'w': _tensor('FloatStorage', '0', 6, 0, (2, 3), (3, 1))}
  path = _write_archive(tmp_path / 'be.pth', obj, {'0': np.arange(6, dtype='>f4').tobytes()}, byteorder='big')
  state = weights_io.load_state_dict(path)
  np.testing.assert_array_equal(state['w'], np.arange(6, dtype=np.float32).reshape(2, 3))
  assert state['w'].dtype == np.float32 and state['w'].dtype.isnative


def test_malicious_global_is_refused_and_never_run(tmp_path):
  marker = tmp_path / 'pwned'
  payload = Call(Global('os', 'system'), f'touch {marker}')
  path = _write_archive(tmp_path / 'evil.pth', {'weight': payload})
  with pytest.raises(UserError, match=r'refusing to load the global os\.system'):
    weights_io.load_state_dict(path)
  with pytest.raises(UserError, match=r'refusing to load the global os\.system'):
    weights_io.load_torchscript_arrays(path)
  assert not marker.exists()


@pytest.mark.parametrize('module,name', [('builtins', 'eval'), ('subprocess', 'Popen'), ('argparse', 'Namespace'),
                                         ('numpy', 'load'), ('torch', 'load')])
def test_other_globals_are_refused(tmp_path, module, name):
  path = _write_archive(tmp_path / 'evil.pth', {'x': Call(Global(module, name), 'a')})
  with pytest.raises(UserError, match=f'global {module}.{name}'):
    weights_io.load_state_dict(path)


def test_missing_non_zip_and_corrupt_files(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    weights_io.load_state_dict(tmp_path / 'nope.pth')
  with pytest.raises(UserError, match='is not a file'):
    weights_io.load_state_dict(tmp_path)
  text = tmp_path / 'text.pth'
  text.write_text('not a checkpoint')
  with pytest.raises(UserError, match='not a PyTorch file'):
    weights_io.load_state_dict(text)
  no_pkl = tmp_path / 'nopkl.pth'
  with zipfile.ZipFile(no_pkl, 'w') as z:
    z.writestr('archive/readme.txt', 'hi')
  with pytest.raises(UserError, match='without data.pkl'):
    weights_io.load_state_dict(no_pkl)
  obj = {'w': _tensor('FloatStorage', '0', 6, 0, (2, 3), (3, 1))}
  missing = _write_archive(tmp_path / 'missing.pth', obj, {})
  with pytest.raises(UserError, match='record archive/data/0 is missing'):
    weights_io.load_state_dict(missing)
  short = _write_archive(tmp_path / 'short.pth', obj, {'0': b'\0' * 8})
  with pytest.raises(UserError, match='fewer than'):
    weights_io.load_state_dict(short)
  outside = _write_archive(tmp_path / 'outside.pth', {'w': _tensor('FloatStorage', '0', 6, 4, (2, 3), (3, 1))},
                           {'0': b'\0' * 24})
  with pytest.raises(UserError, match='outside its storage'):
    weights_io.load_state_dict(outside)
  with zipfile.ZipFile(tmp_path / 'trunc.pth', 'w') as z:
    z.writestr('archive/data.pkl', _pickle({'a': 1})[:-3])
  with pytest.raises(UserError, match='corrupt'):
    weights_io.load_state_dict(tmp_path / 'trunc.pth')
  data = (FIXTURES / 'torch_state_dict.pth').read_bytes()
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError):
    weights_io.load_state_dict(cut)
  assert os.path.exists(FIXTURES / 'torch_state_dict.pth')


# ---- safetensors and the format-by-content entry point.


def _safetensors_bytes(entries: dict) -> bytes:
  """A safetensors file of {name: (dtype name, shape, raw bytes)} written by hand (header + buffer)."""
  header, buffer = {'__metadata__': {'format': 'pt'}}, b''
  for name, (dtype, shape, raw) in entries.items():
    header[name] = {'dtype': dtype, 'shape': list(shape), 'data_offsets': [len(buffer), len(buffer) + len(raw)]}
    buffer += raw
  text = json.dumps(header).encode()
  return struct.pack('<Q', len(text)) + text + buffer


def test_safetensors_matches_the_safetensors_package(tmp_path):
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  arrays = {'w': B, 'h': B.astype(np.float16), 'i': np.arange(-3, 5, dtype=np.int64).reshape(2, 4),
            'b': np.array([True, False]), 'scalar': np.array(2.5, np.float32), 'empty': np.zeros((0, 3), np.float32)}
  path = tmp_path / 'x.safetensors'
  st_numpy.save_file(arrays, str(path))
  got = weights_io.load_safetensors(path)
  assert sorted(got) == sorted(arrays)
  for name, value in arrays.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert weights_io.is_safetensors(str(path))
  np.testing.assert_array_equal(weights_io.read_weights(path)['w'], B)  # By content, whatever the name.
  renamed = tmp_path / 'x.bin'
  renamed.write_bytes(path.read_bytes())
  np.testing.assert_array_equal(weights_io.read_weights(renamed)['h'], B.astype(np.float16))


def test_safetensors_bfloat16_is_widened_exactly(tmp_path):
  words = (B.view(np.uint32) >> 16).astype('<u2')  # B is exact in bfloat16.
  path = tmp_path / 'bf16.safetensors'
  path.write_bytes(_safetensors_bytes({'w': ('BF16', B.shape, words.tobytes())}))
  got = weights_io.load_safetensors(path)['w']
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, B)


@pytest.mark.parametrize('case, match', [
    ('truncated', r'do not hold .* truncated'),
    ('dtype', r'dtype F8_E4M3, which this reader does not take'),
    ('header', r'header is not JSON'),
])
def test_safetensors_errors_are_one_line(tmp_path, case, match):
  data = _safetensors_bytes({'w': ('F32', B.shape, B.tobytes())})
  if case == 'truncated':
    data = data[:-8]
  elif case == 'dtype':
    data = _safetensors_bytes({'w': ('F8_E4M3', (4,), b'\0' * 4)})
  else:
    data = struct.pack('<Q', 5) + b'{abc}' + b'\0' * 8
  path = tmp_path / 'bad.safetensors'
  path.write_bytes(data)
  with pytest.raises(UserError, match=match) as info:
    weights_io.read_weights(path) if case != 'header' else weights_io.load_safetensors(path)
  assert '\n' not in str(info.value)


def test_read_weights_dispatches_torch_formats():
  state = weights_io.read_weights(FIXTURES / 'torch_state_dict.pth', key='model')
  np.testing.assert_array_equal(state['f32'], B)
  arrays = weights_io.read_weights(FIXTURES / 'torch_script_module.pt')
  assert arrays['block.conv.weight'].shape == (3, 2, 3, 3)
  with pytest.raises(UserError, match='TorchScript archive: drop the key'):
    weights_io.read_weights(FIXTURES / 'torch_script_module.pt', key='model')
