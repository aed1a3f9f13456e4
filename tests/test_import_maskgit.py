"""Import of released-format MaskGIT checkpoints (fpd_jax/tools/import_maskgit.py) and loading them back.

The small released-format checkpoint of tests/fixtures/maskgit_small goes through the command line into Orbax
exports; the teacher and tokenizer `load` functions read them back and must reproduce the reference outputs
(golden.npz) to the tolerances of tests/test_maskgit.py and tests/test_vqgan.py.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import demo
from fpd_jax import checkpoint as ckpt_lib
from fpd_jax.errors import UserError
from fpd_jax.models import build
from fpd_jax.models import vqgan
from fpd_jax.tools import import_maskgit
from fpd_jax.train import teacher as teacher_stage
from fpd_jax.train import tokenizer as tokenizer_stage

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / 'tests' / 'fixtures'
SMALL = FIXTURES / 'maskgit_small'
TRANSFORMER = SMALL / 'transformer.msgpack'
TOKENIZER = SMALL / 'tokenizer.msgpack'


def small_config(pretrained: str = '') -> ml_collections.ConfigDict:
  """configs/demo.py with the sizes of the small fixture checkpoint (its config.json)."""
  sizes = json.loads((SMALL / 'config.json').read_text())
  t, k = sizes['transformer'], sizes['tokenizer']
  c = demo.get_config()
  c.data.image_size, c.data.channels, c.data.num_classes = k['image_size'], 3, t['num_classes']
  c.tokenizer.filters = k['filters']
  c.tokenizer.channel_multipliers = tuple(k['channel_multipliers'])
  c.tokenizer.norm_groups = vqgan.RELEASED_NORM_GROUPS
  c.tokenizer.num_res_blocks = k['num_res_blocks']
  c.tokenizer.embedding_dim = k['embedding_dim']
  c.tokenizer.codebook_size = k['codebook_size']
  c.tokenizer.pretrained = pretrained
  for key in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim', 'dropout'):
    c.teacher[key] = t[key]
  # vocab 38 = 32 codes + 5 classes + 1 mask: like the ImageNet release, no null class.
  c.teacher.null_class = False
  c.teacher.pretrained = pretrained
  assert t['codebook_size'] == k['codebook_size'] and t['vocab_size'] == t['codebook_size'] + t['num_classes'] + 1
  assert t['max_position_embeddings'] == build.token_grid(c) ** 2 + 1
  return c


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'fpd_jax.tools.import_maskgit', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def _raw(path: pathlib.Path) -> dict:
  return flax.serialization.msgpack_restore(path.read_bytes())['params']


def _write(path: pathlib.Path, params: dict) -> str:
  path.write_bytes(flax.serialization.msgpack_serialize({'params': params}))
  return str(path)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """The fixture checkpoint imported once through the command line: (out directory, completed process)."""
  tmp = tmp_path_factory.mktemp('import')
  config_file = tmp / 'small_config.py'
  config_file.write_text('import ml_collections\n\n\ndef get_config():\n'
                         f'  return ml_collections.ConfigDict({small_config().to_dict()!r})\n')
  out = tmp / 'maskgit_small'
  result = _cli(f'--config={config_file}', f'--transformer={TRANSFORMER}', f'--tokenizer={TOKENIZER}',
                f'--out={out}')
  assert result.returncode == 0, result.stderr
  return out, result


# ---- (a) Round trip: import, load, reproduce the reference outputs.


def test_cli_writes_both_exports_with_meta(imported):
  out, result = imported
  assert sorted(os.listdir(out)) == ['teacher', 'tokenizer']  # No temporary directories left behind.
  for part, source in (('teacher', TRANSFORMER), ('tokenizer', TOKENIZER)):
    assert sorted(os.listdir(out / part)) == ['export', 'export_meta.json']
    meta = ckpt_lib.load_export_meta(str(out / part / 'export'))
    assert meta['source']['sha256'] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta['source']['file'] == str(source)
    raw = _raw(source)
    assert meta['num_params'] == sum(x.size for x in jax.tree.leaves(raw))
    assert f'{part}: wrote {out / part}' in result.stdout
    assert f'{meta["num_params"]:,} parameters' in result.stdout
  meta = ckpt_lib.load_export_meta(str(out / 'teacher' / 'export'))
  assert meta['config']['teacher']['hidden_size'] == 48 and meta['config']['teacher']['null_class'] is False


@pytest.mark.parametrize('layout', ['out', 'stage'])
def test_imported_teacher_reproduces_golden_logits(imported, layout):
  out, _ = imported
  pretrained = out if layout == 'out' else out / 'teacher'
  config = small_config(str(pretrained))
  model, params = teacher_stage.load(config, '/nonexistent-workdir')
  raw = _raw(TRANSFORMER)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, raw)  # Bit for bit.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  golden = np.load(SMALL / 'golden.npz')
  ids = golden['transformer_input_ids']
  logits = model.transformer.apply({'params': params}, ids)
  np.testing.assert_allclose(logits, golden['transformer_logits'], atol=2e-5, rtol=1e-5)
  # Through the conditioning interface: tokens + class labels -> logits over the K codes.
  k = config.tokenizer.codebook_size
  codes = model.logits(params, jnp.asarray(ids[:, 1:]), jnp.asarray(ids[:, 0] - k))
  np.testing.assert_allclose(codes, golden['transformer_logits'][:, 1:, :k], atol=2e-5, rtol=1e-5)


def test_imported_tokenizer_reproduces_golden_indices_and_decodes(imported):
  out, _ = imported
  model, params = tokenizer_stage.load(small_config(str(out)), '/nonexistent-workdir')
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, _raw(TOKENIZER))
  golden = np.load(SMALL / 'golden.npz')
  variables = {'params': params}
  ids = jax.jit(lambda v, x: model.apply(v, x, method='encode_to_indices'))(variables, golden['tokenizer_image'])
  np.testing.assert_array_equal(np.asarray(ids), golden['tokenizer_indices'])
  images = jax.jit(lambda v, x: model.apply(v, x, method='decode_from_indices'))(variables, golden['decode_ids'])
  np.testing.assert_allclose(np.asarray(images), golden['decoded'], atol=1e-5, rtol=1e-5)


# ---- (b) Refusals name the parameter and write nothing.


def _renamed(params: dict) -> dict:
  params = dict(params)
  params['Embed_0'] = dict(params['Embed_0'])
  params['Embed_0']['word_embedding'] = params['Embed_0'].pop('word_embeddings')
  return params


def _reshaped(params: dict) -> dict:
  params = dict(params)
  params['quantizer'] = {'codebook': params['quantizer']['codebook'][:-1]}
  return params


def _half(params: dict) -> dict:
  return jax.tree.map(lambda x: x.astype(np.float16) if x.ndim == 1 else x, params)


@pytest.mark.parametrize('part,change,named', [
    ('transformer', _renamed, 'Embed_0/word_embedding'),
    ('tokenizer', _reshaped, 'quantizer/codebook'),
    ('tokenizer', _half, 'float16'),
])
def test_mismatch_is_named_and_nothing_written(tmp_path, part, change, named):
  source = TRANSFORMER if part == 'transformer' else TOKENIZER
  bad = _write(tmp_path / 'bad.msgpack', change(_raw(source)))
  out = tmp_path / 'new' / 'out'
  files = {'transformer': str(TRANSFORMER), 'tokenizer': str(TOKENIZER), part: bad}
  with pytest.raises(UserError, match=named) as error:
    import_maskgit.import_checkpoints(small_config(), str(out), **files)
  assert bad in str(error.value)
  assert not (tmp_path / 'new').exists()


def test_wrong_config_is_refused():
  config = small_config()
  config.teacher.null_class = True  # One more vocabulary row than the file has.
  with pytest.raises(UserError, match=r'Embed_0/word_embeddings/embedding has shape \(38, 48\)'):
    import_maskgit.import_checkpoints(config, '/nonexistent/out', transformer=str(TRANSFORMER))


def test_not_a_checkpoint(tmp_path):
  bad = tmp_path / 'bad.msgpack'
  bad.write_bytes(b'\xc1 definitely not msgpack')
  with pytest.raises(UserError, match='not a valid flax msgpack'):
    import_maskgit.import_checkpoints(small_config(), str(tmp_path / 'out'), tokenizer=str(bad))
  no_params = tmp_path / 'no_params.msgpack'
  no_params.write_bytes(flax.serialization.msgpack_serialize({'weights': np.zeros(3)}))
  with pytest.raises(UserError, match="no 'params'"):
    import_maskgit.import_checkpoints(small_config(), str(tmp_path / 'out'), tokenizer=str(no_params))
  with pytest.raises(UserError, match='nothing to import'):
    import_maskgit.import_checkpoints(small_config(), str(tmp_path / 'out'))
  with pytest.raises(UserError, match='local directory'):
    import_maskgit.import_checkpoints(small_config(), 'gs://bucket/out', tokenizer=str(TOKENIZER))
  assert not (tmp_path / 'out').exists()


def test_existing_output_needs_overwrite_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
  out = tmp_path / 'out'
  config = small_config(str(out))
  import_maskgit.import_checkpoints(config, str(out), tokenizer=str(TOKENIZER), log=lambda _: None)
  doubled = _raw(TOKENIZER)
  doubled['quantizer'] = {'codebook': doubled['quantizer']['codebook'] * 2}
  other = _write(tmp_path / 'other.msgpack', doubled)
  with pytest.raises(UserError, match='already exists; pass --overwrite'):
    import_maskgit.import_checkpoints(config, str(out), tokenizer=other, log=lambda _: None)
  # A write that fails half-way (disk full) leaves the old export and no temporary directory.
  real_export = ckpt_lib.export

  def export_then_fail(directory, params, meta=None):
    real_export(directory, params, meta)
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(ckpt_lib, 'export', export_then_fail)
  with pytest.raises(UserError, match='No space left on device'):
    import_maskgit.import_checkpoints(config, str(out), tokenizer=other, overwrite=True, log=lambda _: None)
  assert sorted(os.listdir(out)) == ['tokenizer']
  with pytest.raises(UserError, match='No space left on device'):
    import_maskgit.import_checkpoints(config, str(tmp_path / 'fresh'), transformer=str(TRANSFORMER),
                                      log=lambda _: None)
  assert not (tmp_path / 'fresh').exists()
  monkeypatch.setattr(ckpt_lib, 'export', real_export)
  _, params = tokenizer_stage.load(config, '/nonexistent-workdir')
  np.testing.assert_array_equal(np.asarray(params['quantizer']['codebook']), _raw(TOKENIZER)['quantizer']['codebook'])
  import_maskgit.import_checkpoints(config, str(out), tokenizer=other, overwrite=True, log=lambda _: None)
  assert sorted(os.listdir(out)) == ['tokenizer']
  _, params = tokenizer_stage.load(config, '/nonexistent-workdir')
  np.testing.assert_array_equal(np.asarray(params['quantizer']['codebook']), doubled['quantizer']['codebook'])


def test_commit_is_all_or_nothing(tmp_path, monkeypatch):
  out = tmp_path / 'out'
  staged = {}
  for part in ('teacher', 'tokenizer'):
    (out / part).mkdir(parents=True)
    (out / part / 'old').touch()
    staged[part] = str(out / f'.{part}.tmp-x')
    os.makedirs(staged[part])
    pathlib.Path(staged[part], 'new').touch()
  real_rename = os.rename

  def rename(src, dst):
    if src == staged['tokenizer']:
      raise OSError(5, 'Input/output error')
    real_rename(src, dst)

  monkeypatch.setattr(os, 'rename', rename)
  with pytest.raises(OSError):
    ckpt_lib._rename_into_place({str(out / p): tmp for p, tmp in staged.items()})  # pylint: disable=protected-access
  monkeypatch.setattr(os, 'rename', real_rename)
  for part in ('teacher', 'tokenizer'):  # Both old parts back in place, both new ones still staged.
    assert os.listdir(out / part) == ['old'] and os.listdir(staged[part]) == ['new']
  assert sorted(os.listdir(out)) == ['.teacher.tmp-x', '.tokenizer.tmp-x', 'teacher', 'tokenizer']
  ckpt_lib._rename_into_place({str(out / p): tmp for p, tmp in staged.items()})  # pylint: disable=protected-access
  assert sorted(os.listdir(out)) == ['teacher', 'tokenizer']
  assert os.listdir(out / 'teacher') == ['new'] and os.listdir(out / 'tokenizer') == ['new']


# ---- (c) Command line errors.


def test_cli_missing_file_is_one_line_and_exit_2(tmp_path):
  out = tmp_path / 'out'
  missing = tmp_path / 'maskgit_imagenet256_checkpoint'
  result = _cli(f'--transformer={missing}', f'--out={out}')
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and str(missing) in lines[0], result.stderr
  assert not out.exists()


# ---- Loading: pretrained='random' and a missing import.


def test_random_pretrained_has_the_configured_shapes_and_follows_the_seed():
  config = small_config('random')
  _, params = teacher_stage.load(config, '/nonexistent-workdir')
  assert ckpt_lib.tree_shapes(params) == ckpt_lib.tree_shapes(_raw(TRANSFORMER))
  _, tok_params = tokenizer_stage.load(config, '/nonexistent-workdir')
  assert ckpt_lib.tree_shapes(tok_params) == ckpt_lib.tree_shapes(_raw(TOKENIZER))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((params, tok_params)))
  embedding = np.asarray(params['Embed_0']['word_embeddings']['embedding'])
  assert 0.01 < embedding.std() < 0.03  # The model's initializer (truncated normal, stddev 0.02), not zeros.
  assert np.asarray(tok_params['quantizer']['codebook']).std() > 0
  config.seed += 1
  other = teacher_stage.load(config, '/nonexistent-workdir')[1]
  assert not np.array_equal(np.asarray(other['Embed_0']['word_embeddings']['embedding']),
                            np.asarray(params['Embed_0']['word_embeddings']['embedding']))


def test_missing_pretrained_directory_says_run_the_import(tmp_path):
  config = small_config(str(tmp_path / 'nowhere'))
  with pytest.raises(UserError, match='run python -m fpd_jax.tools.import_maskgit --transformer='):
    teacher_stage.load(config, str(tmp_path))
  with pytest.raises(UserError, match='run python -m fpd_jax.tools.import_maskgit --tokenizer='):
    tokenizer_stage.load(config, str(tmp_path))


# ---- (d) configs/imagenet.py builds exactly the released parameter trees.


def test_imagenet_config_matches_release_manifest():
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config()
  manifest = json.loads((FIXTURES / 'maskgit_param_manifest.json').read_text())
  for part, name in (('teacher', 'maskgit_imagenet256'), ('tokenizer', 'tokenizer_imagenet256')):
    ours = {f'params/{k}': list(v) for k, v in ckpt_lib.tree_shapes(import_maskgit.target(config, part)).items()}
    assert ours == manifest[name], part
