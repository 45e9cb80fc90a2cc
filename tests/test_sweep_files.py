"""The shipped sweep files and the validation of sweep files and --set pins."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import yaml

from collective_model import config as config_lib
from collective_model.sweeps import spec
from collective_model.sweeps.search import load_engine, plain_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"accuracy": "final/test_accuracy", "efficiency": "final/param_efficiency"}


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "sweeps" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_passes_wandb_schema(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sweeps import SweepConfig, schema_violations_from_proposed_config

    config = load(name)
    assert schema_violations_from_proposed_config(config) == []
    assert SweepConfig(config)["method"] == "bayes"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_passes_own_checks(name):
    config = load(name)
    assert spec.validate_sweep_config(config, "local") == []
    assert spec.validate_sweep_config(config, "wandb") == []


@pytest.mark.parametrize("name, metric", sorted(SHIPPED.items()))
def test_shipped_file_metric_and_command(name, metric):
    config = load(name)
    assert config["name"] == name
    assert config["method"] == "bayes"
    assert config["metric"] == {"name": metric, "goal": "maximize"}
    # `wandb agent` expands ${env} to /usr/bin/env; collective train reads WANDB_SWEEP_PARAM_PATH.
    assert config["command"] == ["${env}", "collective", "train"]


def test_shipped_parameters_identical():
    assert load("accuracy")["parameters"] == load("efficiency")["parameters"]


def test_shipped_space_covers_knobs():
    parameters = load("accuracy")["parameters"]
    expected = {
        "n_total", "expert_ratio", "expert_hidden", "expert_output", "analyst_hidden", "analyst_output",
        "c_expert", "c_collective", "collective_version", "vary_expert_architectures", "vary_analyst_architectures",
        "use_expert_diversity", "use_analyst_diversity", "diversity_lambda", "diversity_temperature",
        "use_drop_models", "drop_models_expert_rate", "drop_models_analyst_rate",
        "learning_rate", "batch_size", "optimizer", "weight_decay", "epochs",
    }
    assert expected <= set(parameters)
    assert set(parameters) <= set(config_lib.KEYS)
    assert parameters["learning_rate"]["distribution"] == "log_uniform_values"
    assert all(isinstance(widths, list) for widths in parameters["expert_hidden"]["values"])
    assert all(isinstance(widths, list) for widths in parameters["analyst_hidden"]["values"])
    for name in ("use_drop_models", "use_expert_diversity", "vary_expert_architectures"):
        assert parameters[name]["values"] == [False, True]
    assert parameters["epochs"] == {"value": 15}


@pytest.mark.parametrize("method", ["random", "bayes"])
def test_shipped_space_always_valid(method):
    """300 draws of the engine give configs that `collective train` accepts."""
    engine = load_engine()
    config = dict(load("efficiency"), method=method)
    random.seed(0)
    for _ in range(300 if method == "random" else 30):
        values = plain_config(engine.next_run(config, []).config)
        resolved = config_lib.resolve(sweep_values=values)
        assert resolved["n_total"] >= 3
        assert isinstance(resolved["expert_hidden"], list)


# --------------------------------------------------------------------------------------------
# Finding files and pinning
# --------------------------------------------------------------------------------------------


def test_find_shipped_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert spec.find_sweep_file("accuracy") == REPO / "sweeps" / "accuracy.yaml"


def test_find_prefers_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "accuracy.yaml").write_text("method: random\n")
    assert spec.find_sweep_file("accuracy") == tmp_path / "sweeps" / "accuracy.yaml"


def test_find_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(spec.SweepSpecError, match="no sweep named 'acuracy'.*accuracy, efficiency"):
        spec.find_sweep_file("acuracy")


def test_find_missing_path(tmp_path):
    with pytest.raises(spec.SweepSpecError, match="sweep file not found"):
        spec.find_sweep_file(str(tmp_path / "nope.yaml"))


def test_load_rejects_non_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(spec.SweepSpecError, match="expected a mapping"):
        spec.load_sweep_file(path)


def test_load_rejects_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: [bayes\n")
    with pytest.raises(spec.SweepSpecError, match="not valid YAML"):
        spec.load_sweep_file(path)


def test_pin_replaces_and_adds():
    pinned = spec.pin_parameters(load("accuracy"), {"epochs": 1, "train_subset": 5000})
    assert pinned["parameters"]["epochs"] == {"value": 1}
    assert pinned["parameters"]["train_subset"] == {"value": 5000}
    assert load("accuracy")["parameters"]["epochs"] == {"value": 15}  # the original is untouched


def test_default_command_filled():
    filled, was_filled = spec.with_default_command({"method": "random"})
    assert was_filled
    assert filled["command"] == ["${env}", "collective", "train"]
    kept, was_filled = spec.with_default_command({"method": "random", "command": ["x"]})
    assert not was_filled
    assert kept["command"] == ["x"]


def test_sweep_name_from_field_or_stem():
    assert spec.sweep_name({"name": "acc"}, Path("x/file.yaml")) == "acc"
    assert spec.sweep_name({}, Path("x/file.yaml")) == "file"


# --------------------------------------------------------------------------------------------
# Validation: every problem listed
# --------------------------------------------------------------------------------------------


def base(**parameters) -> dict:
    return {
        "method": "bayes",
        "metric": {"name": "final/test_accuracy", "goal": "maximize"},
        "command": ["${env}", "collective", "train"],
        "parameters": parameters or {"learning_rate": {"min": 0.001, "max": 0.1}},
    }


@pytest.mark.parametrize(
    "config, expected",
    [
        (base(learning_rate={"distribution": "uniform", "max": 0.1}), "parameters.learning_rate: distribution uniform is invalid (missing min)"),
        (base(optimizer={"valuez": ["adam"]}), "parameters.optimizer: this parameter is invalid (missing values; unexpected valuez)"),
        (base(optimizer={"values": []}), "parameters.optimizer: values must be a non-empty list"),
        (base(epochs={"distribution": "gaussian"}), "parameters.epochs: unknown distribution 'gaussian'"),
        (base(seed=3), "parameters.seed: expected a mapping such as {value: 3}"),
        (base(n_totl={"values": [4]}), "unknown key 'n_totl' in the sweep's parameters; did you mean 'n_total'?"),
        (base(batch_size={"min": 16.0, "max": 64.0}), "parameter batch_size, min: invalid value 16.0 (float); expected an integer"),
        (base(expert_hidden={"values": [[512]]}), "parameter expert_hidden, values: invalid value [512]"),
        (base(use_drop_models={"values": [True, "no"]}), "parameter use_drop_models, values: invalid value 'no'"),
        (base(epochs={"value": 0}), "parameter epochs, value: invalid value 0"),
        (dict(base(), metric={"name": "final/test_accuracy", "goal": "maximise"}), "metric.goal: 'maximise' is not one of"),
        (dict(base(), metric={"name": "final/test_accuracy"}), "has no goal: add `goal: maximize`"),
        (dict(base(), metric=None), "method bayes needs a metric"),
        (dict(base(), method="hyperopt"), "'hyperopt' is not one of"),
        (dict(base(), command="collective train"), "command must be a list of strings"),
        (dict(base(), early_terminate={"type": "hyperband", "min_iter": 3}), "early_terminate: not supported by the local backend"),
    ],
)
def test_invalid_config_problem_listed(config, expected):
    config = {k: v for k, v in config.items() if v is not None}
    problems = spec.validate_sweep_config(config, "local")
    assert any(expected in problem for problem in problems), problems


def test_all_problems_listed_together():
    config = base(
        learning_rate={"distribution": "uniform", "max": 0.1},
        n_totl={"values": [4]},
        batch_size={"values": [0]},
    )
    problems = spec.validate_sweep_config(config, "local")
    assert len(problems) == 3
    assert any("learning_rate" in p for p in problems)
    assert any("n_totl" in p for p in problems)
    assert any("batch_size" in p for p in problems)


def test_wandb_backend_allows_early_terminate():
    config = dict(base(), early_terminate={"type": "hyperband", "min_iter": 3})
    assert spec.validate_sweep_config(config, "wandb") == []


def test_spec_error_lists_problems():
    error = spec.SweepSpecError("f.yaml", ["a is wrong", "b is wrong"])
    assert error.exit_code == 2
    assert str(error) == "invalid sweep config f.yaml:\n  - a is wrong\n  - b is wrong"
