"""The report's charts (matplotlib, no pyplot: no GUI backend, no global state).

- :func:`decomposition_figure`: per measured epoch, the three parts of the gap
  stacked (positive parts above 0, negative below) and the gap as a line, over
  the band of noise (one standard error);
- :func:`staleness_figure`: a heatmap, BN layers x epochs, of each layer's
  staleness (mean and var, :mod:`gaptrack.bn`).

Both read a :class:`gaptrack.record.RunHistory`; :func:`png` renders a figure.
Each measured epoch's step images are drawn apart, with Pillow
(:mod:`gaptrack.stepcharts`).
"""

from gaptrack.diagnosis import first_nonfinite_epoch, standard_error
from gaptrack.keys import PARTS, STALENESS_STATS

#: Each part of the gap's colour (the step images use them too).
COLORS = {"drift": "#4C72B0", "mode": "#DD8452", "bn_ema": "#55A868"}


def png(figure):
    """The figure as PNG bytes; the figure is emptied after (:func:`_release`)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    _release(figure)
    return buffer.getvalue()


def _release(figure):
    """Let a rendered figure's memory go now, not at Python's next full garbage
    collection. A figure's artists refer to each other in cycles, which only the
    full collection frees; in a process holding TensorFlow's half a million
    objects it runs once in many epochs (and takes 0.2-0.45 s). Until then each figure
    kept its Agg raster (2-3 MB, held by every text it drew) and its artists: the
    tracker's process grew 4-5 MB an epoch with the epoch images, under 1 MB
    without them (docs/performance.md). Dropping the texts' renderer frees the
    raster at once; clearing the figure breaks most of its cycles."""
    for artist in figure.findobj(lambda a: "_renderer" in vars(a)):
        artist._renderer = None
    figure.clear()


def _finite(values):
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def decomposition_figure(history, probe_size=None):
    """One panel per measured metric: the parts stacked per epoch, the gap as a
    line, the noise (one standard error either side of 0) as a band."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = history.names
    figure = Figure(figsize=(9, 3.2 * len(names)), layout="constrained")
    for axes, m in zip(figure.subplots(len(names), 1, squeeze=False)[:, 0], names):
        records = [r for r in history.records if m in r.parts]
        # a model measured once, after fit() (gaptrack.explain without a history), has no epoch
        epochs = [0 if r.step is None else r.step for r in records]
        up, down = np.zeros(len(epochs)), np.zeros(len(epochs))
        for part in PARTS:
            values = np.nan_to_num(_finite([getattr(r.parts[m], part) for r in records]))
            positive, negative = np.maximum(values, 0), np.minimum(values, 0)
            axes.bar(epochs, positive, bottom=up, width=0.6, color=COLORS[part], label=part)
            axes.bar(epochs, negative, bottom=down, width=0.6, color=COLORS[part])
            up, down = up + positive, down + negative
        noise = [standard_error(r, m, probe_size) for r in records]
        if any(s is not None for s in noise):
            # a flat band across each epoch's bar: x from e - 0.5 to e + 0.5
            band = np.repeat(_finite([np.nan if s is None else s for s in noise]), 2)
            edges = np.ravel([(e - 0.5, e + 0.5) for e in epochs])
            axes.fill_between(edges, -band, band, color="grey", alpha=0.25, linewidth=0,
                              zorder=0, label="noise (±1 SE)")
        axes.plot(epochs, _finite([r.parts[m].gap for r in records]), color="black",
                  marker="o", label="gap = fit - evaluate")
        first = first_nonfinite_epoch(history.records, m)
        if first is not None:
            axes.axvline(first, color="red", linestyle="--", label=f"{m} non-finite from here")
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.use_sticky_edges = False  # stacked bars pin the limits to their ends
        axes.margins(y=0.08)
        axes.set_xlim(epochs[0] - 0.6, epochs[-1] + 0.6)
        if records[0].step is None:
            axes.set_xticks(epochs, ["after fit()"])
        elif len(epochs) <= 12:
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(f"{m}: fit - evaluate" if records[0].fit else f"{m}: parts measured")
        axes.set_title(f"{m}: gap between fit() and evaluate(), by cause")
        axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def staleness_figure(history, layers):
    """Heatmaps, BN ``layers`` x measured epochs, of the two staleness statistics."""
    import numpy as np
    from matplotlib.figure import Figure

    records = [r for r in history.records if r.staleness]
    epochs = [r.step for r in records]
    figure = Figure(figsize=(10, 1.6 + 0.28 * len(layers)), layout="constrained")
    titles = {"mean": "mean: |moving_mean - mean| / std",
              "var": "var: |log moving_variance - log variance|"}
    for index, (axes, stat) in enumerate(zip(figure.subplots(1, 2, sharey=True), STALENESS_STATS)):
        grid = _finite([[r.staleness.get(layer, (np.nan, np.nan))[index] for r in records]
                        for layer in layers])
        image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis",
                            interpolation="nearest")
        step = max(1, len(epochs) // 10)
        axes.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
        axes.set_yticks(range(len(layers)), layers, fontsize="small")
        axes.set_xlabel("epoch")
        axes.set_title(titles[stat], fontsize="medium")
        figure.colorbar(image, ax=axes)
    figure.suptitle("BN staleness: moving statistics vs the probe's population statistics")
    return figure
