"""The demo's word-level text tokenizer: captions <-> token ids `[B, context_length]` int32.

Layout of a tokenised caption (as CLIP's, at word level): `<bos> w_1 .. w_n <eos> <pad> ..`. `<pad>` is id 0 and
`<eos>` the largest id of the vocabulary, so the end-of-text position is `argmax(ids)` (CLIP's pooling rule). The
empty caption `''` is `<bos> <eos>`: the null condition of text classifier-free guidance.

  tok = WordTokenizer(context_length=12)
  ids = tok.encode(['a red three to the left of a blue seven'])   # int32 [1, 12]
  tok.decode(ids)                                                 # ['a red three to the left of a blue seven']
  prompts = read_prompts_file('prompts.txt')                      # one prompt a line

Bad input raises `UserError` on one line: an unknown word (naming it and the vocabulary), a prompt longer than the
context, an empty prompt file.
"""

import dataclasses
import os

import numpy as np

from fpd_jax.errors import UserError

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
DIGIT_PLURALS = ('zeros', 'ones', 'twos', 'threes', 'fours', 'fives', 'sixes', 'sevens', 'eights', 'nines')
COUNT_WORDS = ('one', 'two', 'three', 'four')  # Counts 1..4 (the canvas has four cells).
COLOUR_WORDS = ('red', 'green', 'blue', 'yellow', 'cyan', 'magenta', 'white')
GLUE_WORDS = ('a', 'an', 'and', 'to', 'the', 'left', 'right', 'of', 'above', 'below')
SPECIAL = ('<pad>', '<bos>')
EOS = '<eos>'


def demo_vocabulary() -> tuple[str, ...]:
  """Every word of the demo's captions, specials first and `<eos>` last (the largest id)."""
  words = []
  for w in GLUE_WORDS + DIGIT_WORDS + DIGIT_PLURALS + COLOUR_WORDS:
    if w not in words:
      words.append(w)
  return SPECIAL + tuple(words) + (EOS,)


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
  """Lower-cased, whitespace-split words -> ids; `context_length` includes `<bos>` and `<eos>`."""
  context_length: int = 12
  vocabulary: tuple[str, ...] = dataclasses.field(default_factory=demo_vocabulary)

  def __post_init__(self):
    if self.vocabulary[0] != '<pad>' or self.vocabulary[-1] != EOS:
      raise ValueError('The vocabulary must start with <pad> (id 0) and end with <eos> (the largest id).')

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary)

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return self.vocabulary.index('<bos>')

  @property
  def eos_id(self) -> int:
    return len(self.vocabulary) - 1

  def words(self, prompt: str) -> list[str]:
    return prompt.lower().replace(',', ' ').split()

  def encode(self, prompts) -> np.ndarray:
    """int32 `[len(prompts), context_length]` ids; raises UserError on unknown words or too long prompts."""
    index = {w: i for i, w in enumerate(self.vocabulary)}
    out = np.zeros((len(prompts), self.context_length), np.int32)
    for row, prompt in enumerate(prompts):
      words = self.words(prompt)
      unknown = sorted({w for w in words if w not in index or w in SPECIAL + (EOS,)})
      if unknown:
        known = ' '.join(w for w in self.vocabulary if w not in SPECIAL + (EOS,))
        raise UserError(f'unknown word(s) {unknown} in prompt {prompt!r}; the demo vocabulary is: {known}')
      if len(words) + 2 > self.context_length:
        raise UserError(f'prompt {prompt!r} has {len(words)} words, more than the context of '
                        f'{self.context_length - 2} words (+ <bos>/<eos>); shorten it.')
      ids = [self.bos_id] + [index[w] for w in words] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids) -> list[str]:
    """Captions of token ids `[B, L]` (specials dropped)."""
    ids = np.asarray(ids)
    return [' '.join(self.vocabulary[i] for i in row if i not in (self.pad_id, self.bos_id, self.eos_id))
            for row in ids]


def read_prompts_file(path: str) -> list[str]:
  """Non-blank lines of a text file; UserError when the file is missing or holds no prompt."""
  if not os.path.isfile(path):
    raise UserError(f'prompts file {path} not found; pass a text file with one prompt a line.')
  with open(path) as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise UserError(f'prompts file {path} is empty; write one prompt a line.')
  return prompts
