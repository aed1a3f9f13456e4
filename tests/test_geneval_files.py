"""The GenEval folder layout (`fpd_jax/eval/geneval_files.py`) as the official scorer reads it."""

import json

import numpy as np
import pytest

from fpd_jax.errors import UserError
from fpd_jax.eval import geneval_files


def test_metadata_and_plain_prompts(tmp_path):
  meta = [{'tag': 'single_object', 'include': [{'class': 'bench', 'count': 1}], 'prompt': 'a photo of a bench'},
          {'tag': 'counting', 'include': [{'class': 'cow', 'count': 2}], 'prompt': 'a photo of two cows'}]
  path = tmp_path / 'evaluation_metadata.jsonl'
  path.write_text('\n'.join(json.dumps(m) for m in meta) + '\n')
  assert geneval_files.read_prompts(str(path)) == (['a photo of a bench', 'a photo of two cows'], meta)
  plain = tmp_path / 'prompts.txt'
  plain.write_text('a cat\n\ntwo dogs\n')
  assert geneval_files.read_prompts(str(plain)) == (['a cat', 'two dogs'], [{'prompt': 'a cat'}, {'prompt': 'two dogs'}])
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"tag": "x"}\n')
  with pytest.raises(UserError, match='line 1 has no "prompt"'):
    geneval_files.read_prompts(str(bad))


def test_folders_as_the_scorer_reads_them(tmp_path):
  images = np.arange(2 * 3 * 4 * 4 * 3, dtype=np.uint8).reshape(6, 4, 4, 3)
  meta = [{'prompt': 'a'}, {'prompt': 'b', 'tag': 'colors'}]
  out = tmp_path / 'geneval'
  geneval_files.write_folders(str(out), images, meta, 3)
  assert sorted(p.name for p in out.iterdir()) == ['00000', '00001']
  assert json.loads((out / '00001' / 'metadata.jsonl').read_text()) == meta[1]
  assert sorted(p.name for p in (out / '00001' / 'samples').iterdir()) == ['00000.png', '00001.png', '00002.png']
  from PIL import Image  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(np.asarray(Image.open(out / '00001' / 'samples' / '00002.png')), images[5])
  with pytest.raises(UserError, match='not empty'):
    geneval_files.write_folders(str(out), images, meta, 3)
