"""A line plot drawn with Pillow (no plotting library needed): axes with ticks, one polyline per series, a legend."""

import math

from PIL import Image
from PIL import ImageDraw

COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About `count` round tick values covering [lo, hi]."""
  if hi <= lo:
    hi = lo + 1.0
  step = 10 ** math.floor(math.log10((hi - lo) / count))
  for mult in (1, 2, 5, 10):
    if (hi - lo) / (step * mult) <= count:
      step *= mult
      break
  first = math.ceil(lo / step) * step
  return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_plot(path: str, series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
              size: tuple[int, int] = (640, 420)) -> None:
  """Writes a PNG with one polyline (and point markers) per `series` name -> [(x, y), ...]."""
  width, height = size
  left, right, top, bottom = 70, 20, 40, 55
  image = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(image)
  points = [p for pts in series.values() for p in pts]
  xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
  x0, x1 = min(0.0, min(xs)), max(xs)
  y0, y1 = min(0.0, min(ys)), max(ys) * 1.05
  x1, y1 = (x1 if x1 > x0 else x0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)

  def at(x, y):
    return (left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

  draw.rectangle([left, top, width - right, height - bottom], outline='black')
  for t in _ticks(x0, x1):
    px, py = at(t, y0)
    draw.line([px, py, px, py + 4], fill='black')
    draw.text((px - 12, py + 6), f'{t:g}', fill='black')
  for t in _ticks(y0, y1):
    px, py = at(x0, t)
    draw.line([px - 4, py, px, py], fill='black')
    draw.text((left - 45, py - 6), f'{t:g}', fill='black')
  draw.text((width // 2 - 3 * len(title), 12), title, fill='black')
  draw.text((width // 2 - 3 * len(xlabel), height - 22), xlabel, fill='black')
  draw.text((6, top - 20), ylabel, fill='black')
  for i, (name, pts) in enumerate(series.items()):
    color = COLORS[i % len(COLORS)]
    pixels = [at(x, y) for x, y in sorted(pts)]
    if len(pixels) > 1:
      draw.line(pixels, fill=color, width=2)
    for px, py in pixels:
      draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    ly = top + 10 + 16 * i
    draw.line([width - right - 110, ly + 6, width - right - 85, ly + 6], fill=color, width=2)
    draw.text((width - right - 80, ly), name, fill='black')
  image.save(path)
