"""Pure trade-off logic: Pareto frontier, constraint choice, winners and wording."""

import doctest
import itertools
import random

import pytest

from collective_model.results import analysis, frontier, report
from collective_model.results.frontier import (
    best_index,
    choose_index,
    describe_tradeoff,
    dominates,
    format_params,
    pareto_indices,
    varying_keys,
)


@pytest.mark.parametrize("module", [frontier, analysis, report])
def test_doctests_pass(module):
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0


def brute_force_frontier(points):
    """The definition: every point that no other point dominates."""
    return {i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)}


# --------------------------------------------------------------------------------------------
# Frontier
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "points, expected",
    [
        ([], []),
        ([(80.0, 1000)], [0]),
        # Monotone trade-off: every point is on the frontier, ordered by size.
        ([(90.0, 900), (85.0, 100), (88.0, 300)], [1, 2, 0]),
        # A larger, less accurate run is dominated.
        ([(85.0, 100), (88.0, 300), (86.0, 400), (90.0, 900)], [0, 1, 3]),
        # Ties in accuracy: only the smallest of them stays.
        ([(88.0, 500), (88.0, 300), (88.0, 400)], [1]),
        # Equal parameter counts: only the most accurate stays.
        ([(85.0, 300), (87.0, 300), (86.0, 300)], [1]),
        # Identical points dominate neither each other: both stay, in index order.
        ([(87.0, 300), (87.0, 300), (86.0, 300)], [0, 1]),
        # Equal size and a tie with a smaller model: the smaller model dominates.
        ([(87.0, 300), (87.0, 200), (89.0, 300)], [1, 2]),
    ],
)
def test_frontier_table(points, expected):
    assert pareto_indices(points) == expected
    assert set(expected) == brute_force_frontier(points)


def test_frontier_single_run():
    assert pareto_indices([(12.5, 42)]) == [0]


@pytest.mark.parametrize("seed", range(200))
def test_frontier_matches_brute_force(seed):
    rng = random.Random(seed)
    count = rng.randint(1, 40)
    # Few distinct values, so ties in accuracy and in size are common.
    points = [(float(rng.choice(range(80, 92))), rng.choice(range(1, 12)) * 10_000) for _ in range(count)]
    result = pareto_indices(points)
    assert set(result) == brute_force_frontier(points)
    assert len(result) == len(set(result))
    sizes = [points[i][1] for i in result]
    assert sizes == sorted(sizes)
    # Along the frontier a larger model is always strictly more accurate.
    for a, b in itertools.pairwise(result):
        if points[a][1] < points[b][1]:
            assert points[a][0] < points[b][0]


# --------------------------------------------------------------------------------------------
# Constraint choice
# --------------------------------------------------------------------------------------------

POINTS = [(85.0, 100), (88.0, 300), (86.0, 400), (90.0, 900), (88.0, 250)]


@pytest.mark.parametrize(
    "max_params, min_accuracy, expected",
    [
        (300, None, 4),  # 88 % at 250 beats 88 % at 300: equal accuracy goes to the smaller
        (1000, None, 3),
        (100, None, 0),
        (99, None, None),
        (None, 88.0, 4),  # the smallest at >= 88 %
        (None, 85.0, 0),
        (None, 90.0, 3),
        (None, 90.5, None),
        (1000, 86.0, 4),  # both: the smallest that meets both
        (200, 86.0, None),
        (900, 90.0, 3),
    ],
)
def test_choose_index_table(max_params, min_accuracy, expected):
    assert choose_index(POINTS, max_params=max_params, min_accuracy=min_accuracy) == expected


def test_choose_index_equal_params_prefers_accuracy():
    points = [(85.0, 300), (87.0, 300)]
    assert choose_index(points, min_accuracy=80.0) == 1


def test_choose_index_needs_a_constraint():
    with pytest.raises(ValueError, match="needs max_params, min_accuracy or both"):
        choose_index(POINTS)


@pytest.mark.parametrize("seed", range(100))
def test_choice_is_on_frontier(seed):
    rng = random.Random(1000 + seed)
    points = [(float(rng.randint(80, 90)), rng.randint(1, 8) * 1000) for _ in range(rng.randint(1, 25))]
    front = set(pareto_indices(points))
    for max_params, min_accuracy in [(4000, None), (None, 85.0), (6000, 84.0)]:
        chosen = choose_index(points, max_params=max_params, min_accuracy=min_accuracy)
        if chosen is not None:
            assert chosen in front


# --------------------------------------------------------------------------------------------
# Winners, wording, hyperparameters
# --------------------------------------------------------------------------------------------


def test_best_index_ties_go_to_smaller_model():
    assert best_index([85.0, 85.0, 80.0], [300, 200, 100], "maximize") == 1


def test_best_index_minimize_and_nan():
    assert best_index([float("nan"), 0.5, 0.2], [1, 1, 1], "minimize") == 2


def test_best_index_no_finite_value():
    assert best_index([float("nan")], [1], "maximize") is None


def test_best_index_rejects_unknown_goal():
    with pytest.raises(ValueError, match="invalid goal 'max'"):
        best_index([1.0], [1], "max")


def test_describe_tradeoff_example():
    assert describe_tradeoff((86.0, 1_000_000), (84.8, 540_000)) == "-1.2 points of test accuracy for 46 % fewer parameters"


def test_describe_tradeoff_both_worse():
    assert describe_tradeoff((86.0, 100_000), (85.0, 200_000)) == "-1.0 points of test accuracy and 100 % more parameters"


def test_varying_keys_lists_and_missing():
    configs = [
        {"expert_hidden": [64, 32], "lr": 0.1, "seed": 1},
        {"expert_hidden": [64, 32], "lr": 0.2, "seed": 1},
        {"expert_hidden": [128, 64], "lr": 0.2},
    ]
    assert varying_keys(configs) == ["expert_hidden", "lr", "seed"]


def test_varying_keys_single_config():
    assert varying_keys([{"a": 1}]) == []


@pytest.mark.parametrize("params, text", [(1, "1"), (999, "999"), (1000, "1K"), (1500, "1.5K"), (482_306, "482K"), (10_000_000, "10M")])
def test_format_params(params, text):
    assert format_params(params) == text
