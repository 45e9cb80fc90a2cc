"""`collective sweep create|list|show` and `collective agent` (placeholder until sweeps land)."""

import click


@click.group("sweep")
def sweep_group() -> None:
    """Create and inspect sweeps (local store or W&B)."""


@click.command("agent")
@click.argument("sweep_id")
def agent_command(sweep_id: str) -> None:
    """Run the trials of a sweep one after another."""
    raise click.ClickException("not implemented yet")
