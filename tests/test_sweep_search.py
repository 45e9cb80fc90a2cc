"""Suggestions from the sweeps engine: value types, cross-sweep selection and imputation of failures."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from collective_model import config as config_lib
from collective_model.sweeps import search
from collective_model.sweeps.agent import write_params_file
from collective_model.sweeps.search import SearchEngineError, SweepComplete, fit_to_parameters, select_runs, suggest
from collective_model.sweeps.store import Store

# The GP fit warns when a length scale hits its bound, which is normal with few runs.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

REPO = Path(__file__).resolve().parents[1]
EFFICIENCY = "final/param_efficiency"


def sweep(sweep_id: str, parameters: dict, metric: str = EFFICIENCY, goal: str = "maximize", method: str = "bayes", **extra) -> dict:
    config = {"method": method, "metric": {"name": metric, "goal": goal}, "parameters": parameters, **extra}
    return {"sweep_id": sweep_id, "project": "p", "config": config}


def run(run_id: str, sweep_id: str | None, state: str, config: dict, summary: dict | None = None, config_key: str | None = None) -> dict:
    return {"run_id": run_id, "sweep_id": sweep_id, "state": state, "config": config, "summary": summary or {}, "config_key": config_key}


SPACE = {
    "learning_rate": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01},
    "expert_hidden": {"values": [[512, 256], [384, 192, 96]]},
    "use_drop_models": {"values": [True, False]},
    "epochs": {"value": 1},
}


def fitting_config(lr: float = 0.001, hidden=(512, 256), drop: bool = False, epochs: int = 1) -> dict:
    return {"learning_rate": lr, "expert_hidden": list(hidden), "use_drop_models": drop, "epochs": epochs, "seed": 42}


# --------------------------------------------------------------------------------------------
# Engine self-test and value types
# --------------------------------------------------------------------------------------------


def test_engine_self_test_passes():
    search.check_engine(search.load_engine())


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic 2 on the engine's pydantic 1 options
def test_engine_self_test_detects_dropped_summary():
    engine = search.load_engine()

    class ForgetfulRun(engine.SweepRun):
        def metric_extremum(self, metric_name, kind):
            raise ValueError("Cannot extract metric")

    fake = types.SimpleNamespace(SweepRun=ForgetfulRun, RunState=engine.RunState, __version__="0.2.0")
    with pytest.raises(SearchEngineError, match="does not see a run's summary metric"):
        search.check_engine(fake)


def test_plain_value_converts_numpy():
    values = search.plain_value({"a": np.float64(0.5), "b": [np.int64(3)], "c": np.bool_(False)})
    assert values == {"a": 0.5, "b": [3], "c": False}
    assert type(values["a"]) is float
    assert type(values["b"][0]) is int
    assert type(values["c"]) is bool


def test_suggestion_keeps_list_and_bool_types(tmp_path):
    for _ in range(10):
        claim = suggest(sweep("s", SPACE), [])
        assert claim.config["expert_hidden"] in ([512, 256], [384, 192, 96])
        assert type(claim.config["expert_hidden"]) is list
        assert type(claim.config["use_drop_models"]) is bool
        assert type(claim.config["learning_rate"]) is float
        assert claim.config["epochs"] == 1


def test_list_value_round_trips(tmp_path):
    """A list value goes to the params file, back into a config, and into the engine again."""
    claim = suggest(sweep("s", SPACE), [])
    params_path = tmp_path / "config-run.yaml"
    write_params_file(params_path, claim.config)

    raw = yaml.safe_load(params_path.read_text())
    assert raw["wandb_version"] == 1
    assert raw["expert_hidden"] == {"value": claim.config["expert_hidden"]}
    read_back = config_lib.load_sweep_params(params_path)
    assert read_back == claim.config
    assert type(read_back["expert_hidden"]) is list
    resolved = config_lib.resolve(sweep_values=read_back)
    assert resolved["expert_hidden"] == claim.config["expert_hidden"]

    # The stored config is fed back to the engine for the next suggestions without error.
    runs = [run("r1", "s", "finished", dict(resolved), {EFFICIENCY: 1.0})]
    runs.append(run("r2", "s", "finished", fitting_config(0.002, (384, 192, 96), True), {EFFICIENCY: 2.0}))
    next_claim = suggest(sweep("s", SPACE), runs)
    assert next_claim.informed_by_own == 2


def test_config_key_equal_for_equal_configs():
    names = ["a", "b"]
    assert search.config_key({"a": [1, 2], "b": True}, names) == search.config_key({"b": True, "a": [1, 2], "c": 3}, names)
    assert search.config_key({"a": [1, 2]}, names) != search.config_key({"a": [2, 1]}, names)


# --------------------------------------------------------------------------------------------
# Fit to the parameter space
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, reason",
    [
        (fitting_config(), None),
        ({k: v for k, v in fitting_config().items() if k != "expert_hidden"}, "missing parameter expert_hidden"),
        (fitting_config(hidden=(256, 128)), "expert_hidden=[256, 128] is not one of the sweep's values"),
        (fitting_config(lr=0.5), "learning_rate=0.5 is outside the sweep's range"),
        (fitting_config(epochs=10), "epochs=10 differs from the sweep's fixed value 1"),
        (dict(fitting_config(), use_drop_models=1), "use_drop_models=1 is not one of the sweep's values"),
        (dict(fitting_config(), learning_rate=float("nan")), "learning_rate=nan is not a finite number"),
    ],
)
def test_fit_to_parameters(config, reason):
    values, misfit = fit_to_parameters(SPACE, config)
    if reason is None:
        assert misfit is None
        assert values == {k: config[k] for k in SPACE}
    else:
        assert values is None
        assert reason in str(misfit)


def test_fit_uses_sweep_spelling_of_values():
    values, _ = fit_to_parameters({"weight_decay": {"values": [0.0, 1e-4]}}, {"weight_decay": 0.00010000000000000002})
    assert values == {"weight_decay": 1e-4}


# --------------------------------------------------------------------------------------------
# Cross-sweep selection
# --------------------------------------------------------------------------------------------


def test_select_runs_cross_sweep():
    own, other = "eff", "acc"
    runs = [
        run("own_done", own, "finished", fitting_config(0.001), {EFFICIENCY: 2.0}),
        run("other_done", other, "finished", fitting_config(0.002), {EFFICIENCY: 1.5, "final/test_accuracy": 85.0}),
        run("standalone", None, "finished", fitting_config(0.003), {EFFICIENCY: 1.2}),
        run("other_running", other, "running", fitting_config(0.004)),
        run("own_failed", own, "failed", fitting_config(0.005)),
        run("own_crashed", own, "crashed", fitting_config(0.006)),
        run("own_killed", own, "killed", fitting_config(0.007)),
        run("other_failed", other, "failed", fitting_config(0.008)),
        run("no_metric", other, "finished", fitting_config(0.009), {"final/test_accuracy": 80.0}),
        run("epochs_10", None, "finished", fitting_config(0.001, epochs=10), {EFFICIENCY: 9.0}),
        run("missing_key", None, "finished", {"learning_rate": 0.001}, {EFFICIENCY: 9.0}),
    ]
    selection = select_runs(sweep(own, SPACE), runs)
    names = {r.name: r.state for r in selection.engine_runs}
    assert names == {
        "own_done": "finished",
        "other_done": "finished",
        "standalone": "finished",
        "other_running": "running",
        "own_failed": "failed",
        "own_crashed": "failed",
    }
    assert selection.informed_by_own == 1
    assert selection.informed_by_other == 2


def test_select_runs_passes_only_metric():
    runs = [run("a", "acc", "finished", fitting_config(), {EFFICIENCY: 1.5, "final/test_accuracy": 85.0, "config": {"x": 1}})]
    selection = select_runs(sweep("eff", SPACE), runs)
    assert selection.engine_runs[0].summary_metrics == {EFFICIENCY: 1.5}
    assert selection.engine_runs[0].config["expert_hidden"] == {"value": [512, 256]}


def test_select_runs_grid_uses_own_only():
    space = {"n_total": {"values": [4, 6]}}
    runs = [run("own", "g", "failed", {"n_total": 4}), run("other", "x", "finished", {"n_total": 6}, {EFFICIENCY: 1.0})]
    selection = select_runs(sweep("g", space, method="grid"), runs)
    assert [r.name for r in selection.engine_runs] == ["own"]
    assert (selection.informed_by_own, selection.informed_by_other) == (0, 0)


def test_select_runs_random_uses_none():
    runs = [run("own", "r", "finished", fitting_config(), {EFFICIENCY: 1.0})]
    selection = select_runs(sweep("r", SPACE, method="random"), runs)
    assert selection.engine_runs == []


# --------------------------------------------------------------------------------------------
# Failed runs are imputed as the worst, never as best
# --------------------------------------------------------------------------------------------


def gp_targets(sweep_record: dict, runs: list[dict]) -> dict[str, float]:
    """Return each engine run's target y as the bayes engine builds it (sign: lower is better)."""
    from sweeps.bayes_search import _construct_gp_data, bayes_baseline_validate_and_fill

    selection = select_runs(sweep_record, runs)
    config = bayes_baseline_validate_and_fill(search.engine_sweep_config(sweep_record["config"]))
    _, _, _, y, _ = _construct_gp_data(selection.engine_runs, config)
    sampled = [r.name for r in selection.engine_runs if r.state != "running"]
    return dict(zip(sampled, y.tolist()))


def test_nan_run_imputed_as_worst_efficiency():
    """A run that failed on a non-finite loss counts as the worst finished run, for maximize."""
    runs = [
        run("good", "eff", "finished", fitting_config(0.001), {EFFICIENCY: 3.0}),
        run("poor", "eff", "finished", fitting_config(0.002), {EFFICIENCY: 1.0}),
        run("nan", "eff", "failed", fitting_config(0.009), {"state": "failed", "reason": "non-finite loss at epoch 1, step 3",
                                                           EFFICIENCY: float("nan")}),
    ]
    y = gp_targets(sweep("eff", SPACE), runs)
    # The engine minimises y, so maximize goals are negated: lower y is better.
    assert y["good"] == -3.0
    assert y["poor"] == -1.0
    assert y["nan"] == -1.0
    assert y["nan"] >= max(y["good"], y["poor"])


def test_failed_metric_in_summary_ignored():
    """A failed run's own (partial) metric never makes it look better than the worst finished run."""
    runs = [
        run("poor", "eff", "finished", fitting_config(0.002), {EFFICIENCY: 1.0}),
        run("failed", "eff", "failed", fitting_config(0.009), {EFFICIENCY: 50.0}),
    ]
    y = gp_targets(sweep("eff", SPACE), runs)
    assert y["failed"] == y["poor"] == -1.0


def test_finished_nan_metric_imputed_as_worst():
    runs = [
        run("good", "eff", "finished", fitting_config(0.001), {EFFICIENCY: 3.0}),
        run("poor", "eff", "finished", fitting_config(0.002), {EFFICIENCY: 1.0}),
        run("nan", "acc", "finished", fitting_config(0.003), {EFFICIENCY: float("nan")}),
    ]
    y = gp_targets(sweep("eff", SPACE), runs)
    assert y["nan"] == -1.0


def test_only_failed_runs_imputed_zero():
    """With no finished run the engine imputes 0.0, the lowest efficiency there is, and samples at random."""
    runs = [run("f1", "eff", "failed", fitting_config(0.001)), run("f2", "eff", "failed", fitting_config(0.002))]
    y = gp_targets(sweep("eff", SPACE), runs)
    assert y == {"f1": 0.0, "f2": 0.0}
    claim = suggest(sweep("eff", SPACE), runs)
    assert claim.informed_by_own == 0


# --------------------------------------------------------------------------------------------
# Categorical falsy values
# --------------------------------------------------------------------------------------------


def test_engine_sweep_config_puts_falsy_first():
    config = search.engine_sweep_config({"method": "bayes", "parameters": {
        "a": {"values": [True, False]},
        "b": {"values": [0.001, 0.0, 0.01]},
        "c": {"values": ["x", "y"]},
        "d": {"value": 1},
    }})
    assert config["parameters"]["a"]["values"] == [False, True]
    assert config["parameters"]["b"]["values"] == [0.0, 0.001, 0.01]
    assert config["parameters"]["c"]["values"] == ["x", "y"]
    assert config["parameters"]["d"] == {"value": 1}


def test_false_value_encoded_correctly():
    """sweeps 0.3.0 encodes a falsy categorical value as index 0; reordering makes that False."""
    from sweeps.params import HyperParameterSet

    engine = search.load_engine()
    runs = [engine.SweepRun(name="r", state="finished", config={"flag": {"value": False}})]
    raw = HyperParameterSet.from_config({"flag": {"values": [True, False]}})
    fixed = HyperParameterSet.from_config(search.engine_sweep_config({"parameters": {"flag": {"values": [True, False]}}})["parameters"])
    true_position = raw.normalize_runs_as_array([engine.SweepRun(name="t", state="finished", config={"flag": {"value": True}})])
    assert raw.normalize_runs_as_array(runs)[0, 0] == true_position[0, 0]  # the engine's error
    assert fixed.normalize_runs_as_array(runs)[0, 0] != fixed.normalize_runs_as_array(
        [engine.SweepRun(name="t", state="finished", config={"flag": {"value": True}})]
    )[0, 0]


# --------------------------------------------------------------------------------------------
# Duplicates, grid exhaustion, run_cap and target
# --------------------------------------------------------------------------------------------


def test_duplicate_config_drawn_again():
    space = {"n_total": {"values": [4, 6]}}
    taken = search.config_key({"n_total": 4}, ["n_total"])
    for _ in range(5):
        claim = suggest(sweep("r", space, method="random"), [run("a", "r", "running", {"n_total": 4}, config_key=taken)])
        assert claim.config == {"n_total": 6}


def test_exhausted_space_repeats_with_warning(caplog):
    space = {"n_total": {"values": [4]}}
    taken = search.config_key({"n_total": 4}, ["n_total"])
    claim = suggest(sweep("r", space, method="random"), [run("a", "r", "finished", {"n_total": 4}, config_key=taken)])
    assert claim.config == {"n_total": 4}
    assert "parameter space may be exhausted" in caplog.text


def test_running_runs_spread_concurrent_suggestions(tmp_path):
    """Claims made back to back, with earlier claims still running, get different configs."""
    with Store(tmp_path / "s.db") as store:
        record = store.create_sweep("p", "eff", sweep("x", SPACE)["config"])
        configs = [store.claim_run(record["sweep_id"], suggest, tmp_path)["config"] for _ in range(5)]
    keys = {search.config_key(c, list(SPACE)) for c in configs}
    assert len(keys) == 5


def test_grid_exhausted_raises_complete():
    space = {"n_total": {"values": [4, 6]}}
    grid = sweep("g", space, method="grid")
    first = suggest(grid, [])
    second = suggest(grid, [run("a", "g", "finished", first.config, config_key=first.config_key)])
    assert {first.config["n_total"], second.config["n_total"]} == {4, 6}
    runs = [run("a", "g", "finished", first.config), run("b", "g", "failed", second.config)]
    with pytest.raises(SweepComplete, match="grid is exhausted"):
        suggest(grid, runs)


def test_run_cap_raises_complete():
    capped = sweep("c", SPACE, run_cap=2)
    runs = [run("a", "c", "finished", fitting_config(0.001)), run("b", "c", "crashed", fitting_config(0.002))]
    with pytest.raises(SweepComplete, match="has 2 runs and run_cap is 2"):
        suggest(capped, runs)


def test_metric_target_raises_complete():
    targeted = sweep("t", SPACE)
    targeted["config"]["metric"]["target"] = 2.0
    runs = [run("a", "t", "finished", fitting_config(0.001), {EFFICIENCY: 2.5})]
    with pytest.raises(SweepComplete, match="reached the target"):
        suggest(targeted, runs)
    suggest(targeted, [run("a", "t", "finished", fitting_config(0.001), {EFFICIENCY: 1.5})])
