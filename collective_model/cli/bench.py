"""`collective bench`: training speed against a conventional pipeline and the arithmetic bound."""

from __future__ import annotations

import json

import click

from ..errors import CollectiveError


@click.command("bench")
@click.option("--quick", is_flag=True,
              help="Measure 6,400 training samples per figure instead of full epochs, and peak memory on a "
                   "6,400-sample run: about 1 minute on 2 idle CPU cores instead of about 4, and noisier.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device for both pipelines; on CUDA the product trains with autocast.")
@click.option("--rounds", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Interleaved repetitions of every measurement; each figure is the best round.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder searched first for Fashion-MNIST [env: COLLECTIVE_DATA_DIR].")
def bench_command(quick: bool, device: str, rounds: int, data_dir: str | None) -> None:
    """Measure training throughput against a conventional pipeline and the arithmetic bound.

    Runs on real Fashion-MNIST at the reference config, in one process. (a) The product's
    training throughput with and without augmentation, and its evaluation throughput. (b) A
    conventional pipeline: torchvision dataset with PIL transforms, DataLoader with 2 workers,
    members run one by one. (c) The bound 6 x model_params x samples at the measured float32
    matmul rate. Then the start-up time and peak memory of `collective train` subprocesses.
    Prints a table and, as the last line, one JSON object with every figure.
    """
    import torch

    from ..benchmark import BenchSettings, format_table, run_benchmark

    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available; use --device cpu or auto", param_hint="--device")
    settings = BenchSettings(
        quick=quick, device=device, rounds=rounds, data_dir=data_dir,
        progress=lambda message: click.echo(message, err=True),
    )
    try:
        results = run_benchmark(settings)
    except CollectiveError as error:
        raise click.ClickException(str(error)) from None
    click.echo(format_table(results))
    click.echo(json.dumps(results))
