"""The ``gaptrack`` command: a thin layer over the Python API."""

import contextlib
import sys
from pathlib import Path

import click

from gaptrack.keys import SUMMARIES

_FORMATS = ("table", "csv", "json", "markdown")
_SUFFIX_FORMATS = {".csv": "csv", ".json": "json", ".md": "markdown"}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gaptrack")
def main():
    """Measure and compare the gap between Keras fit() and evaluate()."""


@main.command()
@click.option("-e", "--experiment", "experiments", multiple=True, required=True,
              metavar="NAME_OR_ID", help="Experiment to compare (name or id); repeat for several.")
@click.option("-m", "--metric", default="loss", show_default=True,
              help="Compiled Keras metric, as Keras names it (loss, accuracy, ...).")
@click.option("--by", type=click.Choice(SUMMARIES), default="final",
              show_default=True,
              help="Rank by |gap| at the last epoch, its maximum, or its mean over epochs.")
@click.option("--filter", "filter_string", default="", metavar="FILTER",
              help="MLflow search filter, e.g. \"params.batch_size = '32'\".")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=None,
              help="Show only the first K runs (default: all).")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="Tracking server or store [env: MLFLOW_TRACKING_URI; default: MLflow's].")
@click.option("-f", "--format", "fmt", type=click.Choice(_FORMATS), default=None,
              help="Output format [default: from the --output suffix (.csv, .json, .md), "
                   "else table].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file instead of standard output.")
@click.option("--columns", "extra_columns", default="", metavar="NAMES",
              help="More columns for the table, comma-separated (run_id, experiment, status, "
                   "gap_final, gap_max_abs, gap_mean_abs).")
@click.option("--params", "params", default="", metavar="NAMES",
              help="Run params to add to the table, comma-separated (e.g. batch_size,lr).")
@click.option("--log-report", is_flag=True,
              help="Also log the ranking (CSV, HTML, gap curves PNG) as an MLflow run "
                   "in the first experiment.")
def compare(experiments, metric, by, filter_string, top_k, tracking_uri, fmt, output,
            extra_columns, params, log_report):
    """Rank runs by how far fit() and evaluate() disagree, largest gap first.

    The table fits the terminal's width (COLUMNS): rank, run name, fit,
    eval_train, the gap and its parts, the diagnosis; --columns and --params
    add more. csv, json and markdown have every column.

    Notes (untracked runs left out, the report run) go to standard error, so
    that standard output stays machine-readable.
    """
    from gaptrack import compare as comparison  # MLflow loads only when comparing

    try:
        ranking = comparison.rank_runs(list(experiments), metric=metric, by=by,
                                       filter_string=filter_string, top_k=top_k,
                                       tracking_uri=tracking_uri)
    except comparison.CompareError as e:
        raise click.ClickException(str(e)) from None
    if fmt is None:
        fmt = _SUFFIX_FORMATS.get(output.suffix.lower(), "table") if output else "table"
    from gaptrack import ranktable

    try:
        table = ranktable.select(ranking, _names(extra_columns), _names(params))
    except ranktable.ColumnError as e:
        raise click.ClickException(str(e)) from None
    text = _render(ranking, table, fmt)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {len(ranking)} runs to {output}", err=True)
    untracked = ranking.attrs["untracked_runs"]
    if untracked:
        click.echo(f"note: {untracked} runs matching the filter were not tracked by gaptrack "
                   f"(no tag {comparison.VERSION_TAG}) and are left out", err=True)
    if log_report:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's URL
            run_id = comparison.log_comparison(ranking)
        experiment_id = ranking.attrs["experiment_ids"][0]
        click.echo(f"report logged as run {run_id} in experiment id {experiment_id}", err=True)


def _names(text):
    return [name.strip() for name in text.split(",") if name.strip()]


def _render(ranking, table, fmt):
    """The ranking as text in ``fmt`` (one of ``_FORMATS``): ``table`` (its chosen
    columns) for the terminal, every column otherwise."""
    from gaptrack import ranktable

    if fmt == "csv":
        return ranking.to_csv(index=False)
    if fmt == "json":
        return ranking.to_json(orient="records", indent=2) + "\n"
    if fmt == "markdown":
        return ranktable.markdown(ranking)
    return ranktable.terminal(table)


@main.command()
@click.argument("run_id")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="Tracking server or store [env: MLFLOW_TRACKING_URI; default: MLflow's].")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the self-contained HTML report to FILE.")
def report(run_id, tracking_uri, html_file):
    """Why fit() and evaluate() disagree in run RUN_ID: the diagnosis, the numbers
    behind it and what to do, rebuilt from the run's logged metrics."""
    from gaptrack.render import Rendering  # MLflow loads only when reporting
    from gaptrack.report import ReportError
    from gaptrack.runs import load_run

    try:
        report = load_run(run_id, tracking_uri).report
    except ReportError as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(report), nl=False)
    if html_file is not None:
        html_file.write_text(Rendering(report).html(), encoding="utf-8")
        click.echo(f"wrote {html_file}", err=True)


@main.command()
@click.argument("spool", required=False, type=click.Path(path_type=Path))
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="Send there instead of where each run was logged to.")
def sync(spool, tracking_uri):
    """Send what training could not log (the server was down) to MLflow.

    SPOOL is one run's spool directory, as the warning at train end names it,
    or a directory of them; default: $GAPTRACK_SPOOL_DIR, else
    $XDG_STATE_HOME/gaptrack/spool. Idempotent: running it twice adds nothing.
    """
    from gaptrack import sync as spools
    from gaptrack.uris import TrackingURIError

    try:
        results = spools.sync(spool, tracking_uri=tracking_uri)
    except (spools.SyncError, TrackingURIError) as e:
        raise click.ClickException(str(e)) from None
    for directory, run_id, sent, error in results:
        if error:
            click.echo(f"{run_id or 'run not created'}: {sent} operation(s) sent from "
                       f"{directory}, then stopped, nothing lost (run `gaptrack sync` "
                       f"again): {error}", err=True)
        else:
            click.echo(f"{run_id}: {sent} operation(s) sent from {directory}")
    if not results:
        click.echo("nothing to sync", err=True)
    if any(error for *_, error in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
