"""The W&B backend: choose a backend, create sweeps on W&B with prior runs, hand agents to wandb.

wandb is imported inside the functions that talk to W&B, so the local backend never loads it.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..errors import CollectiveError
from .search import fit_to_parameters

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"


class WandbBackendError(CollectiveError):
    """W&B could not be used: wandb missing, no credentials, or the W&B call failed."""


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------


def credentials_source(env: Mapping[str, str] | None = None) -> str | None:
    """Return where W&B credentials come from (an env var name or a netrc path), or None.

    Mirrors wandb 0.31's lookup order: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, then a
    netrc entry (file from $NETRC, else ~/.netrc) for the host of WANDB_BASE_URL. The key
    itself is never read out or returned.
    """
    env = os.environ if env is None else env
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if env.get(name):
            return name
    host = urlsplit(env.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).netloc
    path = env.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None
    return path if entry and entry[2] else None


def choose_backend(requested: str, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Return (backend, reason) for --backend auto|wandb|local.

    auto picks wandb when credentials exist and WANDB_MODE is not offline (or disabled), else local.
    """
    env = os.environ if env is None else env
    if requested in ("local", "wandb"):
        return requested, f"--backend {requested}"
    mode = (env.get("WANDB_MODE") or "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return "local", f"WANDB_MODE={mode}"
    source = credentials_source(env)
    if source is None:
        return "local", "no W&B credentials (WANDB_API_KEY or a netrc entry; run `wandb login` to add one)"
    return "wandb", f"W&B credentials found in {source}"


# --------------------------------------------------------------------------------------------
# Sweep creation
# --------------------------------------------------------------------------------------------


@dataclass
class PriorRuns:
    """The project's runs that a new W&B sweep gets as prior runs, and why others were left out."""

    run_ids: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict[str, str] = field(default_factory=dict)  # reason -> one run id


def select_prior_runs(api_runs: Any, sweep_config: Mapping[str, Any]) -> PriorRuns:
    """Return the finished runs that carry the sweep's metric and fit its parameter space."""
    metric = (sweep_config.get("metric") or {}).get("name")
    parameters = sweep_config.get("parameters") or {}
    prior = PriorRuns()
    for run in api_runs:
        reason = _prior_run_problem(run, metric, parameters)
        if reason is None:
            prior.run_ids.append(run.id)
            continue
        prior.skipped[reason] += 1
        prior.examples.setdefault(reason, run.id)
    return prior


def _prior_run_problem(run: Any, metric: str | None, parameters: Mapping[str, Any]) -> str | None:
    if run.state != "finished":
        return f"state {run.state}, not finished"
    value = (run.summary_metrics or {}).get(metric) if metric else None
    if metric and not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return f"no {metric} in the summary"
    _, misfit = fit_to_parameters(parameters, dict(run.config or {}))
    if misfit is None:
        return None
    # Grouped by parameter, not by value, so the report stays short.
    return f"missing parameter {misfit.parameter}" if misfit.missing else f"{misfit.parameter} outside the sweep's space"


def create_sweep(sweep_config: Mapping[str, Any], project: str, entity: str | None) -> tuple[str, PriorRuns]:
    """Create the sweep on W&B with the project's fitting finished runs attached; return (id, prior runs).

    The prior runs are read with ``wandb.Api().runs("ENTITY/PROJECT")`` and passed to
    ``wandb.sweep(..., prior_runs=ids)``.
    """
    wandb = _import_wandb()
    try:
        api = wandb.Api()
        path = f"{entity}/{project}" if entity else project
        prior = select_prior_runs(api.runs(path), sweep_config)
        sweep_id = wandb.sweep(dict(sweep_config), entity=entity, project=project, prior_runs=prior.run_ids)
    except CollectiveError:
        raise
    except Exception as error:  # wandb raises many types (CommError, ValueError, HTTP errors)
        raise WandbBackendError(f"creating the sweep on W&B in project {project!r} failed: {error}") from error
    return sweep_id, prior


def run_agent(sweep_path: str, project: str | None, entity: str | None, count: int | None, max_failures: int) -> None:
    """Hand over to wandb's own agent, which runs the sweep's command for each trial."""
    wandb = _import_wandb()
    try:
        wandb.agent(sweep_path, entity=entity, project=project, count=count, max_consecutive_failed_runs=max_failures)
    except Exception as error:  # see create_sweep
        raise WandbBackendError(f"wandb agent for sweep {sweep_path!r} failed: {error}") from error


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as error:
        raise WandbBackendError(f"the wandb backend needs the wandb package ({error}); run `pip install 'wandb[sweeps]'`") from None
    return wandb
