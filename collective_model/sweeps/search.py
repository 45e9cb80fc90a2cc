"""Suggest a sweep's next run with W&B's open-source ``sweeps`` engine (grid, random, bayes).

Cross-sweep learning: a bayes sweep in project P is given every run of P, from any sweep or
standalone, that fits the sweep's parameter space. Finished runs that carry the sweep's metric
train the Gaussian process. Running runs are passed as running, so concurrent agents spread out.
The sweep's own failed and crashed runs are passed as failed, and the engine imputes them as the
worst metric of the finished runs (``impute: worst``, W&B's default).

The engine's run config is ``{key: {"value": v}}``; the store and the params file hold plain
``{key: v}``. Values keep their types both ways: lists stay lists, booleans stay booleans, and
numpy scalars become Python numbers.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from ..errors import CollectiveError
from .store import Claim, is_finite_number

log = logging.getLogger(__name__)

# How often a suggestion that repeats a config of the same sweep is drawn again before the
# repeat is accepted (a space of few categorical values can run out of new configs).
MAX_DUPLICATE_DRAWS = 20

# Distributions whose min and max are bounds on the value itself (others take exponents or moments).
_VALUE_BOUNDED = (None, "int_uniform", "uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values")
_EXPONENT_BOUNDED = ("log_uniform", "q_log_uniform")


class SearchEngineError(CollectiveError):
    """The installed ``sweeps`` engine does not read run summaries the way this module expects."""


class SweepComplete(CollectiveError):
    """The sweep has no next run: its grid is exhausted, its run_cap or its metric target is reached."""

    exit_code = 0


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def load_engine() -> ModuleType:
    """Import the ``sweeps`` package once and check that it reads summary metrics."""
    with warnings.catch_warnings():
        # sweeps 0.3.0 declares pydantic 1 model options that pydantic 2 warns about on import.
        warnings.simplefilter("ignore")
        import sweeps
        import sweeps.bayes_search  # noqa: F401  (imports scikit-learn, which takes a second)

    check_engine(sweeps)
    return sweeps


def check_engine(engine: ModuleType) -> None:
    """Raise SearchEngineError unless the engine sees a finished run's summary metric.

    sweeps releases before 0.3 declared the run fields with pydantic 1 aliases; under pydantic 2
    a summary passed by either name could be dropped silently, and every bayes suggestion would
    then be random.
    """
    metric = "final/test_accuracy"
    for field in ("summaryMetrics", "summary_metrics"):
        run = engine.SweepRun(name="self-test", state=engine.RunState.finished, config={"x": {"value": 1}}, **{field: {metric: 87.5}})
        try:
            seen = run.metric_extremum(metric, kind="maximum")
        except (KeyError, ValueError) as error:
            seen = error
        if seen != 87.5:
            raise SearchEngineError(
                f"the installed sweeps {getattr(engine, '__version__', '?')} engine does not see a run's summary "
                f"metric passed as {field} (got {seen!r} instead of 87.5); install sweeps>=0.3 with pydantic 2"
            )


# --------------------------------------------------------------------------------------------
# Values and configs
# --------------------------------------------------------------------------------------------


def plain_value(value: Any) -> Any:
    """Return ``value`` with numpy scalars and arrays turned into Python numbers and lists.

    >>> import numpy as np
    >>> plain_value([np.int64(512), np.float64(0.5), np.bool_(True)])
    [512, 0.5, True]
    """
    if isinstance(value, dict):
        return {key: plain_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return plain_value(value.tolist())
    return value


def plain_config(engine_config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``{key: v}`` from the engine's ``{key: {"value": v}}``."""
    return {key: plain_value(entry["value"]) for key, entry in engine_config.items()}


def config_key(config: Mapping[str, Any], names: list[str]) -> str:
    """Return canonical JSON of the swept values, equal for equal configs.

    >>> config_key({"b": [1, 2], "a": 0.5, "c": 1}, ["a", "b"])
    '{"a": 0.5, "b": [1, 2]}'
    """
    return json.dumps({name: config.get(name) for name in sorted(names)}, sort_keys=True)


def _same_value(a: Any, b: Any) -> bool:
    """Return whether two config values are equal, booleans apart from numbers, floats within 1e-9."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


@dataclass(frozen=True)
class Misfit:
    """The first parameter of a sweep's space that a run's config does not fit."""

    parameter: str
    missing: bool  # True: the config lacks the parameter; False: its value is outside the space
    message: str

    def __str__(self) -> str:
        return self.message


def fit_to_parameters(parameters: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, Misfit | None]:
    """Match a run's config against a sweep's parameter space.

    Returns ``(values, None)`` when every parameter is present and inside its space, with
    categorical values replaced by the sweep's own spelling so the engine finds their index.
    Otherwise returns ``(None, misfit)`` for the first parameter that does not fit.
    """
    values = {}
    for name, spec in parameters.items():
        if name not in config:
            return None, Misfit(name, True, f"missing parameter {name}")
        value = config[name]
        if "value" in spec:
            if not _same_value(value, spec["value"]):
                return None, Misfit(name, False, f"{name}={value!r} differs from the sweep's fixed value {spec['value']!r}")
            values[name] = spec["value"]
        elif "values" in spec:
            match = [v for v in spec["values"] if _same_value(value, v)]
            if not match:
                return None, Misfit(name, False, f"{name}={value!r} is not one of the sweep's values")
            values[name] = match[0]
        else:
            reason = _range_problem(name, spec, value)
            if reason:
                return None, Misfit(name, False, reason)
            values[name] = value
    return values, None


def _range_problem(name: str, spec: Mapping[str, Any], value: Any) -> str | None:
    """Return why ``value`` lies outside the parameter's min and max, or None when inside."""
    if not is_finite_number(value):
        return f"{name}={value!r} is not a finite number"
    distribution = spec.get("distribution")
    if "min" not in spec or "max" not in spec:
        return None  # normal and beta families are unbounded
    if distribution in _VALUE_BOUNDED:
        low, high = spec["min"], spec["max"]
    elif distribution in _EXPONENT_BOUNDED:
        low, high = math.exp(spec["min"]), math.exp(spec["max"])
    else:
        return None
    tolerance = 1e-9 * max(abs(low), abs(high), 1.0)
    if not low - tolerance <= value <= high + tolerance:
        return f"{name}={value!r} is outside the sweep's range [{low}, {high}]"
    return None


def engine_sweep_config(sweep_config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the sweep config as the local engine gets it: falsy categorical values first.

    sweeps 0.3.0 reads a past run's categorical value with ``if not value: continue``, leaving
    index 0, so a run with ``False``, ``0`` or ``[]`` counts as the first listed value. Listing the
    falsy value first makes that index right; the set of values, and so the search space, is
    unchanged.
    """
    config = copy.deepcopy(dict(sweep_config))
    for spec in (config.get("parameters") or {}).values():
        values = spec.get("values") if isinstance(spec, dict) else None
        if isinstance(values, list) and "probabilities" not in spec:
            spec["values"] = sorted(values, key=lambda v: bool(v) if not isinstance(v, (list, dict)) else len(v) > 0)
    return config


# --------------------------------------------------------------------------------------------
# Which runs inform a suggestion
# --------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The runs handed to the engine for one suggestion, and counts of the finished ones."""

    engine_runs: list[Any]
    informed_by_own: int
    informed_by_other: int


def select_runs(sweep: Mapping[str, Any], project_runs: list[Mapping[str, Any]]) -> Selection:
    """Return the project's runs that the engine gets for ``sweep``'s next suggestion.

    bayes: every run of the project that fits the parameter space (see the module docstring).
    grid: the sweep's own runs, so the engine skips grid points already taken. random: none.
    A killed run is left out: a user interrupt says nothing about its config.
    """
    engine = load_engine()
    config = sweep["config"]
    method = config["method"]
    parameters = config.get("parameters") or {}
    metric = (config.get("metric") or {}).get("name")
    own_id = sweep["sweep_id"]

    selection = Selection([], 0, 0)
    if method == "random":
        return selection
    for run in project_runs:
        own = run.get("sweep_id") == own_id
        if method == "grid" and not own:
            continue
        values, _ = fit_to_parameters(parameters, run.get("config") or {})
        if values is None:
            continue
        engine_config = {name: {"value": value} for name, value in values.items()}
        state = run.get("state")
        summary = run.get("summary") or {}

        if method == "grid":
            selection.engine_runs.append(engine.SweepRun(name=run["run_id"], state=state, config=engine_config))
        elif state == "running":
            selection.engine_runs.append(engine.SweepRun(name=run["run_id"], state=state, config=engine_config))
        elif state == "finished" and metric in summary:
            selection.engine_runs.append(
                engine.SweepRun(name=run["run_id"], state=state, config=engine_config, summary_metrics={metric: summary[metric]})
            )
            if own:
                selection.informed_by_own += 1
            else:
                selection.informed_by_other += 1
        elif state in ("failed", "crashed") and own:
            # No summary metrics, so the engine imputes the worst metric of the finished runs.
            selection.engine_runs.append(engine.SweepRun(name=run["run_id"], state="failed", config=engine_config))
    return selection


# --------------------------------------------------------------------------------------------
# Suggestion
# --------------------------------------------------------------------------------------------


def suggest(sweep: Mapping[str, Any], project_runs: list[Mapping[str, Any]]) -> Claim:
    """Return the next run of ``sweep`` as a Claim; raise SweepComplete when there is none.

    A suggestion that repeats a config the sweep already ran or is running is drawn again, up
    to MAX_DUPLICATE_DRAWS times, so concurrent agents do not train the same config.
    """
    from sklearn.exceptions import ConvergenceWarning

    engine = load_engine()
    config = sweep["config"]
    _raise_when_complete(sweep, project_runs)

    selection = select_runs(sweep, project_runs)
    names = list((config.get("parameters") or {}).keys())
    taken = {run.get("config_key") for run in project_runs if run.get("sweep_id") == sweep["sweep_id"]}
    engine_config = engine_sweep_config(config)

    for _ in range(MAX_DUPLICATE_DRAWS):
        with warnings.catch_warnings():
            # scikit-learn warns when a GP length scale reaches its bound, which is common with
            # few runs; sweeps silences it with a filter that the import above did not keep.
            warnings.simplefilter("ignore", ConvergenceWarning)
            suggestion = engine.next_run(engine_config, selection.engine_runs)
        if suggestion is None:
            raise SweepComplete(f"sweep {sweep['sweep_id']}: the grid is exhausted")
        values = plain_config(suggestion.config)
        key = config_key(values, names)
        if key not in taken:
            break
        log.debug("sweep %s: suggestion repeats a config of the sweep; drawing again", sweep["sweep_id"])
    else:
        log.warning(
            "sweep %s: %d suggestions in a row repeated configs of the sweep; running a repeat "
            "(the parameter space may be exhausted)", sweep["sweep_id"], MAX_DUPLICATE_DRAWS,
        )
    return Claim(
        config=values,
        config_key=key,
        informed_by_own=selection.informed_by_own,
        informed_by_other=selection.informed_by_other,
        search_info=plain_value(suggestion.search_info) if suggestion.search_info else None,
    )


def _raise_when_complete(sweep: Mapping[str, Any], project_runs: list[Mapping[str, Any]]) -> None:
    """Raise SweepComplete when the sweep reached its run_cap or a run reached its metric target."""
    config = sweep["config"]
    own_runs = [run for run in project_runs if run.get("sweep_id") == sweep["sweep_id"]]

    run_cap = config.get("run_cap")
    if isinstance(run_cap, int) and len(own_runs) >= run_cap:
        raise SweepComplete(f"sweep {sweep['sweep_id']} has {len(own_runs)} runs and run_cap is {run_cap}")

    metric = config.get("metric") or {}
    target = metric.get("target")
    if target is None:
        return
    maximize = metric.get("goal") == "maximize"
    for run in own_runs:
        value = (run.get("summary") or {}).get(metric["name"])
        if run.get("state") == "finished" and is_finite_number(value) and (value >= target if maximize else value <= target):
            raise SweepComplete(f"run {run['run_id']} reached the target {metric['name']} = {value} (target {target})")
