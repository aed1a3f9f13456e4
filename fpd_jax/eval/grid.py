"""Image grids for reports: tile a batch of images into one uint8 picture and save it as PNG."""

import os

import jax
import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """Converts images to uint8.

  Args:
    images: Float images with values in [0, 1] (clipped first), or uint8 images (returned unchanged).

  Returns:
    A uint8 array of the same shape: round(clip(x, 0, 1) * 255).
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f'to_uint8 expects float images in [0, 1] or uint8, got dtype {images.dtype}.')
  return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def image_grid(images, rows: int, cols: int, pad: int = 2, pad_value: float = 0.5) -> np.ndarray:
  """Tiles images into a rows x cols grid, row-major (image i goes to row i // cols, column i % cols).

  Args:
    images: [N, H, W, C] (C = 1 or 3) or [N, H, W] images, float in [0, 1] or uint8, with N <= rows * cols;
      missing cells are left at `pad_value`.
    rows: Number of grid rows.
    cols: Number of grid columns.
    pad: Pixels of border between cells and around the grid.
    pad_value: Border and empty-cell intensity in [0, 1] (mid grey stands out on black and white digits).

  Returns:
    uint8 [rows * H + (rows + 1) * pad, cols * W + (cols + 1) * pad, C].
  """
  images = to_uint8(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be [N, H, W, 1 or 3] or [N, H, W], got shape {images.shape}.')
  if rows < 1 or cols < 1 or pad < 0:
    raise ValueError(f'Need rows >= 1, cols >= 1, pad >= 0; got rows={rows}, cols={cols}, pad={pad}.')
  n, h, w, c = images.shape
  if n > rows * cols:
    raise ValueError(f'{n} images do not fit a {rows}x{cols} grid.')
  fill = int(round(float(np.clip(pad_value, 0.0, 1.0)) * 255))
  grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), fill, np.uint8)
  for i in range(n):
    top = pad + (i // cols) * (h + pad)
    left = pad + (i % cols) * (w + pad)
    grid[top:top + h, left:left + w] = images[i]
  return grid


def class_grid(images, labels, num_classes: int, per_class: int) -> np.ndarray:
  """One row per class (classes 0..rows-1, rows = min(num_classes, len(images))), `per_class` columns."""
  rows = min(num_classes, len(images))
  order = np.concatenate([np.flatnonzero(np.asarray(labels) == c)[:per_class] for c in range(rows)])
  return image_grid(np.asarray(images)[order], rows=rows, cols=per_class)


def captioned_rows(images, captions: list[str], per_row: int, caption_width: int = 200) -> np.ndarray:
  """`image_grid` rows of `per_row` images with each row's caption written to its left (text-to-image grids)."""
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  images = to_uint8(images)
  rows = len(captions)
  grid = image_grid(images, rows=rows, cols=per_row)
  if grid.shape[-1] == 1:
    grid = np.repeat(grid, 3, axis=-1)
  canvas = Image.new('RGB', (caption_width + grid.shape[1], grid.shape[0]), (255, 255, 255))
  canvas.paste(Image.fromarray(grid), (caption_width, 0))
  draw = ImageDraw.Draw(canvas)
  h = images.shape[1]
  for r, caption in enumerate(captions):
    draw.text((4, 2 + r * (h + 2) + h // 2 - 5), caption, fill=(0, 0, 0))
  return np.asarray(canvas)


def save_png(path: str | os.PathLike, grid) -> None:
  """Saves an image (e.g. from `image_grid`) as PNG, creating the parent directory (process 0 only).

  Args:
    path: Destination file.
    grid: [H, W] or [H, W, 1] (saved as grey 'L') or [H, W, 3] (saved as 'RGB'), uint8 or float in [0, 1].
  """
  if jax.process_index():  # Multi-process runs: process 0 writes images.
    return
  grid = to_uint8(grid)
  if grid.ndim == 3 and grid.shape[-1] == 1:
    grid = grid[..., 0]
  if grid.ndim == 2:
    image = Image.fromarray(grid)  # uint8 [H, W] -> mode 'L'.
  elif grid.ndim == 3 and grid.shape[-1] == 3:
    image = Image.fromarray(grid)  # uint8 [H, W, 3] -> mode 'RGB'.
  else:
    raise ValueError(f'save_png expects [H, W], [H, W, 1] or [H, W, 3], got shape {grid.shape}.')
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  image.save(path, format='PNG')
