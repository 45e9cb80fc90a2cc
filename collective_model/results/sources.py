"""Sources of a project's runs: the local store or W&B's public API.

Both sources produce the same records (``ResultRun`` and ``SweepInfo``), so the analysis, the
plot and the export never see which backend a run lives on.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import CollectiveError
from .frontier import efficiency_per_100k

logger = logging.getLogger(__name__)

ACCURACY_METRIC = "final/test_accuracy"
PARAMS_METRIC = "model_params"
FINISHED = "finished"
MISSING_METRICS = "missing metrics"  # exclusion reason of a finished run without accuracy or size

# Page size for W&B's run listing; the iteration below still fetches every page.
WANDB_PAGE_SIZE = 100


@dataclass(frozen=True)
class SweepInfo:
    """A sweep of the project: its id, name and the metric its search optimises."""

    sweep_id: str
    name: str
    metric: str | None
    goal: str | None
    created_at: str | None = None


@dataclass
class ResultRun:
    """One run of a project in the form the results analysis uses, from either backend."""

    run_id: str
    project: str
    state: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    sweep_id: str | None = None
    sweep_name: str | None = None
    run_dir: str | None = None
    created_at: str | None = None

    @property
    def test_accuracy(self) -> float | None:
        """``final/test_accuracy`` in percent, or None when it is missing or not a finite number."""
        return _finite_number(self.summary.get(ACCURACY_METRIC))

    @property
    def model_params(self) -> int | None:
        """``model_params``, or None when it is missing or not a positive whole number."""
        value = _finite_number(self.summary.get(PARAMS_METRIC))
        if value is None or value <= 0 or not float(value).is_integer():
            return None
        return int(value)

    @property
    def efficiency(self) -> float | None:
        """Test accuracy per 100K parameters, computed from the two metrics above."""
        if self.test_accuracy is None or self.model_params is None:
            return None
        return efficiency_per_100k(self.test_accuracy, self.model_params)

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint whose weights the final metrics describe (it may not exist on this machine).

        That is checkpoint.pt (best validation accuracy), or checkpoint_last.pt for a run with
        ``final_model: last``, whose final metrics are measured on the last epoch's weights.
        """
        if not self.run_dir:
            return None
        name = "checkpoint_last.pt" if self.config.get("final_model") == "last" else "checkpoint.pt"
        return Path(self.run_dir) / name

    @property
    def model_path(self) -> str | None:
        """The path to pass to ``collective_model.load_model``: the run folder, or the last checkpoint."""
        checkpoint = self.checkpoint_path
        if checkpoint is None:
            return None
        return str(checkpoint) if checkpoint.name != "checkpoint.pt" else self.run_dir

    def metric(self, name: str) -> float | None:
        """Return a summary metric as a finite number, or None."""
        return _finite_number(self.summary.get(name))

    def exclusion_reason(self) -> str | None:
        """Return why the run is left out of the analysis (its state or missing metrics), or None."""
        if self.state != FINISHED:
            return self.state or "unknown state"
        if self.test_accuracy is None or self.model_params is None:
            return MISSING_METRICS
        return None


@dataclass
class RunSet:
    """Every run and sweep of one project, with where they were read from."""

    project: str
    backend: str  # "local" or "wandb"
    location: str  # the store file, or entity/project on W&B
    runs: list[ResultRun]
    sweeps: list[SweepInfo]


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------


def resolve_backend(backend: str) -> tuple[str, str]:
    """Return ("wandb" or "local", the reason) for --backend auto|wandb|local.

    auto picks wandb when W&B credentials exist and WANDB_MODE is not offline, the same rule
    as `collective sweep create`.
    """
    from ..sweeps.wandb_backend import choose_backend

    return choose_backend(backend)


# --------------------------------------------------------------------------------------------
# Local store
# --------------------------------------------------------------------------------------------


def load_local(store_path: Path, project: str | None) -> RunSet:
    """Read every run and sweep of ``project`` (of every project when None) from the local store.

    The store is opened only when its file exists, because opening creates one. Raises
    CollectiveError for a missing or unusable store.
    """
    if not store_path.is_file():
        raise CollectiveError(
            f"no local store at {store_path}; train a run or create a sweep first, "
            "or point --store (or $COLLECTIVE_STORE) at an existing store"
        )
    from ..sweeps.store import Store

    with Store(store_path) as store:
        run_records = store.list_runs(project)
        sweep_records = store.list_sweeps(project)

    runs = [run_from_record(record) for record in run_records]
    sweeps = _merge_sweeps(
        [
            SweepInfo(
                sweep_id=str(record["sweep_id"]),
                name=str(record.get("name") or record["sweep_id"]),
                metric=record.get("metric"),
                goal=record.get("goal"),
                created_at=_text_or_none(record.get("created_at")),
            )
            for record in sweep_records
        ],
        run_records,
    )
    return RunSet(project=project or "(every project)", backend="local", location=str(store_path), runs=runs, sweeps=sweeps)


def run_from_record(record: Mapping[str, Any]) -> ResultRun:
    """Build a ResultRun from one run dict of ``Store.list_runs``.

    The store keeps only the swept values as a sweep run's config, so the resolved config that
    summary.json records (every key, as the run trained) is laid over it when present.
    """
    summary = dict(record.get("summary") or {})
    config = dict(record.get("config") or {})
    if isinstance(summary.get("config"), Mapping):
        config.update(summary["config"])
    return ResultRun(
        run_id=str(record["run_id"]),
        project=str(record.get("project") or ""),
        state=str(record.get("state") or ""),
        config=config,
        summary=summary,
        sweep_id=_text_or_none(record.get("sweep_id")),
        sweep_name=_text_or_none(record.get("sweep_name")),
        run_dir=_text_or_none(record.get("run_dir") or summary.get("run_dir")),
        created_at=_text_or_none(record.get("created_at")),
    )


def _merge_sweeps(listed: list[SweepInfo], run_records: Iterable[Mapping[str, Any]]) -> list[SweepInfo]:
    """Add the sweeps that only appear in run records to the listed ones, keeping list order."""
    sweeps = {sweep.sweep_id: sweep for sweep in listed}
    for record in run_records:
        sweep_id = _text_or_none(record.get("sweep_id"))
        if sweep_id is None or sweep_id in sweeps:
            continue
        sweeps[sweep_id] = SweepInfo(
            sweep_id=sweep_id,
            name=str(record.get("sweep_name") or sweep_id),
            metric=record.get("sweep_metric"),
            goal=record.get("sweep_goal"),
        )
    return list(sweeps.values())


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


# --------------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------------


def load_wandb(project: str, entity: str | None = None) -> RunSet:
    """Read every run of ``entity/project`` through W&B's public API; raise CollectiveError.

    ``Api.runs`` returns a lazy, paginated collection. Plain iteration fetches page after page
    until the last one. Its ``objects`` list holds only the pages fetched so far, so this
    function iterates and never reads that list.
    """
    try:
        import wandb
    except ImportError:
        raise CollectiveError("the wandb backend needs the wandb package: pip install 'wandb[sweeps]'") from None

    # Without an entity, wandb uses the API key's default entity.
    entity = entity or os.environ.get("WANDB_ENTITY")
    path = f"{entity}/{project}" if entity else project
    failures: tuple[type[BaseException], ...] = (wandb.errors.Error, ValueError, OSError)
    try:
        api = wandb.Api()
        runs, sweeps = [], {}
        for wandb_run in api.runs(path, **_runs_options(api)):
            run, sweep = run_from_wandb(wandb_run, project)
            runs.append(run)
            if sweep is not None and sweep.sweep_id not in sweeps:
                sweeps[sweep.sweep_id] = sweep
    except failures as error:
        raise CollectiveError(f"reading runs of W&B project {path} failed: {error}") from error
    logger.info("read %d runs of %s from W&B", len(runs), path)
    return RunSet(project=project, backend="wandb", location=path, runs=runs, sweeps=list(sweeps.values()))


def _runs_options(api: Any) -> dict[str, Any]:
    """Return the keyword arguments for ``api.runs`` that this wandb version accepts."""
    options = {"per_page": WANDB_PAGE_SIZE, "include_sweeps": True, "lazy": False}
    try:
        parameters = inspect.signature(api.runs).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    return {name: value for name, value in options.items() if name in parameters}


def run_from_wandb(wandb_run: Any, project: str) -> tuple[ResultRun, SweepInfo | None]:
    """Build a ResultRun (and its sweep's SweepInfo, if any) from a ``wandb.apis.public.Run``."""
    summary = _wandb_summary(wandb_run)
    config = {
        key: _unwrap_config_value(value)
        for key, value in dict(getattr(wandb_run, "config", None) or {}).items()
        if not str(key).startswith("_")
    }

    sweep_info = None
    sweep = getattr(wandb_run, "sweep", None)
    if sweep is not None:
        sweep_config = dict(getattr(sweep, "config", None) or {})
        metric = sweep_config.get("metric") or {}
        name = getattr(sweep, "name", None) or sweep_config.get("name") or sweep.id
        # The sweep schema of W&B's `sweeps` package (config/schema.json) defaults the goal to "minimize".
        goal = metric.get("goal", "minimize") if metric.get("name") else None
        sweep_info = SweepInfo(sweep_id=str(sweep.id), name=str(name), metric=metric.get("name"), goal=goal)

    run = ResultRun(
        run_id=str(wandb_run.id),
        project=project,
        state=str(getattr(wandb_run, "state", "") or ""),
        config=config,
        summary=summary,
        sweep_id=sweep_info.sweep_id if sweep_info else None,
        sweep_name=sweep_info.name if sweep_info else None,
        run_dir=_text_or_none(summary.get("run_dir")),
        created_at=_text_or_none(getattr(wandb_run, "created_at", None)),
    )
    return run, sweep_info


def _wandb_summary(wandb_run: Any) -> dict[str, Any]:
    """Return a run's summary as a plain dict (``summary_metrics`` where this wandb has it)."""
    metrics = getattr(wandb_run, "summary_metrics", None)
    if isinstance(metrics, Mapping):
        return dict(metrics)
    summary = getattr(wandb_run, "summary", None)
    return {key: summary[key] for key in summary.keys()} if summary is not None else {}


def _unwrap_config_value(value: Any) -> Any:
    """Return v for W&B's raw ``{"value": v, "desc": ...}`` form, else the value itself."""
    if isinstance(value, Mapping) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value
