"""`collective results export`: copy a run's checkpoint and config into a folder for deployment."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from ..errors import EXIT_USAGE, CollectiveError
from .frontier import format_params
from .sources import ResultRun

# Files copied from the run folder; the checkpoint and the config are required.
REQUIRED_FILES = ("checkpoint.pt", "config.yaml")
OPTIONAL_FILES = ("checkpoint_last.pt", "summary.json", "metrics.jsonl")


class ExportUsageError(CollectiveError):
    """An export request that names an unknown run or an unusable destination."""

    exit_code = EXIT_USAGE


def find_run(runs: list[ResultRun], run_id: str, where: str) -> ResultRun:
    """Return the run with this id, or the only one whose id starts with it; raise ExportUsageError."""
    exact = [run for run in runs if run.run_id == run_id]
    if exact:
        return exact[0]
    matches = [run for run in runs if run.run_id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        ids = ", ".join(sorted(run.run_id for run in matches))
        raise ExportUsageError(f"run id prefix {run_id!r} matches {len(matches)} runs in {where} ({ids}); give more characters")
    raise ExportUsageError(
        f"run {run_id!r} not found in {where}; check the id (`collective results` lists the "
        "frontier, `collective sweep show ID` every run of a sweep)"
    )


def export_run(run: ResultRun, destination: str | Path) -> list[Path]:
    """Copy the run's checkpoint and config.yaml, and the optional files, into ``destination`` with a README.

    The destination must not exist or be an empty folder. Files are first written to a
    temporary folder beside it and then moved into place, so a failed export leaves nothing
    behind. Returns the written files.
    """
    destination = Path(destination).absolute()
    if destination.exists() and not destination.is_dir():
        raise ExportUsageError(f"export destination {destination} is a file; give a new or empty folder")
    if destination.is_dir() and any(destination.iterdir()):
        raise ExportUsageError(f"export destination {destination} is not empty; give a new or empty folder")

    if not run.run_dir:
        raise CollectiveError(f"run {run.run_id} has no run folder in its record, so there is no checkpoint to export")
    run_dir = Path(run.run_dir)
    required = list(REQUIRED_FILES)
    if run.checkpoint_path is not None and run.checkpoint_path.name not in required:
        required.append(run.checkpoint_path.name)
    missing = [name for name in required if not (run_dir / name).is_file()]
    if missing:
        raise CollectiveError(
            f"run {run.run_id}: {', '.join(missing)} not found in its run folder {run_dir}; "
            "a run that failed before its first validation, or one trained on another machine, has no checkpoint here"
        )

    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    except OSError as error:
        raise CollectiveError(f"exporting run {run.run_id} to {destination} failed: {error}") from error
    try:
        # mkdtemp creates the folder as 0700; give it the permissions a new folder gets here.
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        copied = []
        for name in REQUIRED_FILES + OPTIONAL_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, staging / name)
                copied.append(name)
        (staging / "README.md").write_text(readme_text(run, copied), encoding="utf-8")
        # os.replace swaps the staging folder in for a missing or empty destination in one step.
        os.replace(staging, destination)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise CollectiveError(f"exporting run {run.run_id} to {destination} failed: {error}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sorted(destination.iterdir())


def readme_text(run: ResultRun, copied: list[str]) -> str:
    """Return the exported folder's README: what the model is and how to load it."""
    config = _read_config(Path(run.run_dir) / "config.yaml") if run.run_dir else {}
    derived = config.get("derived") if isinstance(config.get("derived"), dict) else {}
    input_dim = derived.get("input_dim", "input_dim")
    num_classes = derived.get("num_classes", "num_classes")
    sweep = f"sweep {run.sweep_name} ({run.sweep_id})" if run.sweep_id else "a standalone run (no sweep)"
    uses_last = run.checkpoint_path is not None and run.checkpoint_path.name == "checkpoint_last.pt"

    lines = [
        f"# Collective Model, run {run.run_id}",
        "",
        f"Exported from project {run.project}, {sweep}.",
        "",
    ]
    if run.test_accuracy is not None and run.model_params is not None:
        weights = "the last epoch's weights (`checkpoint_last.pt`)" if uses_last else "`checkpoint.pt`"
        lines += [
            f"Final metrics, measured on {weights}:",
            "",
            f"- final/test_accuracy: {run.test_accuracy:.2f} %",
            f"- model_params: {run.model_params:,} ({format_params(run.model_params)})",
            f"- test accuracy per 100K parameters: {run.efficiency:.2f}",
            "",
        ]
    descriptions = {
        "checkpoint.pt": "the weights with the best validation accuracy, with the config that rebuilds them",
        "checkpoint_last.pt": "the weights after the last epoch (written for `final_model: last`)",
        "config.yaml": "the resolved config the model was built from, with its derived dimensions",
        "summary.json": "the run's final metrics and state",
        "metrics.jsonl": "one line of metrics per epoch",
    }
    lines += ["Files:", ""]
    lines += [f"- `{name}`: {descriptions[name]}" for name in copied]
    load_target = '"checkpoint_last.pt"' if uses_last else '"."'
    lines += [
        "",
        "Load it with the `collective-model` package installed; `load_model` takes this folder",
        "(it reads `checkpoint.pt`) or a checkpoint file, and returns the model in eval mode:",
        "",
        "```python",
        "import collective_model",
        "",
        f"model = collective_model.load_model({load_target})  # relative to this folder",
        f"logits = model(x)  # x: float tensor of shape (batch, {input_dim})",
        f"predictions = logits.argmax(dim=1)  # class indices 0 to {_last_class(num_classes)}",
        "```",
        "",
        _input_text(config.get("dataset")),
        "",
    ]
    return "\n".join(lines)


def _input_text(dataset: str | None) -> str:
    """Describe the input preprocessing `collective train` applied for this dataset."""
    generic = "Each row of x is an image flattened to channels x height x width, preprocessed as `collective train` does for the dataset in `config.yaml`."
    try:
        from ..data import SPECS
    except ImportError:
        return generic
    spec = SPECS.get(dataset) if dataset else None
    if spec is None:
        return generic
    channels, height, width = spec.image_shape
    return (
        f"Each row of x is one {dataset} image of {channels} x {height} x {width} pixels, flattened in that "
        f"order, with pixel values scaled to [0, 1] and then normalised per channel as (value - mean) / std "
        f"with mean {list(spec.mean)} and std {list(spec.std)}, as `collective train` does."
    )


def _last_class(num_classes) -> str:
    return str(num_classes - 1) if isinstance(num_classes, int) else "num_classes - 1"


def _read_config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}

