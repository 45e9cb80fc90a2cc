"""One training run from a validated config: data, W&B, run folder, training and the record.

This is what `collective train` executes, under an agent or by hand.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import string
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

import click

from . import config as config_lib
from .errors import EXIT_DIVERGED, EXIT_FAILURE, EXIT_INTERRUPTED, CollectiveError, NonFiniteLossError
from .paths import resolve_project, resolve_runs_dir, resolve_store_path
from .tracking import RunFolder, Stopwatch, WandbRun, choose_wandb_mode, utc_now

log = logging.getLogger(__name__)

FINAL_KEYS = (
    "final/test_accuracy", "final/test_loss", "final/param_efficiency", "final/accuracy_per_million_params",
    "final/val_accuracy", "best_val_accuracy", "best_epoch", "model_params",
)

# Keys that change which examples are loaded and how they are split.
DATA_KEYS = ("dataset", "val_split", "train_subset", "seed")


@dataclass
class RunOptions:
    project: str | None = None
    entity: str | None = None
    data_dir: str | None = None
    runs_dir: str | None = None
    store_path: str | None = None
    quiet: bool = False
    download: bool = True


def new_run_id() -> str:
    """Return an 8-character run id of lowercase letters and digits, like W&B's own ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class RunInterrupted(CollectiveError):
    """The run was stopped by Ctrl-C or SIGTERM and recorded as killed."""

    exit_code = EXIT_INTERRUPTED


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so that the run is recorded as killed."""


def _raise_interrupted(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Interrupted()


def _say(options: RunOptions, message: str) -> None:
    if not options.quiet:
        click.echo(message, err=True)


def _epoch_line(metrics: Mapping[str, Any], epochs: int, seconds: float) -> str:
    return (
        f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train/loss']:.4f}  "
        f"train {metrics['train/accuracy']:.2f}%  val {metrics['val/accuracy']:.2f}%  "
        f"test {metrics['test/accuracy']:.2f}%  "
        f"eff {metrics['param_efficiency/test_accuracy_per_100k_params']:.3f}/100K  ({seconds:.1f}s)"
    )


def final_table(summary: Mapping[str, Any]) -> str:
    """Return the final metrics as an aligned two-column table."""
    rows = [(key, summary.get(key)) for key in FINAL_KEYS]
    rows += [("state", summary.get("state")), ("duration_s", summary.get("duration_s")), ("run_dir", summary.get("run_dir"))]
    width = max(len(k) for k, _ in rows)
    lines = []
    for key, value in rows:
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key.ljust(width)}  {text}")
    return "\n".join(lines)


def _progress_factory(options: RunOptions, total: int, epochs: int):
    if options.quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def factory(epoch: int):
        bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="img", leave=False, dynamic_ncols=True)

        class Progress:
            def __call__(self, count: int) -> None:
                bar.update(count)

            def close(self) -> None:
                bar.close()

        return Progress()

    return factory


def _record_standalone(store_path, summary: Mapping[str, Any]) -> None:
    """Add a run started by hand to the local store so that sweeps of its project learn from it."""
    from .sweeps.store import record_standalone_run

    try:
        record_standalone_run(resolve_store_path(store_path), dict(summary))
    except Exception as error:  # noqa: BLE001 - the run itself succeeded; the record is secondary
        log.warning("could not record run %s in the local store: %s", summary.get("run_id"), error)
        click.echo(f"Warning: run not recorded in the local store ({error})", err=True)


def execute_run(config: Mapping[str, Any], options: RunOptions) -> dict[str, Any]:
    """Train once and write every record; return the summary. Raises CollectiveError on failure."""
    import torch

    from .data import load_splits
    from .checkpoint import save_checkpoint
    from .models import build_model
    from .training import Trainer, resolve_device

    clock = Stopwatch()
    project = resolve_project(options.project)
    run_id = os.environ.get("WANDB_RUN_ID") or new_run_id()
    sweep_id = os.environ.get("COLLECTIVE_SWEEP_ID") or os.environ.get("WANDB_SWEEP_ID") or None
    derived = config_lib.derive_dimensions(config)

    # 1. Everything that can fail on bad input happens before any record is written.
    device = resolve_device(config["device"])
    if config["use_mixed_precision"] and device.type != "cuda":
        _say(options, "Note: use_mixed_precision applies to CUDA only; training in float32 on the CPU.")
    data = load_splits(dict(config), options.data_dir, device, options.download)
    mode, notice = choose_wandb_mode()

    # 2. Run folder and W&B run.
    folder = RunFolder(resolve_runs_dir(options.runs_dir) / run_id)
    folder.create(config, derived)
    if notice:
        _say(options, notice)
    _say(options, f"Run {run_id} ({project}{', sweep ' + sweep_id if sweep_id else ''}): {folder.path}")
    try:
        wandb_run = WandbRun.start(project=project, entity=options.entity, run_id=run_id, folder=folder.path, config=config, mode=mode)
    except Exception as error:  # noqa: BLE001 - W&B raises many types; all end the run the same way
        raise CollectiveError(f"W&B could not start the run ({error}); set WANDB_MODE=offline to log offline") from error

    # 3. Train with W&B's config after init, which includes the sweep's values.
    effective = wandb_run.effective_config()
    if effective is not None:
        effective = config_lib.validate({**config, **{k: v for k, v in effective.items() if k in config_lib.KEYS}})
        if effective != dict(config):
            changed = sorted(k for k in effective if effective[k] != config[k])
            log.info("W&B config differs from the resolved config in %s; training with W&B's values", changed)
            if any(k in DATA_KEYS for k in changed):
                data = load_splits(effective, options.data_dir, device, options.download)
            config, derived = effective, config_lib.derive_dimensions(effective)
            (folder.path / "config.yaml").write_text(config_lib.to_yaml(config, derived), encoding="utf-8")

    torch.manual_seed(config["seed"])
    model = build_model(config)
    params = model.num_parameters()
    summary: dict[str, Any] = {
        "run_id": run_id, "project": project, "sweep_id": sweep_id, "state": "running", "reason": None,
        "exit_code": None, "started_at": clock.started_at, "ended_at": None, "duration_s": None,
        "train_seconds": None, "run_dir": str(folder.path), "checkpoint": str(folder.checkpoint_path),
        "device": str(device), "wandb_mode": mode, "wandb_run_path": wandb_run.path,
        "data_source": data.source, "train_examples": len(data.train), "config": dict(config), "derived": derived, "model_params": params,
    }
    folder.write_summary(summary)
    _say(options, f"model_params {params:,}  train {len(data.train):,}  val {len(data.val):,}  test {len(data.test):,}  device {device}")

    # 4. Train; a new best validation accuracy rewrites checkpoint.pt, so a killed run keeps one.
    trainer = Trainer(model, data, config, device)
    epoch_started = time.perf_counter()

    def on_epoch(metrics: dict) -> None:
        nonlocal epoch_started
        folder.append_metrics(metrics)
        wandb_run.log(metrics)
        _say(options, _epoch_line(metrics, config["epochs"], time.perf_counter() - epoch_started))
        epoch_started = time.perf_counter()

    def on_best(state_dict: dict, epoch: int, val_accuracy: float) -> None:
        save_checkpoint(folder.checkpoint_path, state_dict, config, derived, epoch, val_accuracy)

    previous_term = signal.signal(signal.SIGTERM, _raise_interrupted)
    exit_code, failure = 0, None
    try:
        result = trainer.fit(on_epoch, on_best, _progress_factory(options, len(data.train), config["epochs"]))
    except NonFiniteLossError as error:
        summary.update(state="failed", reason=f"non-finite loss at epoch {error.epoch}, step {error.step}")
        exit_code, failure = EXIT_DIVERGED, error
    except KeyboardInterrupt as error:
        signal_name = "SIGTERM" if isinstance(error, _Interrupted) else "SIGINT (Ctrl-C)"
        summary.update(state="killed", reason=f"interrupted by {signal_name}")
        exit_code, failure = EXIT_INTERRUPTED, RunInterrupted(f"run {run_id} interrupted by {signal_name}; recorded as killed")
    except Exception as error:  # noqa: BLE001 - recorded as crashed, then re-raised
        summary.update(state="crashed", reason=f"{type(error).__name__}: {error}")
        exit_code, failure = EXIT_FAILURE, error
    else:
        summary.update(state="finished", train_seconds=round(result.train_seconds, 3), **result.final)
        if config["final_model"] == "last":
            last_path = folder.path / "checkpoint_last.pt"
            save_checkpoint(last_path, model.state_dict(), config, derived, config["epochs"], result.history[-1]["val/accuracy"])
            summary["checkpoint_last"] = str(last_path)
        wandb_run.log(result.final)
        wandb_run.summarise(result.final)
    finally:
        signal.signal(signal.SIGTERM, previous_term)

    # 5. Close the records, whatever happened.
    summary.update(exit_code=exit_code, ended_at=utc_now(), duration_s=round(clock.seconds(), 3))
    folder.write_summary(summary)
    wandb_run.finish(exit_code=exit_code)
    if sweep_id is None:
        _record_standalone(options.store_path, summary)

    if failure is not None:
        raise failure
    click.echo(final_table(summary))
    if mode == "offline":
        _say(options, f"W&B offline run saved; upload it later with: wandb sync {folder.path / 'wandb'}/offline-run-*")
    return summary
