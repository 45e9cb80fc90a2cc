"""`collective results` and `collective results export`: the accuracy–size analysis of a project."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import NoReturn

import click

from ..errors import CollectiveError

# Options that only the analysis uses, by parameter name; `export` rejects them instead of
# ignoring them.
ANALYSIS_OPTIONS = {
    "sweeps": "--sweep",
    "max_params": "--max-params",
    "min_accuracy": "--min-accuracy",
    "plot_path": "--plot",
    "output_format": "--format",
}


class ParamCountType(click.ParamType):
    """A positive parameter count: a whole number, optionally with a K, M or B suffix (500K, 1.5M)."""

    name = "N"
    _pattern = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMbB]?)\s*$")
    _scale = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000}

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            count = value
        else:
            match = self._pattern.match(str(value))
            if not match:
                self.fail(f"{value!r} is not a parameter count; give a positive whole number such as 500000 or 500K", param, ctx)
            number, suffix = match.groups()
            scaled = float(number.replace("_", "")) * self._scale[suffix.lower()]
            if not scaled.is_integer():
                self.fail(f"{value!r} is not a whole number of parameters", param, ctx)
            count = int(scaled)
        if count <= 0:
            self.fail(f"{value!r} is not a positive parameter count; give a number above 0 such as 500000 or 500K", param, ctx)
        return count


class PercentType(click.ParamType):
    """A test accuracy in percent, from 0 to 100."""

    name = "PERCENT"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number; give a test accuracy in percent such as 88 or 88.5", param, ctx)
        if not math.isfinite(number) or not 0 <= number <= 100:
            self.fail(f"{value!r} is outside 0 to 100; test accuracy is in percent (88 means 88 %)", param, ctx)
        return number


def _check_plot_path(ctx, param, value):
    """Reject a --plot file whose suffix matplotlib cannot write, before any work is done."""
    if value is None:
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(value).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise click.BadParameter(
            f"{value!r} has no image suffix matplotlib can write; end the name with .png, .svg or .pdf "
            f"(all formats: {', '.join(sorted(formats))})",
            ctx=ctx,
            param=param,
        )
    return value


def _load_run_set(backend: str, project: str | None, entity: str | None, store_path: str | None, every_local_project: bool = False):
    """Resolve the backend, project and store, and read the project's runs.

    ``every_local_project`` reads every project of a local store, for lookups by run id (ids
    are unique within a store).
    """
    from .. import paths
    from ..results import sources

    chosen, reason = sources.resolve_backend(backend)
    if backend == "auto":
        click.echo(f"Backend {chosen}: {reason} (--backend sets it).", err=True)
    project = paths.resolve_project(project)
    if chosen == "wandb":
        return sources.load_wandb(project, entity)
    return sources.load_local(paths.resolve_store_path(store_path), None if every_local_project else project)


def _fail(error: CollectiveError) -> NoReturn:
    click.echo(f"Error: {error}", err=True)
    sys.exit(error.exit_code)


@click.group("results", invoke_without_command=True)
@click.option("--project", help="Project to analyse [default: $WANDB_PROJECT or collective-model].")
@click.option("--entity", help="W&B entity (team or user) of the project [default: $WANDB_ENTITY or the API key's default].")
@click.option("--backend", type=click.Choice(["auto", "wandb", "local"]), default="auto", show_default=True,
              help="Where the runs are: auto picks wandb when W&B credentials exist and WANDB_MODE is not offline, else local.")
@click.option("--store", "store_path", type=click.Path(dir_okay=False),
              help="Local SQLite store [env: COLLECTIVE_STORE; default: .collective/store.db].")
@click.option("--sweep", "sweeps", multiple=True, metavar="ID",
              help="Analyse only this sweep's runs, given by id or name (repeatable); standalone runs are left out.")
@click.option("--max-params", type=ParamCountType(),
              help="Deployment limit on trainable parameters (500000, 500K or 1.5M): choose the most accurate run within it.")
@click.option("--min-accuracy", type=PercentType(),
              help="Deployment floor on final/test_accuracy in percent: choose the smallest run that reaches it. "
                   "With --max-params too: the smallest run that meets both.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=_check_plot_path,
              help="Write the figure (accuracy against parameters, efficiency against accuracy) to this file, e.g. front.png.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="Output on stdout; csv and json list the same runs as the table.")
@click.pass_context
def results_group(ctx, project, entity, backend, store_path, sweeps, max_params, min_accuracy, plot_path, output_format) -> None:
    """Print the best run of each sweep, the accuracy–size Pareto frontier and a deployment choice.

    Only finished runs with final/test_accuracy and model_params are analysed; the others are
    counted in one line. `collective results export RUN_ID DIR` copies a chosen run's
    checkpoint and config for deployment.
    """
    ctx.obj = {"project": project, "entity": entity, "backend": backend, "store_path": store_path}
    if ctx.invoked_subcommand is not None:
        used = [name for name in ANALYSIS_OPTIONS if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if used:
            options = ", ".join(ANALYSIS_OPTIONS[name] for name in used)
            verb = "applies" if len(used) == 1 else "apply"
            raise click.UsageError(f"{options} {verb} only to the analysis, not to `results {ctx.invoked_subcommand}`")
        return

    if min_accuracy is not None and 0 < min_accuracy <= 1:
        click.echo(f"note: --min-accuracy is in percent; {min_accuracy:g} requests {min_accuracy:g} %, not {min_accuracy * 100:g} %", err=True)

    from ..results import analyse

    try:
        run_set = _load_run_set(backend, project, entity, store_path)
        analysis = analyse(run_set, sweeps, max_params=max_params, min_accuracy=min_accuracy)
    except CollectiveError as error:
        _fail(error)
    _require_runs(analysis, sweeps)
    _print_analysis(analysis, output_format)
    if plot_path:
        _write_plot(analysis, plot_path, output_format)


def _require_runs(analysis, sweeps: tuple[str, ...]) -> None:
    """Fail when nothing can be analysed, because every output needs at least one run."""
    from ..results.analysis import describe_excluded

    if analysis.runs_total == 0:
        scope = f"sweep {', '.join(sweeps)} of project" if sweeps else "project"
        _fail(CollectiveError(f"no runs in {scope} {analysis.project} ({analysis.location}); check --project and --store"))
    if not analysis.runs:
        excluded = describe_excluded(analysis)
        _fail(CollectiveError(f"no finished run with final/test_accuracy and model_params in project {analysis.project}. {excluded}"))


def _print_analysis(analysis, output_format: str) -> None:
    from ..results import report

    if output_format == "table":
        click.echo(report.render_table(analysis), nl=False)
    else:
        click.echo(report.render_csv(analysis) if output_format == "csv" else report.render_json(analysis), nl=False)
        # stdout carries only the data; the report's one-line notes go to stderr.
        excluded = report.describe_excluded(analysis)
        if excluded and output_format == "csv":
            click.echo(excluded, err=True)
        if analysis.constrained and analysis.choice is None and output_format == "csv":
            click.echo(report.none_qualifies_message(analysis), err=True)


def _write_plot(analysis, plot_path: str, output_format: str) -> None:
    from ..results.plot import write_plot

    try:
        written = write_plot(analysis, plot_path)
    except (OSError, ValueError) as error:
        _fail(CollectiveError(f"writing the plot to {plot_path} failed: {error}"))
    # The path goes with the table on stdout, but to stderr when stdout carries CSV or JSON.
    click.echo(f"Plot written to {written}", err=output_format != "table")


@results_group.command("export")
@click.argument("run_id")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--project", help="W&B project of the run [default: $WANDB_PROJECT or collective-model]; a local store is searched in every project.")
@click.option("--entity", help="W&B entity of the project.")
@click.option("--backend", type=click.Choice(["auto", "wandb", "local"]), help="Backend that recorded the run [default: auto, as for the analysis].")
@click.option("--store", "store_path", type=click.Path(dir_okay=False), help="Local SQLite store [env: COLLECTIVE_STORE].")
@click.pass_obj
def export_command(settings, run_id, directory, project, entity, backend, store_path) -> None:
    """Copy run RUN_ID's checkpoint and config into DIRECTORY, with a README on loading it.

    summary.json, metrics.jsonl and checkpoint_last.pt are copied too when the run folder has
    them. RUN_ID may be a unique prefix of the id. DIRECTORY must be new or empty.
    """
    from ..results.export import export_run, find_run
    from ..results.report import reload_command

    settings = settings or {}
    project = project or settings.get("project")
    entity = entity or settings.get("entity")
    backend = backend or settings.get("backend") or "auto"
    store_path = store_path or settings.get("store_path")
    try:
        run_set = _load_run_set(backend, project, entity, store_path, every_local_project=True)
        where = f"W&B project {run_set.location}" if run_set.backend == "wandb" else f"the local store {run_set.location}"
        run = find_run(run_set.runs, run_id, where)
        written = export_run(run, directory)
    except CollectiveError as error:
        _fail(error)

    folder = written[0].parent
    click.echo(f"Exported run {run.run_id} to {folder}: {', '.join(path.name for path in written)}")
    click.echo(f"Load it with: {reload_command(str(folder))}")
