"""`collective bench` (placeholder until the benchmark lands)."""

import click


@click.command("bench")
def bench_command() -> None:
    """Measure training throughput against a conventional pipeline."""
    raise click.ClickException("not implemented yet")
