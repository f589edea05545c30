"""The report rendered: Markdown, a self-contained HTML page, the charts, and the
run description shown on the run's Overview in the MLflow UI.

Files logged under ``gaptrack/report/`` (:meth:`Rendering.artifacts`):

``report.html``        the report, self-contained (the charts embedded as
                       ``data:`` URIs), so that the single file displays in the
                       MLflow UI's artifact browser or anywhere it is copied to
``report.md``          the same summary as Markdown
``decomposition.png``  the gap per epoch by cause (:mod:`gaptrack.charts`)
``bn_staleness.png``   BN staleness per layer and epoch; only with BN layers
"""

import base64
import html
import re

from gaptrack import charts
from gaptrack.keys import DECOMPOSITION_PNG, REPORT_FILES, STALENESS_PNG

_TITLES = {DECOMPOSITION_PNG: "The gap per epoch, by cause",
           STALENESS_PNG: "BN staleness per layer and epoch"}


#: Text width of :meth:`Rendering.text` (narrower when the terminal is).
TEXT_WIDTH = 100
#: Lines :meth:`Rendering.text` keeps within.
TEXT_LINES = 40
#: Inline styles of :meth:`Rendering.fragment`: no colour of text or page is
#: set, so the fragment reads in JupyterLab's light and dark themes alike; the
#: lines, the highlight and the code's background are translucent.
_STYLE = {
    "table": "border-collapse: collapse; margin: .6em 0;",
    "cell": "border: 1px solid rgba(128, 128, 128, .45); padding: .15em .5em; text-align: right;",
    "cause": "background: rgba(255, 176, 0, .35); padding: 0 .3em; border-radius: 3px;",
    "code": "background: rgba(128, 128, 128, .2); padding: 0 .2em; border-radius: 3px;",
    "note": "opacity: .75; font-size: .9em;",
    "chart": "max-width: 100%; background: white; border-radius: 4px;",
}


class Rendering:
    """Renderings of one :class:`gaptrack.report.Report`."""

    def __init__(self, report):
        self.report = report
        self._pngs = {}

    @property
    def _title(self):
        name = self.report.history.run_name
        return "Why fit() and evaluate() disagree" + (f": run {name}" if name else "")

    @property
    def images(self):
        """``{file name: PNG bytes}``: the decomposition, and BN staleness when there is BN."""
        return {name: self._png(name) for name in self._image_names()}

    def _image_names(self):
        return [DECOMPOSITION_PNG] + ([STALENESS_PNG] if self.report.bn_layers else [])

    def _png(self, name):
        """One chart's PNG, drawn when first asked for (a notebook's display shows
        the decomposition only)."""
        if name not in self._pngs:
            history = self.report.history
            self._pngs[name] = charts.png(
                charts.decomposition_figure(history, self.report.evidence.probe_size)
                if name == DECOMPOSITION_PNG
                else charts.staleness_figure(history, self.report.bn_layers))
        return self._pngs[name]

    def _table_markdown(self):
        header, cells = self.report.table()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                        for row in cells]

    def _context(self):
        """The sentences qualifying the diagnosis (which weights the report
        describes, frozen BN, diverged replicas)."""
        return [c for c in [self.report.weights, *self.report.context] if c]

    def description(self):
        """The report's headline as Markdown, for the run's description: the
        diagnosis, the sentence, the table and the remedy."""
        lines = [f"**gaptrack diagnosis: `{self.report.diagnosis}`**", "",
                 self.report.sentence, *_spaced(self._context()), "", *self._table_markdown(),
                 "", f"**What to do:** {self.report.remedy}"]
        return "\n".join(lines) + "\n"

    def markdown(self, images=True):
        """The summary as Markdown; ``images`` links the PNGs (beside it in the artifacts)."""
        report = self.report
        run = f" (run `{report.history.run_id}`)" if report.history.run_id else ""
        lines = [f"# {self._title}", "", f"**Diagnosis: `{report.diagnosis}`**{run}", "",
                 report.sentence, *_spaced(self._context()), "",
                 f"**What to do:** {report.remedy}", "", *self._table_markdown(), "", report.note]
        if images:
            lines += ["", *(f"![{name[:-4]}]({name})" for name in self._image_names())]
        return "\n".join(lines) + "\n"

    def text(self, width=None):
        """The report for a terminal: plain text, wrapped to ``width`` (the
        terminal's, at most :data:`TEXT_WIDTH`), within :data:`TEXT_LINES` lines
        (the note on how to read the table goes first when it does not fit)."""
        import shutil
        import textwrap

        import pandas as pd

        report = self.report
        width = width or min(TEXT_WIDTH, shutil.get_terminal_size((TEXT_WIDTH, 24)).columns)
        header, cells = report.table()
        table = pd.DataFrame(cells, columns=header).to_string(index=False)
        run = f"  (run {report.history.run_id})" if report.history.run_id else ""

        def wrap(*paragraphs):
            return [line for p in paragraphs for line in ["", *textwrap.wrap(p, width)]]

        head = [f"gaptrack diagnosis: {report.diagnosis}{run}",
                *wrap(report.sentence, *self._context()), ""]
        tail = wrap(f"What to do: {report.remedy}")
        lines = head + table.splitlines() + tail + wrap(report.note)
        if len(lines) > TEXT_LINES:
            lines = head + table.splitlines() + tail
        return "\n".join(lines[:TEXT_LINES]) + "\n"

    def _img(self, name):
        data = base64.b64encode(self._png(name)).decode("ascii")
        title = html.escape(_TITLES[name])
        return (f'<img alt="{title}" title="{title}" style="{_STYLE["chart"]}" '
                f'src="data:image/png;base64,{data}">')

    def fragment(self, images=(DECOMPOSITION_PNG,)):
        """The report as an HTML fragment (what Jupyter displays): the
        diagnosis, the sentence, the table, the remedy and the ``images``
        (embedded as ``data:`` URIs; those the report has), in inline styles
        that set no text colour (:data:`_STYLE`)."""
        e, report = html.escape, self.report
        run = (f' <span style="{_STYLE["note"]}">(run <code style="{_STYLE["code"]}">'
               f'{e(report.history.run_id)}</code>)</span>' if report.history.run_id else "")
        context = "".join(f'<p class="context">{e(c)}</p>' for c in self._context())
        figures = "".join(self._img(name) for name in images if name in self._image_names())
        return (f'<div class="gaptrack-report">'
                f'<p class="diagnosis"><b>gaptrack diagnosis:</b> '
                f'<span style="{_STYLE["cause"]}">{e(report.diagnosis)}</span>{run}</p>'
                f'<p class="sentence">{e(report.sentence)}</p>{context}'
                f'{html_table(*report.table())}'
                f'<p class="remedy"><b>What to do:</b> {_code(e(report.remedy))}</p>'
                f'{figures}<p class="note" style="{_STYLE["note"]}">{e(report.note)}</p></div>')

    def html(self):
        """A self-contained HTML page: the fragment with every chart."""
        title = html.escape(self._title)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto;
       padding: 0 1rem; line-height: 1.45; }}
</style></head><body>
<h1>{title}</h1>
{self.fragment(images=tuple(self._image_names()))}
</body></html>
"""

    def artifacts(self):
        """``{file name: bytes or str}``: what the tracker logs under ``gaptrack/report/``."""
        page, markdown = REPORT_FILES
        return {page: self.html(), markdown: self.markdown(), **self.images}


def html_table(header, rows):
    """A table of text cells as HTML, in the theme-neutral :data:`_STYLE`."""
    e = html.escape
    cells = [_STYLE["cell"] + " text-align: left;"] + [_STYLE["cell"]] * (len(header) - 1)
    return (f'<table style="{_STYLE["table"]}"><tr>'
            + "".join(f'<th style="{c}">{e(h)}</th>' for c, h in zip(cells, header)) + "</tr>"
            + "".join("<tr>" + "".join(f'<td style="{c}">{e(v)}</td>' for c, v in zip(cells, row))
                      + "</tr>" for row in rows) + "</table>")


def _spaced(paragraphs):
    """Each paragraph after a blank line."""
    return [line for p in paragraphs for line in ("", p)]


def _code(escaped):
    """Markdown backticks as ``<code>`` in already escaped HTML."""
    return re.sub(r"`([^`]+)`", rf'<code style="{_STYLE["code"]}">\1</code>', escaped)
