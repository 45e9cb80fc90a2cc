"""Analysis of hand-made run records: exclusions, sweep winners, trade-offs, frontier and choice."""

import csv
import io
import json
import re

import pytest

from collective_model.results import analyse
from collective_model.results.analysis import UnknownSweepError, describe_excluded
from collective_model.results.report import render_csv, render_json, render_table, run_rows
from collective_model.results.sources import RunSet, SweepInfo, run_from_record

ACCURACY = SweepInfo("swacc001", "accuracy", "final/test_accuracy", "maximize")
EFFICIENCY = SweepInfo("sweff002", "efficiency", "final/param_efficiency", "maximize")


def record(run_id, accuracy, params, sweep=None, state="finished", config=None, summary=None):
    """A run dict shaped like Store.list_runs returns it."""
    metrics = {}
    if accuracy is not None:
        metrics["final/test_accuracy"] = accuracy
    if params is not None:
        metrics["model_params"] = params
    if accuracy is not None and params:
        metrics["final/param_efficiency"] = accuracy / params * 100_000
    metrics.update(summary or {})
    return {
        "run_id": run_id,
        "project": "proj",
        "sweep_id": sweep.sweep_id if sweep else None,
        "sweep_name": sweep.name if sweep else None,
        "sweep_metric": sweep.metric if sweep else None,
        "sweep_goal": sweep.goal if sweep else None,
        "state": state,
        "exit_code": 0 if state == "finished" else 1,
        "reason": None,
        "config": config or {},
        "summary": metrics,
        "run_dir": f"/runs/{run_id}",
        "duration_s": 1.0,
        "created_at": "2026-01-01T00:00:00",
        "informed_by_own": 0,
        "informed_by_other": 0,
    }


def run_set(records, sweeps=(ACCURACY, EFFICIENCY)):
    return RunSet("proj", "local", "/tmp/store.db", [run_from_record(r) for r in records], list(sweeps))


def study():
    """Two sweeps and a standalone run, with one run of each kind the analysis must leave out."""
    return run_set(
        [
            record("a1", 88.0, 1_000_000, ACCURACY, config={"n_total": 8, "lr": 0.001}),
            record("a2", 86.0, 2_000_000, ACCURACY, config={"n_total": 12, "lr": 0.001}),
            record("a3", 90.0, 4_000_000, ACCURACY, config={"n_total": 16, "lr": 0.001}),
            record("e1", 85.0, 200_000, EFFICIENCY, config={"n_total": 4, "lr": 0.003}),
            record("e2", 84.0, 300_000, EFFICIENCY, config={"n_total": 4, "lr": 0.01}),
            record("s1", 87.0, 600_000, None, config={"n_total": 6, "lr": 0.001}),
            record("f1", None, None, ACCURACY, state="failed"),
            record("c1", 50.0, 100, EFFICIENCY, state="crashed"),
            record("k1", None, None, EFFICIENCY, state="killed"),
            record("r1", None, None, ACCURACY, state="running"),
            record("m1", None, 500_000, ACCURACY),  # finished without final/test_accuracy
            record("m2", 91.0, None, None),  # finished without model_params
        ]
    )


def test_exclusions_counted_by_reason():
    result = analyse(study())
    assert result.runs_total == 12
    assert [r.run_id for r in result.runs] == ["a1", "a2", "a3", "e1", "e2", "s1"]
    assert dict(result.excluded) == {"failed": 1, "crashed": 1, "killed": 1, "running": 1, "missing metrics": 2}
    assert describe_excluded(result) == (
        "Excluded 6 of 12 runs: 1 crashed, 1 failed, 1 killed, 1 running, "
        "2 missing final/test_accuracy or model_params."
    )


def test_failed_run_with_great_metrics_is_not_analysed():
    # A crashed run may still carry metrics; it must not win or sit on the frontier.
    result = analyse(study())
    assert "c1" not in [r.run_id for r in result.frontier]
    assert all(w.run.run_id != "c1" for w in result.winners)


def test_non_finite_and_bool_metrics_count_as_missing():
    result = analyse(run_set([
        record("n1", float("nan"), 1000),
        record("n2", 80.0, 1000.5),
        record("n3", True, 1000),
        record("ok", 80.0, 1000.0),
    ]))
    assert [r.run_id for r in result.runs] == ["ok"]
    assert result.excluded["missing metrics"] == 3


def test_winner_per_sweep_by_its_metric():
    result = analyse(study())
    winners = {w.sweep.name: w.run.run_id for w in result.winners}
    assert winners == {"accuracy": "a3", "efficiency": "e1"}


def test_tradeoff_against_most_accurate_winner():
    result = analyse(study())
    assert len(result.tradeoffs) == 1
    tradeoff = result.tradeoffs[0]
    assert tradeoff.reference.run.run_id == "a3"
    assert tradeoff.other.run.run_id == "e1"
    assert tradeoff.text == "-5.0 points of test accuracy for 95 % fewer parameters"


def test_frontier_contains_exactly_non_dominated_runs():
    result = analyse(study())
    # a2 (86 % at 2M) is dominated by a1 (88 % at 1M); e2 by e1.
    assert [r.run_id for r in result.frontier] == ["e1", "s1", "a1", "a3"]


def test_frontier_hyperparameters_that_change():
    result = analyse(study())
    assert result.frontier_keys == ["n_total", "lr"]


def test_frontier_hyperparameter_table():
    records = [
        record("e1", 85.0, 200_000, EFFICIENCY, config={"lr": 0.0031234567, "expert_hidden": [64, 32]}),
        record("a1", 88.0, 1_000_000, ACCURACY, config={"lr": 0.001, "expert_hidden": [64, 32], "seed": 7}),
    ]
    text = render_table(analyse(run_set(records)))
    assert "  hyperparameter  #1        #2\n" in text
    assert "  lr              0.003123  0.001\n" in text
    assert "  seed            -         7\n" in text
    assert "expert_hidden" not in text


def test_summary_config_completes_store_config():
    # The store keeps a sweep run's swept values; summary.json has the whole resolved config.
    stored = record("e1", 85.0, 200_000, EFFICIENCY, config={"lr": 0.01})
    stored["summary"]["config"] = {"lr": 0.01, "seed": 42, "epochs": 10}
    assert run_from_record(stored).config == {"lr": 0.01, "seed": 42, "epochs": 10}
    stored["summary"]["config"] = "not a mapping"
    assert run_from_record(stored).config == {"lr": 0.01}


def test_single_run_project():
    result = analyse(run_set([record("only", 80.0, 5000, ACCURACY)]))
    assert [r.run_id for r in result.frontier] == ["only"]
    assert result.frontier_keys == []
    assert result.tradeoffs == []
    assert result.winners[0].run.run_id == "only"
    assert result.winners[1].run is None


def test_sweep_winner_without_its_metric():
    # The efficiency sweep's runs lack final/param_efficiency: no winner, but they stay on the frontier.
    records = [record("e1", 85.0, 200_000, EFFICIENCY), record("a1", 88.0, 1_000_000, ACCURACY)]
    del records[0]["summary"]["final/param_efficiency"]
    result = analyse(run_set(records))
    winners = {w.sweep.name: w.run for w in result.winners}
    assert winners["efficiency"] is None
    assert [r.run_id for r in result.frontier] == ["e1", "a1"]
    assert "no analysed run with this metric" in render_table(result)


def test_sweep_without_metric_ranked_by_accuracy():
    grid = SweepInfo("grid0001", "grid", None, None)
    result = analyse(run_set([record("g1", 80.0, 100, grid), record("g2", 82.0, 900, grid)], sweeps=[grid]))
    assert result.winners[0].run.run_id == "g2"
    assert result.winners[0].fallback
    assert "names no metric and goal" in render_table(result)


def test_minimize_goal():
    loss = SweepInfo("loss0001", "loss", "final/test_loss", "minimize")
    records = [
        record("l1", 80.0, 100, loss, summary={"final/test_loss": 0.5}),
        record("l2", 82.0, 900, loss, summary={"final/test_loss": 0.3}),
    ]
    result = analyse(run_set(records, sweeps=[loss]))
    assert result.winners[0].run.run_id == "l2"


@pytest.mark.parametrize(
    "max_params, min_accuracy, expected",
    [
        (1_500_000, None, "a1"),  # most accurate within 1.5M
        (600_000, None, "s1"),
        (None, 87.5, "a1"),  # smallest reaching 87.5 %
        (None, 85.0, "e1"),
        (5_000_000, 87.0, "s1"),  # both: smallest meeting both
    ],
)
def test_constraint_choice(max_params, min_accuracy, expected):
    result = analyse(study(), max_params=max_params, min_accuracy=min_accuracy)
    assert result.choice.run_id == expected


def test_both_constraints_name_most_accurate_too():
    result = analyse(study(), max_params=5_000_000, min_accuracy=87.0)
    assert result.choice.run_id == "s1"
    assert result.max_accuracy_choice.run_id == "a3"
    text = render_table(result)
    assert "the smallest run that meets both" in text
    assert "The most accurate run that meets both:" in text


def test_both_constraints_single_candidate():
    result = analyse(study(), max_params=1_000_000, min_accuracy=88.0)
    assert result.choice.run_id == "a1"
    assert result.max_accuracy_choice is None


@pytest.mark.parametrize(
    "max_params, min_accuracy, message",
    [
        (100_000, None, "the smallest analysed run has 200,000 parameters"),
        (None, 95.0, "the most accurate analysed run reaches 90.00 %"),
        (700_000, 89.0, "the most accurate run with at most 700,000 parameters reaches 87.00 %"),
    ],
)
def test_none_qualifies_message(max_params, min_accuracy, message):
    result = analyse(study(), max_params=max_params, min_accuracy=min_accuracy)
    assert result.choice is None
    text = render_table(result)
    assert "No analysed run meets the constraints" in text
    assert message in text


def test_sweep_filter_by_name_and_id():
    by_name = analyse(study(), sweep_selectors=["efficiency"])
    assert {r.run_id for r in by_name.runs} == {"e1", "e2"}
    assert by_name.runs_total == 4  # e1, e2, c1 (crashed), k1 (killed)
    by_id = analyse(study(), sweep_selectors=["swacc001"])
    assert {r.run_id for r in by_id.runs} == {"a1", "a2", "a3"}
    assert [w.sweep.name for w in by_id.winners] == ["accuracy"]


def test_sweep_filter_unknown():
    with pytest.raises(UnknownSweepError, match=r"--sweep 'nope': no such sweep in project proj .*swacc001 \(accuracy\)"):
        analyse(study(), sweep_selectors=["nope"])


def test_duplicate_sweep_names_get_ids():
    second = SweepInfo("swacc003", "accuracy", "final/test_accuracy", "maximize")
    result = analyse(run_set([record("a1", 88.0, 1000, ACCURACY), record("b1", 89.0, 2000, second)], sweeps=[ACCURACY, second]))
    assert result.sweep_label(result.runs[0]) == "accuracy (swacc001)"
    assert result.sweep_label(result.runs[1]) == "accuracy (swacc003)"


# --------------------------------------------------------------------------------------------
# Formats carry the same runs
# --------------------------------------------------------------------------------------------


def table_run_ids(text):
    """Run ids in the winners table and the frontier table of the text report."""
    ids = []
    section = None
    for line in text.splitlines():
        if line.startswith("Best run of each sweep"):
            section, run_column = "winners", None
            continue
        if line.startswith("Pareto frontier"):
            section, run_column = "frontier", None
            continue
        if not line.startswith("  "):
            section = None
            continue
        if section is None:
            continue
        # Columns are separated by at least two spaces; a cell may contain single spaces.
        cells = re.split(r"\s{2,}", line.strip())
        if run_column is None:
            run_column = cells.index("run")
            continue
        if len(cells) > run_column and not cells[run_column].startswith("no analysed run"):
            ids.append(cells[run_column])
    return ids


@pytest.mark.parametrize("constraints", [{}, {"max_params": 600_000}, {"max_params": 5_000_000, "min_accuracy": 87.0}])
def test_csv_and_json_match_table(constraints):
    result = analyse(study(), **constraints)
    table_ids = set(table_run_ids(render_table(result)))
    assert table_ids == {"e1", "s1", "a1", "a3"}  # both winners are on this frontier

    csv_rows = list(csv.DictReader(io.StringIO(render_csv(result))))
    document = json.loads(render_json(result))
    assert {row["run_id"] for row in csv_rows} == table_ids
    assert {run["run_id"] for run in document["runs"]} == table_ids
    assert document["frontier"] == ["e1", "s1", "a1", "a3"]
    assert [row["run_id"] for row in csv_rows] == [run["run_id"] for run in document["runs"]]

    for row, entry in zip(csv_rows, document["runs"]):
        assert float(row["test_accuracy"]) == entry["test_accuracy"]
        assert int(row["model_params"]) == entry["model_params"]
        assert row["on_frontier"] == ("true" if entry["on_frontier"] else "false")
        assert json.loads(row["config.n_total"]) == entry["config"]["n_total"]


def test_winner_off_frontier_is_listed_in_every_format():
    # The efficiency sweep's best (e1) is dominated by a standalone run (s1).
    records = [
        record("e1", 80.0, 300_000, EFFICIENCY),
        record("s1", 85.0, 200_000, None),
        record("a1", 90.0, 900_000, ACCURACY),
    ]
    result = analyse(run_set(records))
    assert [r.run_id for r in result.frontier] == ["s1", "a1"]
    rows = run_rows(result)
    assert [row["run_id"] for row in rows] == ["s1", "a1", "e1"]
    assert rows[2]["on_frontier"] is False
    assert rows[2]["best_in_sweep"] is True
    assert set(table_run_ids(render_table(result))) == {"s1", "a1", "e1"}
    assert [r["run_id"] for r in json.loads(render_json(result))["runs"]] == ["s1", "a1", "e1"]


def test_json_choice_fields():
    result = analyse(study(), max_params=600_000)
    document = json.loads(render_json(result))
    assert document["choice"]["run_id"] == "s1"
    assert document["choice"]["checkpoint"] == "/runs/s1/checkpoint.pt"
    assert document["choice"]["checkpoint_exists"] is False
    assert "load_model('/runs/s1')" in document["choice"]["reload_command"]
    assert document["choice_message"] is None
    assert [row["chosen"] for row in document["runs"]] == [False, True, False, False]
