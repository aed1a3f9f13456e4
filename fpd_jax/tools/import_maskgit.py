r"""Imports the released MaskGIT checkpoints (google-research/maskgit) as Orbax exports of this project.

  python -m fpd_jax.tools.import_maskgit \
      --transformer=maskgit_imagenet256_checkpoint --tokenizer=tokenizer_imagenet256_checkpoint \
      --out=checkpoints/maskgit_imagenet256 [--config=configs/imagenet.py] [--overwrite]

Each file may be given alone. A file is a flax msgpack of `{'params': ...}` (DESIGN.md §4); every parameter name,
shape and dtype (float32) is checked against the model the config builds (`build.teacher` / `build.tokenizer`),
and the first difference is named; nothing is converted. The output mirrors a stage directory of a workdir:

  OUT/teacher/export/            the transformer's parameters (Orbax, `checkpoint.load_export`)
  OUT/teacher/export_meta.json   the config, the source file, its size and sha256
  OUT/tokenizer/export/ ...      the same for the VQGAN tokenizer

so set `config.teacher.pretrained` / `config.tokenizer.pretrained` to OUT (or to OUT/teacher, OUT/tokenizer) and
`fpd_jax.train.teacher.load` / `fpd_jax.train.tokenizer.load` (distillation, evaluation, sampling) return these
parameters instead of the trained stages' exports. Nothing partial is ever written: both parts are
written into temporary directories beside their destinations and renamed into place only once both are complete,
and an existing OUT/teacher or OUT/tokenizer is replaced only with `--overwrite`.
"""

import hashlib
import os
from typing import Any

from absl import flags
import flax
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from tqdm import tqdm

from fpd_jax import checkpoint as ckpt_lib
from fpd_jax import cli
from fpd_jax.errors import UserError
from fpd_jax.models import build

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(_REPO, 'configs', 'imagenet.py')

# Stage directory -> (flag naming its file, what it is, the released file's name).
PARTS = {
    'teacher': ('--transformer', 'the MaskGIT transformer', 'maskgit_imagenet256_checkpoint'),
    'tokenizer': ('--tokenizer', 'the VQGAN tokenizer', 'tokenizer_imagenet256_checkpoint'),
}
_CHUNK = 1 << 24  # Bytes per read (16 MiB).


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking.


def read_released(path: str, what: str) -> tuple[dict[str, Any], str, int]:
  """Reads a released-format checkpoint: a flax msgpack of `{'params': ...}`.

  Args:
    path: The file.
    what: What it should hold, for messages (e.g. 'the MaskGIT transformer').

  Returns:
    `(params, sha256 hex digest, size in bytes)`; params are nested dicts of numpy arrays.

  Raises:
    UserError: The file is missing, unreadable, not a flax msgpack, or holds no 'params' dict.
  """
  if not os.path.isfile(path):
    raise UserError(f'{path} not found; pass the released checkpoint file of {what} (a flax msgpack).')
  size = os.path.getsize(path)
  data = bytearray(size)
  digest = hashlib.sha256()
  pos = 0
  try:
    with open(path, 'rb') as f, memoryview(data) as view, tqdm(
        total=size, unit='B', unit_scale=True, desc=f'reading {os.path.basename(path)}', leave=False, disable=None,
        mininterval=1.0) as bar:
      while pos < size:
        n = f.readinto(view[pos:pos + _CHUNK])
        if not n:
          break
        digest.update(view[pos:pos + n])
        pos += n
        bar.update(n)
  except OSError as e:
    raise UserError(f'cannot read {path} ({e.strerror}); check the file and its permissions.') from e
  if pos != size:
    raise UserError(f'{path} changed size while it was read; copy it completely and rerun.')
  try:
    restored = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on corrupt input.
    raise UserError(f'{path} is not a valid flax msgpack file ({type(e).__name__}); pass the released checkpoint '
                    f'of {what}.') from e
  if not isinstance(restored, dict) or not isinstance(restored.get('params'), dict):
    raise UserError(f"{path} has no 'params' entry; pass the released checkpoint of {what} (a flax msgpack of "
                    "{'params': ...}).")
  return restored['params'], digest.hexdigest(), size


def check_sources(transformer: str | None, tokenizer: str | None) -> dict[str, str]:
  """`{part: file}` of the files given; raises UserError when none is given or one does not exist."""
  sources = {part: path for part, path in (('teacher', transformer), ('tokenizer', tokenizer)) if path}
  if not sources:
    raise UserError('nothing to import; pass --transformer=FILE and/or --tokenizer=FILE.')
  for part, path in sources.items():
    flag, what, released = PARTS[part]
    if not os.path.isfile(path):
      raise UserError(f'{flag}={path} not found; pass the released checkpoint file of {what} (e.g. {released}).')
  return sources


def target(config, part: str):
  """ShapeDtypeStructs of the parameters the config builds for `part` ('teacher' or 'tokenizer')."""
  if part == 'teacher':
    model = build.teacher(config)
    num_tokens = build.token_grid(config) ** 2
    return jax.eval_shape(lambda: model.init(jax.random.key(0), num_tokens, jnp.zeros((1,), jnp.int32))['params'])
  if part == 'tokenizer':
    size, channels = config.data.image_size, config.data.channels
    model = build.tokenizer(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))['params'])
  raise ValueError(f'unknown part {part!r}; expected one of {list(PARTS)}')


def check(params: dict[str, Any], expected, path: str, what: str) -> None:
  """Raises UserError naming the first parameter of `params` whose name, shape or dtype differs from `expected`.

  Args:
    params: The checkpoint's parameters (nested dicts of arrays).
    expected: The configured model's parameters (arrays or ShapeDtypeStructs).
    path: The checkpoint file, for the message.
    what: What it holds, for the message.
  """
  fix = 'pass the matching checkpoint file or a --config whose model has this architecture'
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  for name, value in sorted(flat.items()):
    if not isinstance(value, np.ndarray):
      raise UserError(f'{path} does not hold {what}: entry {name} is a {type(value).__name__}, not an array; {fix}.')
  problem = ckpt_lib.first_mismatch(ckpt_lib.tree_shapes(expected), ckpt_lib.tree_shapes(params))
  if problem:
    raise UserError(f'{path} does not fit {what} of the config: {problem}; {fix}.')
  for name, value in sorted(flat.items()):
    if value.dtype != np.float32:
      raise UserError(f'{path}: parameter {name} is {value.dtype}, not float32; nothing is converted, so pass the '
                      f'float32 release of {what}.')


def summary(params) -> tuple[int, int, int]:
  """(arrays, values, bytes) of a parameter tree."""
  leaves = jax.tree.leaves(params)
  return len(leaves), int(sum(np.size(x) for x in leaves)), int(sum(np.size(x) * x.dtype.itemsize for x in leaves))


# ---------------------------------------------------------------------------------------------------------------
# Writing.


def import_checkpoints(config, out: str, transformer: str | None = None, tokenizer: str | None = None,
                       overwrite: bool = False, log=print) -> dict[str, dict]:
  """Checks released checkpoint files against the configured models and writes them as Orbax exports.

  Args:
    config: The config whose `build.teacher` / `build.tokenizer` the files must fit (e.g. configs/imagenet.py).
    out: Output directory; gets `teacher/` and/or `tokenizer/` (each `export/` + `export_meta.json`).
    transformer: The released transformer file (`maskgit_imagenet256_checkpoint`), or None.
    tokenizer: The released tokenizer file (`tokenizer_imagenet256_checkpoint`), or None.
    overwrite: Replace an existing `out/teacher` or `out/tokenizer`.
    log: Where progress lines go.

  Returns:
    `{part: meta}` for each part written (meta as in its `export_meta.json`, without the config).

  Raises:
    UserError: no file given, a file missing or not in the released format, a parameter name, shape or dtype
      that differs from the configured model (named), or an output that exists (without `overwrite`) or cannot
      be written. Nothing is written under `out` then.
  """
  sources = check_sources(transformer, tokenizer)
  if '://' in out:
    raise UserError(f'--out={out}: write to a local directory, then copy it (e.g. gsutil -m cp -r OUT gs://...); '
                    'the all-or-nothing rename needs a local file system.')
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f'--out={out} is a file; pass a directory.')
  ckpt_lib.check_export_destinations([os.path.join(out, part) for part in sources], overwrite)  # Before reading.

  loaded = {}
  for part, path in sources.items():
    _, what, _ = PARTS[part]
    params, sha256, size = read_released(path, what)
    check(params, target(config, part), path, what)
    arrays, values, nbytes = summary(params)
    meta = {'source': {'file': os.path.abspath(path), 'sha256': sha256, 'bytes': size},
            'num_arrays': arrays, 'num_params': values, 'dtype': 'float32',
            'imported_by': 'fpd_jax.tools.import_maskgit'}
    log(f'{part}: {os.path.basename(path)} fits {what} of the config: {arrays} arrays, {values:,} parameters, '
        f'{nbytes / 1e6:.1f} MB float32 (sha256 {sha256[:16]}...)')
    loaded[part] = (params, meta)

  ckpt_lib.write_exports({os.path.join(out, part): (params, {'config': config.to_dict(), **meta})
                          for part, (params, meta) in loaded.items()}, overwrite, log)
  for part in loaded:
    log(f'{part}: wrote {os.path.join(out, part)} (export/ + export_meta.json)')
  return {part: meta for part, (_, meta) in loaded.items()}


# ---------------------------------------------------------------------------------------------------------------
# Command line. Flags are defined only when this module runs as a program, so importing it has no side effects.


def _define_flags() -> dict[str, flags.FlagHolder]:
  return {
      'config': config_flags.DEFINE_config_file(
          'config', DEFAULT_CONFIG, 'Config whose teacher and tokenizer the files must fit (default: '
          'configs/imagenet.py, MaskGIT-base at 256x256); override fields with --config.<field>=value.',
          lock_config=True),
      'transformer': flags.DEFINE_string(
          'transformer', None, 'Released MaskGIT transformer checkpoint (flax msgpack), e.g. '
          'maskgit_imagenet256_checkpoint; written to OUT/teacher.'),
      'tokenizer': flags.DEFINE_string(
          'tokenizer', None, 'Released VQGAN tokenizer checkpoint (flax msgpack), e.g. '
          'tokenizer_imagenet256_checkpoint; written to OUT/tokenizer.'),
      'out': flags.DEFINE_string(
          'out', None, 'Output directory; point config.teacher.pretrained and config.tokenizer.pretrained at it.'),
      'overwrite': flags.DEFINE_bool('overwrite', False, 'Replace an existing OUT/teacher or OUT/tokenizer.'),
  }


def _run(v: dict) -> None:
  check_sources(v['transformer'], v['tokenizer'])  # Before the (slower) config.
  try:
    config = v['config']
    config.keys()  # A config file that failed to load raises only when used.
  except OSError as e:
    raise UserError(f'cannot load the config ({str(e).strip().splitlines()[-1].strip()}); pass --config=FILE.') from e
  import_checkpoints(config, v['out'], v['transformer'], v['tokenizer'], v['overwrite'])


if __name__ == '__main__':
  cli.run_tool(_define_flags, _run, ['out'])
