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
from functools import cached_property

from gaptrack import charts
from gaptrack.keys import DECOMPOSITION_PNG, REPORT_FILES, STALENESS_PNG

_TITLES = {DECOMPOSITION_PNG: "The gap per epoch, by cause",
           STALENESS_PNG: "BN staleness per layer and epoch"}


class Rendering:
    """Renderings of one :class:`gaptrack.report.Report`."""

    def __init__(self, report):
        self.report = report

    @cached_property
    def images(self):
        """``{file name: PNG bytes}``: the decomposition, and BN staleness when there is BN."""
        history, probe_size = self.report.history, self.report.diagnosis.probe_size
        images = {DECOMPOSITION_PNG: charts.png(charts.decomposition_figure(history, probe_size))}
        if self.report.bn_layers:
            images[STALENESS_PNG] = charts.png(
                charts.staleness_figure(history, self.report.bn_layers))
        return images

    def _table_markdown(self):
        header, cells = self.report.table()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                        for row in cells]

    def _context(self):
        """The sentences qualifying the diagnosis (which weights the report
        describes, frozen BN, diverged replicas), each after a blank line."""
        lines = [self.report.weights] if self.report.weights else []
        return [line for c in [*lines, *self.report.context] for line in ("", c)]

    def description(self):
        """The report's headline as Markdown, for the run's description: the
        diagnosis, the sentence, the table and the remedy."""
        lines = [f"**gaptrack diagnosis: `{self.report.diagnosis.cause}`**", "",
                 self.report.sentence, *self._context(), "", *self._table_markdown(), "",
                 f"**What to do:** {self.report.remedy}"]
        return "\n".join(lines) + "\n"

    def markdown(self, images=True):
        """The summary as Markdown; ``images`` links the PNGs (beside it in the artifacts)."""
        report = self.report
        lines = [f"# Why fit() and evaluate() disagree: run {report.history.run_name}", "",
                 f"**Diagnosis: `{report.diagnosis.cause}`** (run `{report.history.run_id}`)", "",
                 report.sentence, *self._context(), "", f"**What to do:** {report.remedy}", "",
                 *self._table_markdown(), "", report.note]
        if images:
            lines += ["", *(f"![{name[:-4]}]({name})" for name in self.images)]
        return "\n".join(lines) + "\n"

    def text(self):
        """The summary for a terminal: the Markdown without the image links."""
        return self.markdown(images=False)

    def html(self):
        """A self-contained HTML page: the charts are embedded as ``data:`` URIs."""
        e = html.escape
        header, cells = self.report.table()
        table = ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
                 + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                           for row in cells) + "</table>")
        figures = "".join(
            f'<h2>{e(title)}</h2><img alt="{e(title)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode("ascii")}">'
            for name, data in self.images.items()
            for title in [_TITLES[name]]
        )
        title = f"Why fit() and evaluate() disagree: run {self.report.history.run_name}"
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }}
.diagnosis {{ font-size: 1.2rem; }} .diagnosis strong {{ background: #fde9b5;
       padding: 0 .3rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .2rem .5rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
code {{ background: #f3f3f3; padding: 0 .2rem; }} img {{ max-width: 100%; }}
.note {{ color: #555; font-size: .9rem; }}
</style></head><body>
<h1>{e(title)}</h1>
<p class="diagnosis">Diagnosis: <strong>{e(self.report.diagnosis.cause)}</strong>
 <span class="note">(run <code>{e(self.report.history.run_id)}</code>)</span></p>
<p class="sentence">{e(self.report.sentence)}</p>
{"".join(f'<p class="context">{e(c)}</p>' for c in self._context() if c)}
<p class="remedy"><b>What to do:</b> {_code(e(self.report.remedy))}</p>
{table}
<p class="note">{e(self.report.note)}</p>
{figures}
</body></html>
"""

    def artifacts(self):
        """``{file name: bytes or str}``: what the tracker logs under ``gaptrack/report/``."""
        page, markdown = REPORT_FILES
        return {page: self.html(), markdown: self.markdown(), **self.images}


def _code(escaped):
    """Markdown backticks as ``<code>`` in already escaped HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
