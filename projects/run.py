"""``python -m projects.run``: the MLflow project's entry points (see ``MLproject``).

Run from the project root (the working directory under ``mlflow run``)::

    python -m projects.run main                  # the seeds' grid, ranked
    python -m projects.run train --scenario dense_l2 --epochs 3
    python -m projects.run sweep --scenario dropout --grid "dropout=0.2,0.5"
    python -m projects.run compare --experiment Default

Parameters are ``--name value`` (``mlflow run`` appends its undeclared ``-P
name=value`` parameters so), checked against what the command or scenario
accepts. A bad one is one line on standard error naming the value and what is
accepted, and exit status 2.
"""

import contextlib
import os
import sys

import click

from projects import SCENARIOS, scenario
from projects.params import ParamError, choice, count_or_all, describe, pairs, parse, text

# TensorFlow's C++ code logs lines at start-up (oneDNN, CPU features) that are
# not the job's; level 2 keeps its errors. Nothing imported above imports
# TensorFlow; the commands import it later. A value the user set is kept.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: The seeds' grid that ``main`` runs: deep_mlp with and without BN, at batch
#: sizes 32 and 1024.
MAIN_SCENARIO = "deep_mlp"
MAIN_GRID = "bn=0,1;batch_size=32,1024"
#: ``main``'s default epochs: ``mlflow run .`` takes under 3 minutes on 2 cores
#: (docs/project.md).
MAIN_EPOCHS = 20

_EXTRA = {"ignore_unknown_options": True, "allow_extra_args": True,
          "help_option_names": ["-h", "--help"]}


def _pop_param(given, name, default):
    """The value given for ``name`` (or ``default``), and the other pairs."""
    values = [v for n, v in given if n == name]
    if len(values) > 1:
        raise ParamError(f"{name} is given twice")
    return (values[0] if values else default), [(n, v) for n, v in given if n != name]


def _scenario_help():
    blocks = [f"\b\n{name}:\n{describe(scenario(name).PARAMS)}" for name in SCENARIOS]
    return "Each scenario's parameters, what they accept, and their defaults:\n\n" + \
        "\n\n".join(blocks)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """gaptrack's training scenarios as tracked MLflow runs."""


@cli.command(context_settings=_EXTRA, epilog=_scenario_help())
@click.argument("tokens", nargs=-1, type=click.UNPROCESSED)
def train(tokens):
    """One scenario as one tracked run: --scenario NAME [--param value ...]."""
    from projects.experiment import where
    from projects.training import train as train_scenario

    name, rest = _pop_param(pairs(tokens), "scenario", "batchnorm")
    name = choice("batchnorm", SCENARIOS).convert("scenario", name)
    config, _ = parse(rest, scenario(name).PARAMS, f"scenario {name}")
    run_id = train_scenario(name, config)
    print(f"run {run_id}: scenario {name} tracked")
    print(where(run_id))


def _main_params():
    from projects.sweep import parse_grid

    params = dict(scenario(MAIN_SCENARIO).PARAMS)
    grid = parse_grid(MAIN_GRID, params, MAIN_SCENARIO)
    for name, _ in grid:
        del params[name]
    params["epochs"] = params["epochs"].with_default(MAIN_EPOCHS)
    params["metric"] = text("loss")
    return params, grid


@cli.command(context_settings=_EXTRA)
@click.argument("tokens", nargs=-1, type=click.UNPROCESSED)
def main(tokens):
    """The seeds' grid: deep_mlp (20-layer MLP) with bn=0,1 x batch_size=32,1024 as
    child runs of one parent, then the runs ranked by gap.

    \b
    Parameters: deep_mlp's (see `train --help`) except bn and batch_size, with
    epochs=20, and --metric (the compiled metric ranked by; default loss).
    """
    from projects.experiment import where
    from projects.sweep import run_grid

    params, grid = _main_params()
    config, _ = parse(pairs(tokens), params, "main")
    metric = config.pop("metric")
    parent_id, _ = run_grid("main", MAIN_SCENARIO, config, grid, metric,
                            {"scenario": MAIN_SCENARIO, "grid": MAIN_GRID, "metric": metric,
                             **config})
    print(where(parent_id))


@cli.command(context_settings=_EXTRA)
@click.argument("tokens", nargs=-1, type=click.UNPROCESSED)
def sweep(tokens):
    """A grid as child runs of one parent, then the runs ranked by gap:
    --scenario NAME --grid "name=v1,v2;name=v1,v2" [--metric M] [--param value ...].

    \b
    Parameters not in the grid are the same for every run (the scenario's
    defaults unless given). --metric: the compiled metric ranked by (default loss).
    """
    from projects.experiment import where
    from projects.sweep import parse_grid, run_grid

    name, rest = _pop_param(pairs(tokens), "scenario", "deep_mlp")
    name = choice("deep_mlp", SCENARIOS).convert("scenario", name)
    grid_text, rest = _pop_param(rest, "grid", MAIN_GRID)
    metric, rest = _pop_param(rest, "metric", "loss")
    params = scenario(name).PARAMS
    grid = parse_grid(grid_text, params, f"scenario {name}")
    config, given = parse(rest, params, f"scenario {name}")
    both = sorted(given & {n for n, _ in grid})
    if both:
        raise ParamError(f"{', '.join(both)} is given both as a parameter and in the grid; "
                         "give it in one place")
    parent_id, _ = run_grid("sweep", name, config, grid, metric,
                            {"scenario": name, "grid": grid_text, "metric": metric,
                             **{k: config[k] for k in given}})
    print(where(parent_id))


@cli.command(context_settings=_EXTRA)
@click.argument("tokens", nargs=-1, type=click.UNPROCESSED)
def compare(tokens):
    """Rank an experiment's tracked runs by gap (gaptrack.rank_runs).

    \b
    --experiment  name or id; 'current' (default): MLFLOW_EXPERIMENT_ID, the
                  experiment `mlflow run` runs in, else MLflow's default
    --metric      compiled metric (default loss)
    --by          final, max_abs or mean_abs (default final)
    --filter      MLflow search filter (default: none)
    --top_k       integer >= 1, or all (default all)

    Under `mlflow run`, the run is tagged gaptrack.report=true (so rankings
    neither rank nor count it) and the ranking is logged as ranking.csv.
    """
    params = {"experiment": text("current"), "metric": text("loss"),
              "by": choice("final", ("final", "max_abs", "mean_abs")), "filter": text(""),
              "top_k": count_or_all()}
    config, _ = parse(pairs(tokens), params, "compare")

    import mlflow

    import gaptrack
    from gaptrack.keys import RANKING_TABLE, REPORT_TAG
    from projects.sweep import format_ranking

    experiment = config["experiment"]
    if experiment == "current":
        experiment = os.environ.get("MLFLOW_EXPERIMENT_ID", "0")  # "0": MLflow's Default
    top_k = None if config["top_k"] == "all" else config["top_k"]
    # Under `mlflow run`, this run is tagged as a report first, so that the
    # ranking does not count it among the untracked runs.
    under_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))
    with mlflow.start_run() if under_mlflow_run else contextlib.nullcontext():
        if under_mlflow_run:
            mlflow.set_tag(REPORT_TAG, "true")
        ranking = gaptrack.rank_runs(experiment, metric=config["metric"], by=config["by"],
                                     filter_string=config["filter"], top_k=top_k)
        if under_mlflow_run:
            mlflow.log_text(ranking.to_csv(index=False), RANKING_TABLE)
    varying = [c.removeprefix("params.") for c in ranking.columns
               if c.startswith("params.") and ranking[c].nunique(dropna=True) > 1]
    print(f"Runs ranked by |gap_{config['by']}/{config['metric']}|:")
    print(format_ranking(ranking, varying))
    untracked = ranking.attrs["untracked_runs"]
    if untracked:
        print(f"note: {untracked} runs were not tracked by gaptrack (parents of grids, other "
              "runs) and are left out", file=sys.stderr)


def _user_errors():
    """The errors that are the user's (a bad value), not the program's.

    gaptrack's come from modules that are slow to import (MLflow,
    scikit-learn); an error cannot come from a module that was not imported.
    """
    errors = [ParamError]
    for module, name in (("projects.datasets", "DatasetError"),
                         ("gaptrack.compare", "CompareError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def run(argv=None):
    """Run the command line; return the exit status (2 for a bad parameter)."""
    try:
        result = cli.main(args=argv, prog_name="python -m projects.run", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # no command: the help
        print(e.format_message(), file=sys.stderr)
        return e.exit_code
    except click.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(run())
