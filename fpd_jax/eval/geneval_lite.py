"""GenEval-lite: GenEval's six exact checks (DESIGN.md §1.6) on 2x2 digit canvases, with known cells instead of a
detector.

Per generated canvas and cell: "empty or which digit" from the evaluation network (an 11-class cell classifier,
`fpd_jax/train/t2i.py` stage `eval_net`, trained on real cells only), and the cell's colour = the nearest PALETTE
colour to the mean of its stroke pixels (brightness-normalised). Each (prompt, image) is then checked exactly:

  single_object  the digit is present             two_object  both digits present
  counting       exactly n of the digit            colors      some instance of the digit has the colour
  position       an instance of A and one of B whose cells satisfy the relation
  color_attr     an A of colour 1 and a B of colour 2 in different cells

score = mean of the six task accuracies (GenEval's overall); `held_out_overall` = the same mean over the families
with held-out combinations (colors, position, color_attr), restricted to their held-out prompts, and
`seen_overall` the mean over those families restricted to their other prompts (combinations seen in training): the
compositional-generalisation gap is seen_overall - held_out_overall.
"""

import numpy as np

from fpd_jax.data import t2i
from fpd_jax.models import vqgan
from fpd_jax.train import eval_net as eval_net_stage

STROKE_THRESHOLD = 0.3  # A pixel belongs to the stroke when its brightest channel exceeds this.


def cells(images: np.ndarray) -> np.ndarray:
  """Canvases `[B, 2c, 2c, C]` -> cells `[B, 4, c, c, C]` (row-major: top-left, top-right, bottom-left, ...)."""
  b, h, w, ch = images.shape
  return vqgan.to_tiles(np.asarray(images), 2).reshape(b, 4, h // 2, w // 2, ch)


def cell_colours(cell_images: np.ndarray) -> np.ndarray:
  """Nearest palette index of each cell's mean stroke colour (`[..., c, c, 3]` -> `[...]`; -1 without stroke)."""
  x = np.asarray(cell_images, np.float32)
  stroke = x.max(-1) > STROKE_THRESHOLD
  count = stroke.sum((-1, -2))
  mean = (x * stroke[..., None]).sum((-2, -3)) / np.maximum(count, 1)[..., None]
  mean = mean / np.maximum(mean.max(-1, keepdims=True), 1e-6)
  dist = ((mean[..., None, :] - t2i.PALETTE) ** 2).sum(-1)
  return np.where(count > 0, dist.argmin(-1), -1)


def detect(net, params, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(cell classes [B, 4] in 0..10 (10 = empty), cell colours [B, 4]) of canvases in [0, 1]."""
  cs = cells(np.asarray(images, np.float32))
  b = len(cs)
  flat = cs.reshape((b * 4,) + cs.shape[2:])
  digits = eval_net_stage.predict(net, params, flat).reshape(b, 4)
  return digits, cell_colours(cs)


def check(prompt: t2i.Prompt, digits: np.ndarray, colours: np.ndarray) -> bool:
  """GenEval's exact check of one prompt against one canvas's detected cells `digits, colours [4]`."""
  where = lambda d, c=-1: [i for i in range(4) if digits[i] == d and (c < 0 or colours[i] == c)]
  family = prompt.family
  if family == 'single_object':
    return bool(where(prompt.digits[0]))
  if family == 'two_object':
    return bool(where(prompt.digits[0])) and bool(where(prompt.digits[1]))
  if family == 'counting':
    return len(where(prompt.digits[0])) == prompt.count
  if family == 'colors':
    return bool(where(prompt.digits[0], prompt.colours[0]))
  if family == 'position':
    return any(t2i.relation_holds(prompt.relation, i, j)
               for i in where(prompt.digits[0]) for j in where(prompt.digits[1]))
  if family == 'color_attr':
    return any(i != j for i in where(prompt.digits[0], prompt.colours[0])
               for j in where(prompt.digits[1], prompt.colours[1]))
  raise ValueError(f'Unknown task family {family!r}.')


def score(prompts: list, digits: np.ndarray, colours: np.ndarray) -> dict:
  """{overall, <family>: accuracy, held_out_overall, seen_overall} of images (one prompt per image)."""
  ok = np.array([check(p, d, c) for p, d, c in zip(prompts, digits, colours)], np.float64)
  family = np.array([p.family for p in prompts])
  held = np.array([p.held_out for p in prompts])
  out = {f: float(ok[family == f].mean()) for f in t2i.FAMILIES if np.any(family == f)}
  out['overall'] = float(np.mean([out[f] for f in t2i.FAMILIES if f in out]))
  held_families = [f for f in t2i.FAMILIES if np.any(held & (family == f))]
  for key, rows in (('held_out_overall', held), ('seen_overall', ~held)):
    accs = [ok[rows & (family == f)].mean() for f in held_families if np.any(rows & (family == f))]
    out[key] = float(np.mean(accs)) if accs else float('nan')
  return out


def score_images(net, params, prompts: list, images: np.ndarray) -> dict:
  """`score` of canvases (one prompt per image) with the evaluation network."""
  return score(prompts, *detect(net, params, images))
