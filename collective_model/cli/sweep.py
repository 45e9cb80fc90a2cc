"""`collective sweep create|list|show` and `collective agent`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import click

from .. import config as config_lib
from .. import paths
from ..errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CollectiveError

_STORE_HELP = "Local SQLite store [env: COLLECTIVE_STORE; default: .collective/store.db]."
_PROJECT_HELP = "Project [default: $WANDB_PROJECT or collective-model]."


def _fail(error: CollectiveError | str, exit_code: int | None = None) -> None:
    """Print an expected error to stderr and exit without a traceback."""
    click.echo(f"Error: {error}", err=True)
    code = exit_code if exit_code is not None else getattr(error, "exit_code", EXIT_FAILURE)
    sys.exit(code)


def _open_store(store_option: str | None, must_exist: bool = False):
    from ..sweeps.store import Store

    path = paths.resolve_store_path(store_option)
    if must_exist and not path.exists():
        _fail(f"no store at {path}; create a sweep first with `collective sweep create accuracy`, or pass --store", EXIT_FAILURE)
    return Store(path)


# --------------------------------------------------------------------------------------------
# sweep create
# --------------------------------------------------------------------------------------------


@click.group("sweep")
def sweep_group() -> None:
    """Create and inspect sweeps (local store or W&B)."""


@sweep_group.command("create")
@click.argument("sweep_file", metavar="accuracy|efficiency|FILE.yaml")
@click.option("--project", help=_PROJECT_HELP)
@click.option("--entity", help="W&B entity (team or user); wandb backend only [default: your W&B default entity].")
@click.option("--backend", type=click.Choice(["auto", "wandb", "local"]), default="auto", show_default=True,
              help="auto: wandb when W&B credentials exist and WANDB_MODE is not offline, else local.")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Pin a parameter to one value in the registered sweep, e.g. --set epochs=1 (repeatable).")
@click.option("--store", "store_option", type=click.Path(dir_okay=False), help=_STORE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="Print only the sweep id.")
def create_command(sweep_file, project, entity, backend, set_items, store_option, quiet) -> None:
    """Register a sweep in the project and print its id and the agent command.

    The file is checked against W&B's sweep schema and the config keys; every violation is
    listed and nothing is stored when one is found.
    """
    from ..sweeps import spec, wandb_backend

    chosen, reason = wandb_backend.choose_backend(backend)
    project = paths.resolve_project(project)
    try:
        path = spec.find_sweep_file(sweep_file)
        sweep_config = spec.load_sweep_file(path)
        try:
            pins = config_lib.parse_set_options(set_items)
        except config_lib.ConfigError as error:
            raise spec.SweepSpecError("--set", error.problems) from None
        sweep_config = spec.pin_parameters(sweep_config, pins)
        sweep_config, command_filled = spec.with_default_command(sweep_config)
        problems = spec.validate_sweep_config(sweep_config, chosen)
        if problems:
            raise spec.SweepSpecError(str(path), problems)
    except CollectiveError as error:
        _fail(error)

    name = spec.sweep_name(sweep_config, path)
    if command_filled and not quiet:
        click.echo(f"note: {path.name} has no command; using {' '.join(spec.DEFAULT_COMMAND)}", err=True)
    try:
        if chosen == "local":
            _create_local(sweep_config, name, path, project, reason, store_option, quiet)
        else:
            _create_wandb(sweep_config, name, project, entity, reason, quiet)
    except CollectiveError as error:
        _fail(error)


def _describe_sweep(name: str, sweep_config: Mapping[str, Any]) -> str:
    metric = sweep_config.get("metric") or {}
    target = f", {metric.get('goal')} {metric.get('name')}" if metric.get("name") else ""
    return f"{name}: {sweep_config.get('method')}{target}"


def _create_local(sweep_config, name, path, project, reason, store_option, quiet) -> None:
    with _open_store(store_option) as store:
        sweep = store.create_sweep(project, name, sweep_config, backend="local", source=str(path))
    sweep_id = sweep["sweep_id"]
    if quiet:
        click.echo(sweep_id)
        return
    store_flag = f" --store {store_option}" if store_option else ""
    click.echo(f"backend: local ({reason})")
    click.echo(f"created sweep {sweep_id} ({_describe_sweep(name, sweep_config)}) in project {project}")
    click.echo(f"store: {paths.resolve_store_path(store_option)}")
    click.echo(f"run an agent in each terminal: collective agent {sweep_id}{store_flag}")


def _create_wandb(sweep_config, name, project, entity, reason, quiet) -> None:
    from ..sweeps import wandb_backend

    sweep_id, prior = wandb_backend.create_sweep(sweep_config, project, entity)
    path = "/".join(part for part in (entity, project, sweep_id) if part)
    if quiet:
        click.echo(path)
        return
    click.echo(f"backend: wandb ({reason})")
    click.echo(f"created W&B sweep {path} ({_describe_sweep(name, sweep_config)})")
    skipped = sum(prior.skipped.values())
    click.echo(f"prior runs attached: {len(prior.run_ids)} of {len(prior.run_ids) + skipped} runs in the project")
    for skip_reason, count in prior.skipped.most_common():
        click.echo(f"  not attached: {count} run(s), {skip_reason} (e.g. {prior.examples[skip_reason]})")
    click.echo(f"run an agent in each terminal: wandb agent {path}   (or: collective agent {path})")


# --------------------------------------------------------------------------------------------
# sweep list / show
# --------------------------------------------------------------------------------------------


def _run_record(run: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "run_id", "sweep_id", "sweep_name", "state", "exit_code", "reason", "duration_s", "created_at", "ended_at",
        "informed_by_own", "informed_by_other", "run_dir", "log_path", "config", "summary",
    )
    return {key: run.get(key) for key in keys}


def _sweep_record(sweep: Mapping[str, Any], runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    from ..sweeps.overview import best_run, counts_by_state, metric_value

    best = best_run(runs, sweep["metric"], sweep["goal"])
    return {
        "sweep_id": sweep["sweep_id"],
        "name": sweep["name"],
        "project": sweep["project"],
        "method": sweep["method"],
        "metric": sweep["metric"],
        "goal": sweep["goal"],
        "created_at": sweep["created_at"],
        "counts": counts_by_state(runs),
        "best_run_id": best["run_id"] if best else None,
        "best_value": metric_value(best, sweep["metric"]) if best else None,
        "config": sweep["config"],
    }


def _echo_json(data: Any) -> None:
    from ..sweeps.overview import json_safe

    click.echo(json.dumps(json_safe(data), indent=2, allow_nan=False))


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in [header, *rows]:
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())


@sweep_group.command("list")
@click.option("--project", help=_PROJECT_HELP)
@click.option("--store", "store_option", type=click.Path(dir_okay=False), help=_STORE_HELP)
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: every sweep with every run's config, state, summary and informed-by counts.")
def list_command(project, store_option, output_format) -> None:
    """List the project's local sweeps with run counts by state and the best run so far."""
    from ..sweeps.overview import format_number

    project = paths.resolve_project(project)
    try:
        with _open_store(store_option, must_exist=True) as store:
            store.reap_orphans()
            sweeps = store.list_sweeps(project)
            runs = store.list_runs(project)
    except CollectiveError as error:
        _fail(error)

    records = [_sweep_record(s, [r for r in runs if r["sweep_id"] == s["sweep_id"]]) for s in sweeps]
    standalone = [r for r in runs if r["sweep_id"] is None]
    if output_format == "json":
        for record in records:
            record["runs"] = [_run_record(r) for r in runs if r["sweep_id"] == record["sweep_id"]]
        _echo_json({"project": project, "sweeps": records, "standalone_runs": [_run_record(r) for r in standalone]})
        return

    if not records:
        click.echo(f"no sweeps in project {project}; create one with `collective sweep create accuracy`")
        return
    header = ["sweep", "name", "method", "metric", "runs", "running", "finished", "failed", "crashed", "killed", "best", "best run"]
    rows = []
    for record in records:
        counts = record["counts"]
        goal = {"maximize": "max", "minimize": "min"}.get(record["goal"], "")
        rows.append([
            record["sweep_id"], record["name"], record["method"], f"{goal} {record['metric'] or '-'}".strip(),
            str(sum(counts.values())), *(str(counts[s]) for s in ("running", "finished", "failed", "crashed", "killed")),
            format_number(record["best_value"]), record["best_run_id"] or "-",
        ])
    click.echo(f"project {project}")
    _echo_table(header, rows)
    if standalone:
        click.echo(f"standalone runs (collective train outside an agent): {len(standalone)}")


@sweep_group.command("show")
@click.argument("sweep_id")
@click.option("--store", "store_option", type=click.Path(dir_okay=False), help=_STORE_HELP)
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: the sweep and every run with its config, state, summary and informed-by counts.")
def show_command(sweep_id, store_option, output_format) -> None:
    """Show a local sweep: its runs with state, metric, model_params, informed-by counts and duration."""
    from ..sweeps.overview import format_number, metric_value

    try:
        with _open_store(store_option, must_exist=True) as store:
            store.reap_orphans()
            sweep = store.get_sweep(sweep_id)
            if sweep is None:
                _fail(f"sweep {sweep_id} not found in the store {store.path}; list sweeps with `collective sweep list`", EXIT_USAGE)
            runs = store.list_runs(sweep_id=sweep_id)
    except CollectiveError as error:
        _fail(error)

    record = _sweep_record(sweep, runs)
    if output_format == "json":
        record["runs"] = [_run_record(r) for r in runs]
        _echo_json(record)
        return

    counts = ", ".join(f"{count} {state}" for state, count in record["counts"].items() if count)
    click.echo(f"sweep {sweep_id} ({_describe_sweep(sweep['name'], sweep['config'])}) in project {sweep['project']}")
    click.echo(f"runs: {len(runs)}" + (f" ({counts})" if counts else ""))
    if record["best_run_id"]:
        click.echo(f"best so far: {sweep['metric']} = {format_number(record['best_value'])} (run {record['best_run_id']})")
    if not runs:
        click.echo(f"no runs yet; start one with `collective agent {sweep_id}`")
        return
    header = ["run", "state", sweep["metric"] or "metric", "model_params", "informed own/other", "duration_s", "reason"]
    rows = []
    for run in runs:
        reason = run["reason"] or ""
        rows.append([
            run["run_id"], run["state"], format_number(metric_value(run, sweep["metric"])),
            format_number(metric_value(run, "model_params")),
            f"{format_number(run['informed_by_own'])}/{format_number(run['informed_by_other'])}",
            format_number(round(run["duration_s"], 1) if run["duration_s"] is not None else None),
            reason if len(reason) <= 60 else reason[:57] + "...",
        ])
    _echo_table(header, rows)


# --------------------------------------------------------------------------------------------
# agent
# --------------------------------------------------------------------------------------------


@click.command("agent")
@click.argument("sweep_id")
@click.option("--count", type=click.IntRange(min=1), help="Number of runs to start [default: until the sweep is complete or stopped].")
@click.option("--max-failures", type=click.IntRange(min=1), default=5, show_default=True,
              help="Stop after this many runs in a row fail, crash or are killed.")
@click.option("--store", "store_option", type=click.Path(dir_okay=False), help=_STORE_HELP)
@click.option("--runs-dir", type=click.Path(file_okay=False), help="Folder for run folders and logs [env: COLLECTIVE_RUNS_DIR; default: .collective/runs].")
@click.option("--backend", type=click.Choice(["auto", "wandb", "local"]), default="auto", show_default=True,
              help="Where to look up SWEEP_ID when it is not in the local store.")
@click.option("--project", help="W&B project of a W&B sweep id without one.")
@click.option("--entity", help="W&B entity of a W&B sweep id without one.")
def agent_command(sweep_id, count, max_failures, store_option, runs_dir, backend, project, entity) -> None:
    """Run a sweep's trials one after another.

    A local sweep's runs start its command (`collective train`) as subprocesses. A W&B sweep id
    (ENTITY/PROJECT/ID, or an id not in the local store with the wandb backend) is handed to
    wandb's own agent. Ctrl-C once: the current run is interrupted and recorded killed, and no
    new run starts; twice: the run is terminated.
    """
    from ..sweeps import wandb_backend

    store_path = paths.resolve_store_path(store_option)
    local_sweep = None
    if "/" not in sweep_id and backend != "wandb" and store_path.exists():
        try:
            with _open_store(store_option) as store:
                local_sweep = store.get_sweep(sweep_id)
        except CollectiveError as error:
            _fail(error)

    if local_sweep is None:
        chosen, reason = wandb_backend.choose_backend(backend)
        if "/" in sweep_id or chosen == "wandb":
            click.echo(f"sweep {sweep_id} is not in the local store; handing over to wandb agent ({reason})", err=True)
            try:
                wandb_backend.run_agent(sweep_id, project, entity, count, max_failures)
            except CollectiveError as error:
                _fail(error)
            return
        _fail(
            f"sweep {sweep_id} not found in the store {store_path}; list local sweeps with `collective sweep list`, "
            "or pass --backend wandb for a W&B sweep",
            EXIT_USAGE,
        )

    _run_local_agent(local_sweep, count, max_failures, store_path, paths.resolve_runs_dir(runs_dir))


def _run_local_agent(sweep, count, max_failures, store_path: Path, runs_dir: Path) -> None:
    from ..sweeps.agent import AgentOptions, LocalAgent
    from ..sweeps.overview import best_run, format_number, metric_value
    from ..sweeps.store import Store

    metric, goal = sweep["metric"], sweep["goal"]
    click.echo(f"agent for sweep {sweep['sweep_id']} ({_describe_sweep(sweep['name'], sweep['config'])}), "
               f"project {sweep['project']}, runs in {runs_dir}")

    def on_start(run: Mapping[str, Any]) -> None:
        click.echo(f"run {run['run_id']} started (informed by {run['informed_by_own']} own / "
                   f"{run['informed_by_other']} other runs); log {run['log_path']}")

    def on_end(outcome) -> None:
        best = best_run(store.list_runs(sweep_id=sweep["sweep_id"]), metric, goal)
        best_text = f"{format_number(metric_value(best, metric))} (run {best['run_id']})" if best else "-"
        line = (f"run {outcome.run_id} {outcome.state} in {outcome.duration_s:.1f} s: "
                f"{metric}={format_number(outcome.summary.get(metric))} "
                f"model_params={format_number(outcome.summary.get('model_params'))}; best so far {best_text}")
        if outcome.state != "finished":
            line += f"; exit code {outcome.exit_code}: {outcome.reason}"
        click.echo(line)

    try:
        with Store(store_path) as store:
            options = AgentOptions(store_path=store_path, runs_dir=runs_dir, count=count, max_consecutive_failures=max_failures)
            report = LocalAgent(store, sweep["sweep_id"], options, on_start=on_start, on_end=on_end).run()
    except CollectiveError as error:
        _fail(error)

    finished = sum(1 for o in report.outcomes if o.state == "finished")
    click.echo(f"agent stopped: {report.stop_reason}; {finished} of {len(report.outcomes)} runs finished")
    if report.failed_too_often:
        click.echo("Error: the agent stopped after these runs in a row did not finish:", err=True)
        for outcome in report.consecutive_failures():
            click.echo(f"  run {outcome.run_id}: {outcome.state}, exit code {outcome.exit_code}, {outcome.reason}; log {outcome.log_path}", err=True)
        sys.exit(EXIT_FAILURE)
    if report.interrupted:
        sys.exit(EXIT_INTERRUPTED)
