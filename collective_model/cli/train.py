"""`collective train`: one training run, started by hand or by a sweep agent."""

from __future__ import annotations

import os
import sys

import click

from .. import config as config_lib
from ..errors import EXIT_USAGE, CollectiveError


def resolve_config(config_file: str | None, set_items: tuple[str, ...]) -> dict:
    """Merge defaults < --config < --set < WANDB_SWEEP_PARAM_PATH and validate."""
    file_values = config_lib.load_config_file(config_file) if config_file else {}
    set_values = config_lib.parse_set_options(set_items)
    sweep_path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    sweep_values = config_lib.load_sweep_params(sweep_path) if sweep_path else {}
    return config_lib.resolve(file_values, set_values, sweep_values)


def _epilog() -> str:
    return "Configuration keys (set with --config FILE.yaml or --set key=value):\n\n" + config_lib.describe_keys()


class _KeysEpilogCommand(click.Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write("\n")
        for line in _epilog().splitlines():
            formatter.write(line + "\n")


@click.command("train", cls=_KeysEpilogCommand)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file with a flat mapping of config keys.")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE", help="Override one key; the value is parsed as YAML (repeatable).")
@click.option("--project", help="W&B project and store project [default: $WANDB_PROJECT or collective-model].")
@click.option("--entity", help="W&B entity (team or user) for online runs.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Folder with the dataset files; when set, the only folder searched [env: COLLECTIVE_DATA_DIR; "
                   "default: the user cache, then system dataset folders].")
@click.option("--download/--no-download", default=True, show_default=True,
              help="Download with torchvision when no valid files are found (into --data-dir or the user cache).")
@click.option("--runs-dir", type=click.Path(file_okay=False), help="Folder for run folders [env: COLLECTIVE_RUNS_DIR; default: .collective/runs].")
@click.option("--store", "store_path", type=click.Path(dir_okay=False), help="Local SQLite store [env: COLLECTIVE_STORE; default: .collective/store.db].")
@click.option("--print-config", is_flag=True, help="Print the resolved config and derived dimensions, then exit without training.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the final table.")
def train_command(config_file, set_items, project, entity, data_dir, download, runs_dir, store_path, print_config, quiet) -> None:
    """Train the Collective Model once and log every metric to W&B and the run folder.

    Precedence of config sources: defaults < --config < --set < the sweep's values when
    started by an agent (WANDB_SWEEP_PARAM_PATH). W&B runs online when credentials exist and
    WANDB_MODE is not offline; otherwise offline, to sync later with `wandb sync`.
    """
    try:
        config = resolve_config(config_file, set_items)
    except config_lib.ConfigError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_USAGE)

    if print_config:
        click.echo(config_lib.to_yaml(config, config_lib.derive_dimensions(config)), nl=False)
        return

    from ..run import RunOptions, execute_run

    options = RunOptions(
        project=project, entity=entity, data_dir=data_dir, runs_dir=runs_dir,
        store_path=store_path, quiet=quiet, download=download,
    )
    try:
        execute_run(config, options)
    except CollectiveError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(error.exit_code)
