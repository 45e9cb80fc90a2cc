"""The `collective` command: a thin shell over the library.

Each subcommand lives in its own module and imports torch or wandb only inside its function, so
`collective --help` stays fast.
"""

import logging

import click

from .. import __version__
from .sweep import agent_command, sweep_group
from .results import results_group
from .train import train_command
from .bench import bench_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="collective")
@click.option("-v", "--verbose", count=True, help="Log diagnostics to stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Train the Collective Model and run accuracy and parameter-efficiency sweeps.

    Typical session: `collective train` for one run; `collective sweep create accuracy` and
    `collective sweep create efficiency`, then one `collective agent ID` per terminal;
    `collective results` for the Pareto frontier.
    """
    levels = {0: logging.WARNING, 1: logging.INFO}
    level = levels.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


main.add_command(train_command)
main.add_command(sweep_group)
main.add_command(agent_command)
main.add_command(results_group)
main.add_command(bench_command)
