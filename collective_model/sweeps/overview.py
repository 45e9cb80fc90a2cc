"""Summaries of a sweep's runs for `sweep list`, `sweep show` and the agent's progress lines."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Mapping

from .store import RUN_STATES, is_finite_number


def counts_by_state(runs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Return the number of runs in each state, every state present (zero when none)."""
    counts = Counter(run.get("state") for run in runs)
    return {state: counts.get(state, 0) for state in RUN_STATES}


def best_run(runs: Iterable[Mapping[str, Any]], metric: str | None, goal: str | None) -> Mapping[str, Any] | None:
    """Return the finished run with the best finite ``metric`` for ``goal``, or None."""
    if not metric:
        return None
    candidates = [
        run for run in runs
        if run.get("state") == "finished" and is_finite_number((run.get("summary") or {}).get(metric))
    ]
    if not candidates:
        return None
    sign = 1 if goal == "maximize" else -1
    return max(candidates, key=lambda run: sign * run["summary"][metric])


def metric_value(run: Mapping[str, Any], metric: str | None) -> Any:
    """Return the run's summary value of ``metric``, or None."""
    return (run.get("summary") or {}).get(metric) if metric else None


def json_safe(value: Any) -> Any:
    """Return ``value`` with NaN and infinities replaced by None, so it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def format_number(value: Any) -> str:
    """Return a short display form: 4 significant digits for floats, '-' for missing.

    >>> [format_number(v) for v in (85.1234, 123456, None, float("nan"))]
    ['85.12', '123456', '-', 'nan']
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
