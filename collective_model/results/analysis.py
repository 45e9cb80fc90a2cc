"""The analysis of one project: excluded runs, best run of each sweep, frontier and choice."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import EXIT_USAGE, CollectiveError
from . import frontier as pareto
from .sources import ACCURACY_METRIC, MISSING_METRICS, ResultRun, RunSet, SweepInfo

STANDALONE = "standalone"  # the sweep label of runs started by hand with `collective train`


class UnknownSweepError(CollectiveError):
    """A --sweep value matches no sweep of the project."""

    exit_code = EXIT_USAGE


@dataclass
class Winner:
    """The best analysed run of one sweep by that sweep's own metric (run None when there is none)."""

    sweep: SweepInfo
    run: ResultRun | None
    value: float | None
    metric: str  # the metric the run was ranked by
    goal: str  # "maximize" or "minimize"
    fallback: bool = False  # True when the sweep names no usable metric and goal (ranked by test accuracy)


@dataclass
class Tradeoff:
    """The comparison of one sweep's best run with the most accurate sweep winner."""

    reference: Winner
    other: Winner
    accuracy_points: float  # other minus reference, in percentage points
    params_change_percent: float  # negative when ``other`` is smaller
    text: str


@dataclass
class Analysis:
    """Everything `collective results` prints, plots and exports for one project."""

    project: str
    backend: str
    location: str
    runs_total: int
    runs: list[ResultRun]  # analysed: finished and with final/test_accuracy and model_params
    excluded: Counter  # exclusion reason (a run state or "missing metrics") -> number of runs
    sweeps: list[SweepInfo]
    winners: list[Winner]
    tradeoffs: list[Tradeoff]
    frontier: list[ResultRun]
    frontier_keys: list[str]  # config keys whose values change along the frontier
    max_params: int | None = None
    min_accuracy: float | None = None
    choice: ResultRun | None = None
    # With both constraints: the most accurate run that meets them, when it is not the choice.
    max_accuracy_choice: ResultRun | None = None
    sweep_labels: dict[str, str] = field(default_factory=dict)

    @property
    def constrained(self) -> bool:
        return self.max_params is not None or self.min_accuracy is not None

    def sweep_label(self, run: ResultRun) -> str:
        """Return the sweep name shown for a run ("standalone" for runs outside any sweep)."""
        if run.sweep_id is None:
            return STANDALONE
        return self.sweep_labels.get(run.sweep_id, run.sweep_name or run.sweep_id)

    def listed_runs(self) -> list[ResultRun]:
        """Return the runs the report lists: the frontier (smallest first), then winners off it."""
        listed = list(self.frontier)
        for winner in self.winners:
            if winner.run is not None and all(winner.run is not run for run in listed):
                listed.append(winner.run)
        if self.max_accuracy_choice is not None and all(self.max_accuracy_choice is not run for run in listed):
            listed.append(self.max_accuracy_choice)
        return listed


def select_sweeps(run_set: RunSet, selectors: tuple[str, ...] | list[str]) -> list[SweepInfo]:
    """Return the sweeps that --sweep values name, by id or by name; raise UnknownSweepError.

    A name matches every sweep of that name, so ``--sweep accuracy`` selects each accuracy sweep.
    """
    selected: list[SweepInfo] = []
    unknown = []
    for selector in selectors:
        matches = [s for s in run_set.sweeps if selector in (s.sweep_id, s.name)]
        if not matches:
            unknown.append(selector)
        selected.extend(m for m in matches if m not in selected)
    if unknown:
        known = ", ".join(f"{s.sweep_id} ({s.name})" for s in run_set.sweeps) or "none"
        raise UnknownSweepError(
            f"--sweep {', '.join(repr(u) for u in unknown)}: no such sweep in project "
            f"{run_set.project} ({run_set.location}); sweeps there: {known}"
        )
    return selected


def analyse(
    run_set: RunSet,
    sweep_selectors: tuple[str, ...] | list[str] = (),
    max_params: int | None = None,
    min_accuracy: float | None = None,
) -> Analysis:
    """Analyse a project's runs; ``sweep_selectors`` limits it to those sweeps (no standalone runs)."""
    # Step 1: the runs in scope, and which of them can be analysed.
    if sweep_selectors:
        sweeps = select_sweeps(run_set, sweep_selectors)
        sweep_ids = {s.sweep_id for s in sweeps}
        scope = [run for run in run_set.runs if run.sweep_id in sweep_ids]
    else:
        sweeps = list(run_set.sweeps)
        scope = list(run_set.runs)
    excluded: Counter = Counter()
    runs = []
    for run in scope:
        reason = run.exclusion_reason()
        if reason is None:
            runs.append(run)
        else:
            excluded[reason] += 1

    # Step 2: the best run of each sweep by its own metric, and the trade-offs between them.
    winners = [_best_of_sweep(sweep, runs) for sweep in sweeps]
    tradeoffs = _tradeoffs(winners)

    # Step 3: the Pareto frontier and the hyperparameters that change along it.
    points = [(run.test_accuracy, run.model_params) for run in runs]
    frontier = [runs[i] for i in pareto.pareto_indices(points)]
    frontier_keys = pareto.varying_keys([run.config for run in frontier]) if len(frontier) > 1 else []

    # Step 4: the run that meets the deployment constraints.
    choice = max_accuracy = None
    if max_params is not None or min_accuracy is not None:
        index = pareto.choose_index(points, max_params=max_params, min_accuracy=min_accuracy)
        choice = runs[index] if index is not None else None
        if choice is not None and max_params is not None and min_accuracy is not None:
            feasible = [i for i, (accuracy, _) in enumerate(points) if accuracy >= min_accuracy]
            best = pareto.choose_index([points[i] for i in feasible], max_params=max_params)
            candidate = runs[feasible[best]]
            max_accuracy = candidate if candidate is not choice else None

    return Analysis(
        project=run_set.project,
        backend=run_set.backend,
        location=run_set.location,
        runs_total=len(scope),
        runs=runs,
        excluded=excluded,
        sweeps=sweeps,
        winners=winners,
        tradeoffs=tradeoffs,
        frontier=frontier,
        frontier_keys=frontier_keys,
        max_params=max_params,
        min_accuracy=min_accuracy,
        choice=choice,
        max_accuracy_choice=max_accuracy,
        sweep_labels=_sweep_labels(sweeps),
    )


def _best_of_sweep(sweep: SweepInfo, runs: list[ResultRun]) -> Winner:
    # A sweep record without a metric and a valid goal (possible for grid or random sweeps on
    # W&B) is ranked by test accuracy, and the report states this.
    fallback = not sweep.metric or sweep.goal not in ("maximize", "minimize")
    metric = ACCURACY_METRIC if fallback else sweep.metric
    goal = "maximize" if fallback else sweep.goal

    members = [run for run in runs if run.sweep_id == sweep.sweep_id]
    values = [run.metric(metric) for run in members]
    usable = [i for i, value in enumerate(values) if value is not None]
    index = pareto.best_index([values[i] for i in usable], [members[i].model_params for i in usable], goal)
    if index is None:
        return Winner(sweep=sweep, run=None, value=None, metric=metric, goal=goal, fallback=fallback)
    chosen = usable[index]
    return Winner(sweep=sweep, run=members[chosen], value=values[chosen], metric=metric, goal=goal, fallback=fallback)


def _tradeoffs(winners: list[Winner]) -> list[Tradeoff]:
    """Compare every sweep winner with the most accurate one (ties: the smaller model)."""
    found = [w for w in winners if w.run is not None]
    if len(found) < 2:
        return []
    reference = min(found, key=lambda w: (-w.run.test_accuracy, w.run.model_params))
    reference_point = (reference.run.test_accuracy, reference.run.model_params)
    tradeoffs = []
    for other in found:
        if other is reference:
            continue
        point = (other.run.test_accuracy, other.run.model_params)
        tradeoffs.append(
            Tradeoff(
                reference=reference,
                other=other,
                accuracy_points=point[0] - reference_point[0],
                params_change_percent=(point[1] - reference_point[1]) / reference_point[1] * 100,
                text=pareto.describe_tradeoff(reference_point, point),
            )
        )
    return tradeoffs


def _sweep_labels(sweeps: list[SweepInfo]) -> dict[str, str]:
    """Return each sweep's name, with its id added where two sweeps share a name."""
    counts = Counter(sweep.name for sweep in sweeps)
    return {
        sweep.sweep_id: sweep.name if counts[sweep.name] == 1 else f"{sweep.name} ({sweep.sweep_id})"
        for sweep in sweeps
    }


def describe_excluded(analysis: Analysis) -> str | None:
    """Return the one line that counts the excluded runs by reason, or None when none were.

    >>> from collections import Counter
    >>> a = Analysis("p", "local", "s.db", 5, [], Counter({"failed": 2, MISSING_METRICS: 1}), [], [], [], [], [])
    >>> describe_excluded(a)
    'Excluded 3 of 5 runs: 2 failed, 1 missing final/test_accuracy or model_params.'
    """
    if not analysis.excluded:
        return None
    parts = []
    for reason, count in sorted(analysis.excluded.items(), key=lambda item: (item[0] == MISSING_METRICS, item[0])):
        words = "missing final/test_accuracy or model_params" if reason == MISSING_METRICS else reason
        parts.append(f"{count} {words}")
    total = sum(analysis.excluded.values())
    return f"Excluded {total} of {analysis.runs_total} runs: {', '.join(parts)}."
