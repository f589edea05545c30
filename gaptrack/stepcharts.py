"""The step images of one measured epoch, drawn with Pillow.

The MLflow UI's image charts step through them epoch by epoch
(:class:`gaptrack.publish.EpochImages` renders them off the training thread):

- :func:`decomposition_png`: per metric, the gap and its three parts as
  horizontal bars, each with its value;
- :func:`staleness_png`: every BN layer's two staleness statistics as a
  two-column heatmap (viridis from 0 to the largest value, each cell with its
  value), with a colour bar.

They are drawn directly on a raster, not through matplotlib (as the report's
charts, :mod:`gaptrack.charts`, are): a matplotlib figure of the 20-layer MLP's
two images took 0.20 CPU-seconds an epoch to build and render, mostly creating
and laying out artists, which the training competed with on a 2-core machine;
these take about a hundredth of it. Text is matplotlib's DejaVu Sans, colours
are the report's, the colour map matplotlib's viridis and the axis ticks
matplotlib's ``MaxNLocator`` (none of them creates a figure).
"""

import functools
import io
import math

from gaptrack.charts import COLORS as PART_COLORS
from gaptrack.keys import PARTS, STALENESS_STATS

#: Width of every step image, in pixels.
WIDTH = 600
#: The bars' colours: the gap black, its parts as in the report's chart.
COLORS = {"gap": "#000000", **PART_COLORS}
_INK, _GRID, _MISSING = "#222222", "#BBBBBB", "#E6E6E6"


@functools.lru_cache(maxsize=None)
def _font(size):
    import os

    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf",
                                           "DejaVuSans.ttf"), size)


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _format(value):
    """A bar's or a cell's value, to 4 significant digits; ``n/a`` when not finite."""
    return f"{value:+.4g}" if math.isfinite(value) else "n/a"


def _ticks(low, high, count=6):
    """Tick values for the range ``[low, high]`` (``MaxNLocator``'s nice numbers)."""
    from matplotlib.ticker import MaxNLocator

    return [t for t in MaxNLocator(count).tick_values(low, high)
            if low - 1e-12 * (high - low) <= t <= high + 1e-12 * (high - low)]


def _tick_label(value, step):
    """``value`` with as many decimals as the ticks' ``step`` needs (0.025: three)."""
    decimals = next((d for d in range(10) if abs(round(step, d) - step) <= 1e-9 * step), 10)
    return f"{value:.{decimals}f}"


def decomposition_png(record, names):
    """One epoch's gap and its parts per metric (``names``, a panel each), as PNG.

    Each panel has a bar for the gap and one for each part, from 0 to the value,
    on an axis that holds them all (and 0), with the value at the bar's end.
    """
    from PIL import Image, ImageDraw

    panel, top = 130, 10
    image = Image.new("RGB", (WIDTH, top + panel * len(names) + 10), "white")
    draw = ImageDraw.Draw(image)
    title, label, small = _font(14), _font(12), _font(11)
    left, right = 80, WIDTH - 20
    for index, m in enumerate(names):
        y0 = top + panel * index
        draw.text((WIDTH / 2, y0 + 2), f"{m}: fit - evaluate at epoch {record.step}",
                  font=title, fill=_INK, anchor="mt")
        parts = record.parts[m]
        bars = [("gap", parts.gap), *((p, getattr(parts, p)) for p in PARTS)]
        finite = [v for _, v in bars if math.isfinite(v)]
        low, high = min([0.0, *finite]), max([0.0, *finite])
        if high - low == 0:
            low, high = -1.0, 1.0
        margin = 0.08 * (high - low)
        low, high = low - (margin if low < 0 else 0), high + (margin if high > 0 else 0)

        def x(value, low=low, high=high):
            return left + (value - low) / (high - low) * (right - left)

        axis_top, row = y0 + 24, 18
        axis_bottom = axis_top + row * len(bars) + 4
        ticks = _ticks(low, high)
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 0
        for t in ticks:
            draw.line([(x(t), axis_top), (x(t), axis_bottom)], fill="#EEEEEE")
            draw.line([(x(t), axis_bottom), (x(t), axis_bottom + 3)], fill=_INK)
            draw.text((x(t), axis_bottom + 5), _tick_label(t, step), font=small, fill=_INK,
                      anchor="mt")
        draw.rectangle([left, axis_top, right, axis_bottom], outline=_INK)
        for i, (name, value) in enumerate(bars):
            yc = axis_top + 4 + row * i + row / 2
            draw.text((left - 6, yc), name, font=label, fill=_INK, anchor="rm")
            if math.isfinite(value):
                a, b = sorted((x(0.0), x(value)))
                draw.rectangle([round(a), round(yc - 6), round(b), round(yc + 6)],
                               fill=COLORS[name])
                text = _format(value)
                room = draw.textlength(text, font=small) + 8
                if value >= 0:  # beyond the bar's end, or inside it where the axis ends
                    at, anchor, ink = ((b + 4, "lm", _INK) if b + room <= right
                                       else (b - 4, "rm", "white"))
                else:
                    at, anchor, ink = ((a - 4, "rm", _INK) if a - room >= left
                                       else (a + 4, "lm", "white"))
                draw.text((at, yc), text, font=small, fill=ink, anchor=anchor)
            else:
                draw.text((x(0.0) + 4, yc), "n/a", font=small, fill=_INK, anchor="lm")
        draw.line([(x(0.0), axis_top), (x(0.0), axis_bottom)], fill="#808080")
    return _png(image)


def staleness_png(record, layers):
    """One epoch's staleness of every BN layer (``layers``, in order): ``mean``
    and ``var`` side by side, a row per layer, as PNG. Cells are coloured with
    viridis from 0 to the largest value of the two columns; a layer without a
    value (not on the forward path) is grey."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    grid = np.array([record.staleness.get(layer, (np.nan, np.nan)) for layer in layers],
                    dtype=np.float64).reshape(len(layers), len(STALENESS_STATS))
    grid = np.where(np.isfinite(grid), grid, np.nan)
    finite = grid[np.isfinite(grid)]
    high = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    row, top = 22, 34
    image = Image.new("RGB", (WIDTH, top + row * len(layers) + 50), "white")
    draw = ImageDraw.Draw(image)
    title, label, small = _font(14), _font(11), _font(11)
    draw.text((WIDTH / 2, 8), f"BN staleness at epoch {record.step}", font=title, fill=_INK,
              anchor="mt")
    left, cell = 250, 110
    viridis = colormaps["viridis"]
    for i, layer in enumerate(layers):
        y = top + row * i
        draw.text((left - 6, y + row / 2), layer, font=label, fill=_INK, anchor="rm")
        for j in range(len(STALENESS_STATS)):
            value = grid[i, j]
            box = [left + cell * j, y, left + cell * (j + 1) - 1, y + row - 1]
            if np.isnan(value):
                draw.rectangle(box, fill=_MISSING)
                continue
            rgba = viridis(min(max(value / high, 0.0), 1.0))
            fill = tuple(round(255 * c) for c in rgba[:3])
            draw.rectangle(box, fill=fill)
            ink = "white" if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] < 140 else "black"
            draw.text((left + cell * j + cell / 2, y + row / 2), f"{value:.3g}", font=small,
                      fill=ink, anchor="mm")
    bottom = top + row * len(layers)
    draw.rectangle([left - 1, top - 1, left + cell * len(STALENESS_STATS), bottom], outline=_INK)
    for j, stat in enumerate(STALENESS_STATS):
        draw.text((left + cell * j + cell / 2, bottom + 6), stat, font=label, fill=_INK,
                  anchor="mt")
    # the colour bar: 0 at the bottom, the largest value at the top
    bar_left = left + cell * len(STALENESS_STATS) + 30
    bar_right = bar_left + 16
    height = bottom - top
    for k in range(height):
        rgba = viridis(1.0 - k / max(1, height - 1))
        draw.line([(bar_left, top + k), (bar_right, top + k)],
                  fill=tuple(round(255 * c) for c in rgba[:3]))
    draw.rectangle([bar_left - 1, top - 1, bar_right, bottom], outline=_INK)
    ticks = _ticks(0.0, high, 5)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 0
    for t in ticks:
        y = bottom - 1 - t / high * (height - 1)
        draw.line([(bar_right, y), (bar_right + 3, y)], fill=_INK)
        draw.text((bar_right + 6, y), _tick_label(t, step), font=small, fill=_INK, anchor="lm")
    return _png(image)
