"""Saving and reloading the best-validation checkpoint of a run folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import validate
from .models import CollectiveModel

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, state_dict: Mapping[str, Any], config: Mapping[str, Any], derived: Mapping[str, Any],
                    epoch: int, val_accuracy: float) -> None:
    """Write weights with the config that rebuilds them; atomic, so a killed run leaves a whole file."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": dict(config),
        "derived": dict(derived),
        "epoch": epoch,
        "val_accuracy": val_accuracy,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    temporary = path.with_suffix(".pt.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_model(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> CollectiveModel:
    """Rebuild the model of a run folder (or a checkpoint file) and load its weights, in eval mode.

    One-liner: ``python -c "import collective_model; m = collective_model.load_model('RUN_DIR')"``.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; a run writes checkpoint.pt after its first epoch")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = CollectiveModel(validate(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.to(map_location)
    return model.eval()
