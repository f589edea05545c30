"""The step images of one epoch (gaptrack.stepcharts): what they draw is read back
from the decoded PNG and checked against the record's numbers."""

import io

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from gaptrack import stepcharts
from gaptrack.record import EpochRecord, Parts


def pixels(png):
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width == stepcharts.WIDTH
    return np.asarray(image.convert("RGB"))


def rgb(color):
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])


def columns_of(image, color):
    """The columns that hold pixels of exactly ``color`` (a bar's: text is drawn
    in other colours, and its anti-aliased edges blend them with what is under)."""
    mask = np.all(image == color, axis=2)
    return np.flatnonzero(mask.sum(axis=0) >= 2)


@pytest.mark.parametrize("parts", [Parts(gap=0.25, drift=0.0625, mode=0.0, bn_ema=0.1875),
                                   Parts(gap=0.07, drift=-0.05, mode=0.02, bn_ema=0.1)])
def test_decomposition_bars_are_the_parts_to_scale(parts):
    """Each bar runs from one zero line to its value, all on one scale: the widths
    are in the ratios of the values, a negative part lies left of the zero line."""
    record = EpochRecord(step=4, parts={"loss": parts})
    image = pixels(stepcharts.decomposition_png(record, ["loss"]))
    spans = {}
    for name, value in [("gap", parts.gap), ("drift", parts.drift), ("mode", parts.mode),
                        ("bn_ema", parts.bn_ema)]:
        found = columns_of(image, rgb(stepcharts.COLORS[name]))
        if value == 0:
            assert found.size == 0, name
            continue
        assert found.size and found[-1] - found[0] + 1 == found.size, name  # one bar
        spans[name] = (found[0], found[-1] + 1, value)
    zero = {(a if v > 0 else b) for a, b, v in spans.values()}
    assert max(zero) - min(zero) <= 1  # every bar starts on the zero line
    # one scale: the longest bar gives it, every other bar is within 2 pixels of it
    a, b, v = max(spans.values(), key=lambda span: abs(span[2]))
    per_unit = (b - a) / abs(v)
    for name, (a, b, v) in spans.items():
        assert abs((b - a) - abs(v) * per_unit) <= 2, name
    for name, (a, b, v) in spans.items():
        assert (a >= min(zero)) if v > 0 else (b <= max(zero)), name


def test_one_panel_per_metric_and_a_part_not_finite_draws_no_bar():
    record = EpochRecord(step=1, parts={
        "loss": Parts(gap=0.5, drift=0.25, mode=0.125, bn_ema=0.125),
        "accuracy": Parts(gap=-0.04, drift=float("nan"), mode=-0.03, bn_ema=-0.01)})
    image = pixels(stepcharts.decomposition_png(record, ["loss", "accuracy"]))
    half = image.shape[0] // 2
    mode = rgb(stepcharts.COLORS["mode"])
    drift = rgb(stepcharts.COLORS["drift"])
    assert columns_of(image[:half], drift).size and columns_of(image[half:], mode).size
    assert columns_of(image[half:], drift).size == 0  # NaN: no bar, "n/a"


def test_staleness_cells_are_the_values_on_viridis():
    """Each cell's colour is viridis at its value over the largest value; a layer
    without values is grey; the colour bar runs from viridis(0) to viridis(1)."""
    layers = [f"model.bn_{i}" for i in range(6)]
    values = {layer: (0.3 * i + 0.1, 0.7 * i + 0.2) for i, layer in enumerate(layers[:5])}
    record = EpochRecord(step=2, staleness=values)
    image = pixels(stepcharts.staleness_png(record, layers))
    high = max(max(v) for v in values.values())
    for mean, var in values.values():
        for value in (mean, var):
            color = np.round(255 * np.array(colormaps["viridis"](value / high)[:3]))
            count = np.all(image == color, axis=2).sum()
            assert count >= 1500, (value, count)  # a cell of ~110 x 22 px, less its text
    grey = np.all(image == rgb(stepcharts._MISSING), axis=2).sum()
    assert grey >= 2 * 1500  # the layer without values: both its cells
    for end in (0.0, 1.0):
        color = np.round(255 * np.array(colormaps["viridis"](end)[:3]))
        assert np.all(image == color, axis=2).any(axis=1).sum() >= 1  # the bar's end



@pytest.mark.parametrize("ticks, labels", [
    ([0.0, 0.025, 0.05, 0.075], ["0.000", "0.025", "0.050", "0.075"]),
    ([-1.0, -0.5, 0.0, 0.5], ["-1.0", "-0.5", "0.0", "0.5"]),
    ([0.0, 2.0, 4.0], ["0", "2", "4"]),
    ([0.0, 0.0002, 0.0004], ["0.0000", "0.0002", "0.0004"]),
])
def test_tick_labels_have_the_decimals_their_step_needs(ticks, labels):
    step = ticks[1] - ticks[0]
    assert [stepcharts._tick_label(t, step) for t in ticks] == labels
