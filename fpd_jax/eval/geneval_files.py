"""The folder layout the official GenEval scorer reads (djghosh13/geneval, `evaluation/evaluate_images.py`).

  OUT/00000/metadata.jsonl        the prompt's metadata: one JSON object (GenEval's evaluation_metadata.jsonl line)
  OUT/00000/samples/00000.png     the images of that prompt, numbered from 0
  OUT/00001/...                   the next prompt, in the order of the prompts file

Score them with the official scorer: `python evaluation/evaluate_images.py OUT --outfile results.jsonl
--model-path MODELS` then `python evaluation/summary_scores.py results.jsonl` (its detector and environment).
"""

import json
import os

import numpy as np
from PIL import Image

from fpd_jax.data import captions as captions_lib
from fpd_jax.errors import UserError


def read_prompts(path: str) -> tuple[list[str], list[dict]]:
  """(prompts, metadata) of a prompts file: GenEval's `evaluation_metadata.jsonl` (one JSON object with a 'prompt'
  per line), or plain text (one prompt per line; its metadata is `{"prompt": ...}`)."""
  lines = captions_lib.read_prompts_file(path)  # Non-blank lines; names a missing or empty file.
  if not path.endswith('.jsonl'):
    return lines, [{'prompt': line} for line in lines]
  metadata = []
  for number, line in enumerate(lines, 1):
    try:
      entry = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{path} line {number} is not JSON ({e.msg}); pass GenEval\'s evaluation_metadata.jsonl.') from e
    if not isinstance(entry, dict) or not isinstance(entry.get('prompt'), str):
      raise UserError(f'{path} line {number} has no "prompt"; pass GenEval\'s evaluation_metadata.jsonl.')
    metadata.append(entry)
  return [m['prompt'] for m in metadata], metadata


def write_folders(out_dir: str, images: np.ndarray, metadata: list[dict], per_prompt: int) -> None:
  """Writes uint8 `images` [len(metadata) * per_prompt, H, W, 3] (those of one prompt consecutive) as above.

  Raises:
    UserError: `out_dir` exists and is not empty (nothing is overwritten), or the counts disagree.
  """
  if len(images) != len(metadata) * per_prompt:
    raise UserError(f'{len(images)} images for {len(metadata)} prompts x {per_prompt}; sample them again.')
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserError(f'--out_dir={out_dir} is not empty; pass a new directory (GenEval scores every folder in it).')
  for index, entry in enumerate(metadata):
    folder = os.path.join(out_dir, f'{index:05d}')
    os.makedirs(os.path.join(folder, 'samples'), exist_ok=True)
    with open(os.path.join(folder, 'metadata.jsonl'), 'w', encoding='utf-8') as f:
      json.dump(entry, f)
    for j in range(per_prompt):
      Image.fromarray(np.asarray(images[index * per_prompt + j], np.uint8)).save(
          os.path.join(folder, 'samples', f'{j:05d}.png'))
