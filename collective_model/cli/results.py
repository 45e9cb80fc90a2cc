"""`collective results` (placeholder until results land)."""

import click


@click.group("results", invoke_without_command=True)
def results_group() -> None:
    """Best run per sweep, Pareto frontier and deployment choice."""
    raise click.ClickException("not implemented yet")
