"""CLIP's byte-pair-encoding tokenizer (OpenAI CLIP / open_clip `SimpleTokenizer`), without torch.

  tok = ClipTokenizer()                                   # the vocabulary of an installed open_clip_torch
  tok = ClipTokenizer('bpe_simple_vocab_16e6.txt.gz')     # or the file itself, or an open_clip_torch wheel (.whl)
  ids = tok.encode(['a photo of a cat', ''])              # int32 [2, 77]: <start> ... <end>, then 0 (padding)

The vocabulary file `bpe_simple_vocab_16e6.txt.gz` ships inside the open_clip_torch wheel (`open_clip/`); it is
located with `importlib.util.find_spec` (the package is never imported) or read from a path: the `.txt.gz` itself
or a `.whl`. Ids: 256 byte symbols, their 256 end-of-word forms, 48,894 merges, then `<start_of_text>` (49406) and
`<end_of_text>` (49407, the largest id: CLIP pools the state at the argmax of the ids); padding is 0. A caption
longer than the context is cut and its last id set to `<end_of_text>`, as open_clip does.

Text is cleaned as open_clip's default ('lower'): `ftfy.fix_text` when ftfy is installed (otherwise NFC
normalisation and straight quotes, which agree with it on ordinary text), HTML entities unescaped twice,
whitespace runs folded, lower case. Words are split like open_clip's regular expression
`<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (Unicode letter and
number categories from `unicodedata`, so the `regex` package is not needed).

The interface is that of the demo's word-level tokenizer (`fpd_jax.data.captions.WordTokenizer`): `encode`,
`vocab_size`, `pad_id`, `bos_id`, `eos_id`, `context_length`.
"""

import functools
import gzip
import html
import importlib.util
import os
import unicodedata
import zipfile

import numpy as np

from fpd_jax.errors import UserError

VOCAB_FILE = 'bpe_simple_vocab_16e6.txt.gz'
WHEEL_MEMBER = 'open_clip/' + VOCAB_FILE
SPECIALS = ('<start_of_text>', '<end_of_text>')
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_QUOTES = str.maketrans({'\u2018': "'", '\u2019': "'", '\u201c': '"', '\u201d': '"'})


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible map of the 256 byte values to printable characters."""
  printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, (chr(c) for c in chars)))


def default_vocab_path() -> str:
  """The vocabulary inside an installed open_clip_torch (found without importing it)."""
  spec = importlib.util.find_spec('open_clip')
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f'the CLIP vocabulary {VOCAB_FILE} was not found: pip install open_clip_torch (only its data '
                    'file is read), or pass the file or the open_clip_torch wheel as the vocabulary path.')
  return os.path.join(list(spec.submodule_search_locations)[0], VOCAB_FILE)


def read_merges(path: str) -> list[tuple[str, str]]:
  """The 48,894 merges of the vocabulary file (a `.txt.gz`, or an open_clip_torch `.whl` holding it)."""
  try:
    if path.endswith('.whl'):
      with zipfile.ZipFile(path) as wheel:
        data = gzip.decompress(wheel.read(WHEEL_MEMBER))
    else:
      with gzip.open(path) as f:
        data = f.read()
  except KeyError as e:
    raise UserError(f'{path} has no {WHEEL_MEMBER}: pass an open_clip_torch wheel or the {VOCAB_FILE} file.') from e
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise UserError(f'cannot read the CLIP vocabulary {path} ({e}): pass {VOCAB_FILE} or an open_clip_torch '
                    'wheel.') from e
  lines = data.decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
  return [tuple(line.split()) for line in lines]


def clean(text: str) -> str:
  """open_clip's 'lower' cleaning (see the module docstring)."""
  try:
    import ftfy  # pylint: disable=g-import-not-at-top
    text = ftfy.fix_text(text)
  except ImportError:
    text = unicodedata.normalize('NFC', text).translate(_QUOTES)
  text = html.unescape(html.unescape(text)).strip()
  return ' '.join(text.split()).strip().lower()


def _kind(char: str) -> str:
  """'L' letter, 'N' number, ' ' white space, '.' anything else."""
  if char.isspace():
    return ' '
  category = unicodedata.category(char)[0]
  return category if category in 'LN' else '.'


def split_words(text: str) -> list[str]:
  """The pieces open_clip's regular expression finds in cleaned text (see the module docstring)."""
  out, i, n = [], 0, len(text)
  while i < n:
    special = next((s for s in SPECIALS if text.startswith(s, i)), None)
    contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
    kind = _kind(text[i])
    if special or contraction:
      piece = special or contraction
    elif kind == ' ':
      i += 1
      continue
    elif kind == 'N':
      piece = text[i]
    else:
      j = i + 1
      while j < n and _kind(text[j]) == kind:
        j += 1
      piece = text[i:j]
    out.append(piece)
    i += len(piece)
  return out


class ClipTokenizer:
  """Captions -> CLIP token ids `[B, context_length]` (see the module docstring)."""

  def __init__(self, vocab_path: str | None = None, context_length: int = 77):
    self.vocab_path = vocab_path or default_vocab_path()
    self.context_length = context_length
    merges = read_merges(self.vocab_path)
    self.byte_encoder = bytes_to_unicode()
    symbols = list(self.byte_encoder.values())
    vocab = symbols + [s + '</w>' for s in symbols] + [''.join(m) for m in merges] + list(SPECIALS)
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.ranks = {merge: i for i, merge in enumerate(merges)}
    self._bpe = functools.lru_cache(maxsize=65536)(self._merge)

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def bos_id(self) -> int:
    return self.encoder[SPECIALS[0]]

  @property
  def eos_id(self) -> int:
    return self.encoder[SPECIALS[1]]

  def _merge(self, token: str) -> tuple[str, ...]:
    """BPE of one word: repeatedly join the adjacent pair of lowest merge rank."""
    if token in SPECIALS:
      return (token,)
    word = tuple(token[:-1]) + (token[-1] + '</w>',)
    while len(word) > 1:
      pairs = set(zip(word[:-1], word[1:]))
      best = min(pairs, key=lambda pair: self.ranks.get(pair, float('inf')))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    return word

  def tokens(self, text: str) -> list[int]:
    """Ids of one caption, without <start>/<end>."""
    ids = []
    for piece in split_words(clean(text)):
      encoded = ''.join(self.byte_encoder[b] for b in piece.encode('utf-8'))
      ids.extend(self.encoder[t] for t in self._bpe(encoded))
    return ids

  def encode(self, prompts) -> np.ndarray:
    """int32 `[len(prompts), context_length]`: <start> ids <end>, zero-padded; too long captions are cut."""
    if isinstance(prompts, str):
      prompts = [prompts]
    out = np.zeros((len(prompts), self.context_length), np.int32)
    for row, prompt in enumerate(prompts):
      ids = [self.bos_id] + self.tokens(prompt) + [self.eos_id]
      if len(ids) > self.context_length:
        ids = ids[:self.context_length]
        ids[-1] = self.eos_id
      out[row, :len(ids)] = ids
    return out
