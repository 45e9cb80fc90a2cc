"""Locations of the project name, the local store, run folders and dataset folders.

Each resolver takes the command-line value first, then an environment variable, then a default
under the working directory's `.collective/`.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PROJECT = "collective-model"
STATE_DIR = ".collective"


def resolve_project(explicit: str | None = None) -> str:
    """Return the project: --project, then $WANDB_PROJECT, then 'collective-model'."""
    return explicit or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def resolve_store_path(explicit: str | os.PathLike | None = None) -> Path:
    """Return the SQLite store file: --store, then $COLLECTIVE_STORE, then .collective/store.db."""
    value = explicit or os.environ.get("COLLECTIVE_STORE") or Path(STATE_DIR) / "store.db"
    return Path(value).expanduser().absolute()


def resolve_runs_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Return the folder that contains run folders: --runs-dir, $COLLECTIVE_RUNS_DIR, .collective/runs."""
    value = explicit or os.environ.get("COLLECTIVE_RUNS_DIR") or Path(STATE_DIR) / "runs"
    return Path(value).expanduser().absolute()


def user_cache_dir() -> Path:
    """Return the per-user cache for downloaded datasets ($XDG_CACHE_HOME/collective)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "collective"
