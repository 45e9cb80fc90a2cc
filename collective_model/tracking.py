"""Tracking: the W&B run (online or offline) and the local run folder.

The run folder contains ``config.yaml`` (inputs and derived dimensions), ``metrics.jsonl`` (one
JSON object per epoch: the dict logged to W&B), ``summary.json`` (final metrics, state,
timing, W&B ids) and ``checkpoint.pt``. W&B's own files go to ``<run folder>/wandb/``.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from .config import to_yaml

log = logging.getLogger(__name__)

DEFAULT_WANDB_HOST = "api.wandb.ai"


def wandb_credentials_exist() -> bool:
    """Return True when W&B has an API key: $WANDB_API_KEY or a netrc entry for the W&B host.

    The key itself is never read into a message or a file here.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "")).hostname or DEFAULT_WANDB_HOST
    netrc_path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(str(netrc_path)).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def choose_wandb_mode() -> tuple[str, str | None]:
    """Return (mode, notice): online with credentials unless WANDB_MODE sets another mode.

    The notice is a one-line message for the user, or None when nothing needs saying.
    """
    requested = (os.environ.get("WANDB_MODE") or "").strip().lower()
    if requested in ("disabled",):
        return "disabled", "W&B is disabled (WANDB_MODE=disabled); the run folder still records everything."
    if requested in ("offline", "dryrun"):
        return "offline", None
    if wandb_credentials_exist():
        return "online", None
    return "offline", "W&B: no credentials found, logging offline (run `wandb login` to log online)."


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_value(value: Any) -> Any:
    # JSON has no NaN or infinity; a non-finite number is stored as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunFolder:
    """Writes the local record of one run."""

    def __init__(self, path: Path):
        self.path = path
        self.metrics_path = path / "metrics.jsonl"
        self.summary_path = path / "summary.json"
        self.checkpoint_path = path / "checkpoint.pt"

    def create(self, config: Mapping[str, Any], derived: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=False)
        (self.path / "config.yaml").write_text(to_yaml(config, derived), encoding="utf-8")
        self.metrics_path.touch()

    def append_metrics(self, metrics: Mapping[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: _json_value(v) for k, v in metrics.items()}) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        # Write to a temporary file and rename, so a reader never sees half a summary.
        temporary = self.summary_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps({k: _json_value(v) for k, v in summary.items()}, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.summary_path)


class WandbRun:
    """A thin wrapper over one wandb run; every call is a no-op when W&B is disabled."""

    def __init__(self, run=None, mode: str = "disabled"):
        self.run = run
        self.mode = mode

    @classmethod
    def start(cls, *, project: str, entity: str | None, run_id: str, folder: Path, config: Mapping[str, Any], mode: str) -> "WandbRun":
        if mode == "disabled":
            return cls()
        import wandb

        run = wandb.init(
            project=project,
            entity=entity,
            id=run_id,
            dir=str(folder),
            config=dict(config),
            mode=mode,
            settings=wandb.Settings(quiet=True, silent=True, console="off", x_disable_stats=True),
        )
        return cls(run, mode)

    def effective_config(self) -> dict[str, Any] | None:
        """Return wandb.config after init (it includes the sweep's values), or None when disabled."""
        if self.run is None:
            return None
        return {k: v for k, v in dict(self.run.config).items() if not k.startswith("_")}

    @property
    def path(self) -> str | None:
        return None if self.run is None else "/".join(p for p in (self.run.entity, self.run.project, self.run.id) if p)

    def log(self, metrics: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.log(dict(metrics))

    def summarise(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class Stopwatch:
    def __init__(self):
        self.started_at = utc_now()
        self._start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self._start
