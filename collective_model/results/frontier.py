"""Pure logic of the accuracy–size trade-off: Pareto frontier, sweep winners, constraint choice.

Every function here works on plain numbers, so it can be tested without a store or W&B. A
*point* is ``(accuracy, params)``: test accuracy in percent (higher is better) and the number of
trainable parameters (lower is better).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

Point = tuple[float, int]


def dominates(a: Point, b: Point) -> bool:
    """Return True when ``a`` is at least as good as ``b`` on both axes and better on one.

    >>> dominates((90.0, 1000), (89.0, 1000))
    True
    >>> dominates((90.0, 1000), (90.0, 1000))  # equal points do not dominate each other
    False
    >>> dominates((91.0, 2000), (90.0, 1000))  # more accurate but larger: a trade-off
    False
    """
    at_least_as_good = a[0] >= b[0] and a[1] <= b[1]
    strictly_better = a[0] > b[0] or a[1] < b[1]
    return at_least_as_good and strictly_better


def pareto_indices(points: Sequence[Point]) -> list[int]:
    """Return the indices of the non-dominated points, smallest model first.

    Points with the same size are ordered by accuracy (best first), then by index. Two identical
    points dominate neither each other, so both are kept.

    >>> pareto_indices([(85.0, 100), (88.0, 300), (86.0, 400), (90.0, 900)])
    [0, 1, 3]
    >>> pareto_indices([(85.0, 100), (85.0, 100), (84.0, 100)])
    [0, 1]
    >>> pareto_indices([(90.0, 500), (90.0, 200)])  # same accuracy: only the smaller one
    [1]
    >>> pareto_indices([])
    []
    """
    # Sweep the sizes in increasing order, remembering the best accuracy of every strictly
    # smaller model. Within one size only the most accurate points can be non-dominated, and
    # they are exactly when they beat every smaller model.
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0], i))
    frontier: list[int] = []
    best_smaller = -math.inf
    position = 0
    while position < len(order):
        size = points[order[position]][1]
        group = []
        while position < len(order) and points[order[position]][1] == size:
            group.append(order[position])
            position += 1
        group_best = points[group[0]][0]
        if group_best > best_smaller:
            frontier.extend(i for i in group if points[i][0] == group_best)
            best_smaller = group_best
    return frontier


def choose_index(
    points: Sequence[Point],
    max_params: int | None = None,
    min_accuracy: float | None = None,
) -> int | None:
    """Return the index of the point to deploy under the constraints, or None when none meets them.

    - ``max_params`` only: the most accurate point with at most that many parameters.
    - ``min_accuracy`` only: the smallest point with at least that accuracy.
    - both: the smallest point that meets both, since the accuracy floor states what is good
      enough and the size cap only rules out larger models.

    Ties go to the better value on the other axis, then to the lower index. The chosen point is
    always on the Pareto frontier of ``points``.

    >>> points = [(85.0, 100), (88.0, 300), (86.0, 400), (90.0, 900)]
    >>> choose_index(points, max_params=500)
    1
    >>> choose_index(points, min_accuracy=86.0)
    1
    >>> choose_index(points, max_params=1000, min_accuracy=89.0)
    3
    >>> choose_index(points, max_params=50) is None
    True
    """
    if max_params is None and min_accuracy is None:
        raise ValueError("choose_index needs max_params, min_accuracy or both")
    candidates = [
        i
        for i, (accuracy, params) in enumerate(points)
        if (max_params is None or params <= max_params)
        and (min_accuracy is None or accuracy >= min_accuracy)
    ]
    if not candidates:
        return None
    if min_accuracy is not None:
        return min(candidates, key=lambda i: (points[i][1], -points[i][0], i))
    return min(candidates, key=lambda i: (-points[i][0], points[i][1], i))


def best_index(values: Sequence[float], sizes: Sequence[int], goal: str) -> int | None:
    """Return the index of the best value for ``goal`` ("maximize" or "minimize"); ties go to the smaller model.

    Non-finite values are skipped; None is returned when no value is finite.

    >>> best_index([80.0, 85.0, 85.0], [100, 300, 200], "maximize")
    2
    >>> best_index([0.4, 0.3, float("nan")], [100, 300, 200], "minimize")
    1
    """
    if goal not in ("maximize", "minimize"):
        raise ValueError(f"invalid goal {goal!r}; expected 'maximize' or 'minimize'")
    sign = -1.0 if goal == "maximize" else 1.0
    finite = [i for i, value in enumerate(values) if math.isfinite(value)]
    if not finite:
        return None
    return min(finite, key=lambda i: (sign * values[i], sizes[i], i))


def efficiency_per_100k(accuracy: float, params: int) -> float:
    """Return test accuracy per 100K parameters (the formula of ``final/param_efficiency``).

    >>> round(efficiency_per_100k(85.2, 8_500_000), 4)
    1.0024
    """
    return accuracy / params * 100_000


def describe_tradeoff(reference: Point, other: Point) -> str:
    """Describe in words what ``other`` gives up or gains on both axes against ``reference``.

    >>> describe_tradeoff((90.0, 1_000_000), (88.8, 540_000))
    '-1.2 points of test accuracy for 46 % fewer parameters'
    >>> describe_tradeoff((90.0, 1_000_000), (90.0, 250_000))
    'the same test accuracy with 75 % fewer parameters'
    >>> describe_tradeoff((90.0, 400_000), (88.0, 500_000))
    '-2.0 points of test accuracy and 25 % more parameters'
    >>> describe_tradeoff((90.0, 400_000), (91.5, 400_000))
    '+1.5 points of test accuracy with the same number of parameters'
    >>> describe_tradeoff((88.0, 400_000), (90.0, 600_000))
    '+2.0 points of test accuracy for 50 % more parameters'
    """
    # Each axis is -1 (worse), 0 (the same at the printed precision) or +1 (better).
    points = other[0] - reference[0]
    accuracy_sign = _sign(round(points, 1))
    change = (other[1] - reference[1]) / reference[1] * 100
    size_sign = -_sign(round(change))

    accuracy_text = "the same test accuracy" if accuracy_sign == 0 else f"{points:+.1f} points of test accuracy"
    if size_sign == 0:
        size_text = "the same number of parameters"
    else:
        size_text = f"{abs(change):.0f} % {'fewer' if change < 0 else 'more'} parameters"

    # "for" marks a trade (one axis better, the other worse); "and" two changes the same way.
    if accuracy_sign == 0 or size_sign == 0:
        joiner = "with"
    elif accuracy_sign != size_sign:
        joiner = "for"
    else:
        joiner = "and"
    return f"{accuracy_text} {joiner} {size_text}"


def _sign(value: float) -> int:
    if value > 0:
        return 1
    if value < 0:
        return -1
    return 0


def varying_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return the config keys whose values differ between the given configs, in first-seen order.

    A key missing from some configs counts as differing. Nested mappings (such as ``derived``)
    are skipped because they follow from the other keys.

    >>> varying_keys([{"n_total": 4, "seed": 1, "derived": {"n_experts": 2}},
    ...               {"n_total": 8, "seed": 1, "derived": {"n_experts": 2}}])
    ['n_total']
    >>> varying_keys([{"expert_hidden": [64, 32]}, {"expert_hidden": [64, 32]}, {}])
    ['expert_hidden']
    """
    keys: list[str] = []
    for config in configs:
        for key, value in config.items():
            if key not in keys and not isinstance(value, Mapping):
                keys.append(key)
    missing = object()
    varying = []
    for key in keys:
        values = {_canonical(config.get(key, missing)) for config in configs}
        if len(values) > 1:
            varying.append(key)
    return varying


def _canonical(value: Any) -> str:
    """Return a hashable text form of a config value, so that [1, 2] and (1, 2) compare equal."""
    try:
        return json.dumps(value, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return repr(value)


def format_params(params: int) -> str:
    """Return a parameter count in short form, as in 540K or 8.5M.

    >>> [format_params(n) for n in (950, 12_345, 540_000, 8_500_000, 1_250_000_000)]
    ['950', '12.3K', '540K', '8.5M', '1.25B']
    """
    for divisor, suffix in ((1_000_000_000, "B"), (1_000_000, "M"), (1_000, "K")):
        if params >= divisor:
            scaled = params / divisor
            # Three significant digits at most: 540K, 12.3K, 8.5M.
            if scaled >= 100:
                digits = 0
            elif scaled >= 10:
                digits = 1
            else:
                digits = 2
            text = f"{scaled:.{digits}f}"
            if digits:
                text = text.rstrip("0").rstrip(".")
            return text + suffix
    return str(params)
