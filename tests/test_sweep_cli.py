"""`collective sweep create|list|show` and `collective agent` on the local backend, in process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from collective_model.sweeps.store import Claim, Store
from conftest import invoke

INVALID_SWEEP = """
method: bayes
metric: {name: final/test_accuracy, goal: maximize}
parameters:
  learning_rate:
    distribution: uniform
    max: 0.1
  n_totl:
    values: [4, 8]
"""




def store_sweeps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with Store(path) as store:
        return store.list_sweeps()


def test_create_local_prints_id_and_agent_command(env):
    result = invoke("sweep", "create", "accuracy", "--set", "epochs=1", "--set", "train_subset=5000", "--project", "study")
    assert result.exit_code == 0, result.output
    sweeps = store_sweeps(env / ".collective" / "store.db")
    assert len(sweeps) == 1
    sweep = sweeps[0]
    assert f"created sweep {sweep['sweep_id']} (accuracy: bayes, maximize final/test_accuracy) in project study" in result.stdout
    assert f"collective agent {sweep['sweep_id']}\n" in result.stdout
    assert "backend: local (no W&B credentials" in result.stdout
    assert sweep["project"] == "study"
    assert sweep["name"] == "accuracy"
    assert sweep["config"]["parameters"]["epochs"] == {"value": 1}
    assert sweep["config"]["parameters"]["train_subset"] == {"value": 5000}
    assert sweep["config"]["command"] == ["${env}", "collective", "train"]


def test_create_quiet_prints_only_id(env):
    result = invoke("sweep", "create", "efficiency", "-q")
    assert result.exit_code == 0
    sweep_id = result.stdout.strip()
    assert [s["sweep_id"] for s in store_sweeps(env / ".collective" / "store.db")] == [sweep_id]


def test_create_with_store_option(env):
    result = invoke("sweep", "create", "accuracy", "--store", "elsewhere/s.db")
    assert result.exit_code == 0
    assert "--store elsewhere/s.db" in result.stdout
    assert len(store_sweeps(env / "elsewhere" / "s.db")) == 1


def test_create_store_from_environment(env, monkeypatch):
    monkeypatch.setenv("COLLECTIVE_STORE", str(env / "from-env.db"))
    assert invoke("sweep", "create", "accuracy", "-q").exit_code == 0
    assert len(store_sweeps(env / "from-env.db")) == 1


def test_create_invalid_file_rejected(env):
    (env / "bad.yaml").write_text(INVALID_SWEEP)
    invoke("sweep", "create", "accuracy")  # one valid sweep already in the store
    result = invoke("sweep", "create", "bad.yaml")
    assert result.exit_code == 2
    assert "invalid sweep config" in result.stderr
    assert "parameters.learning_rate: distribution uniform is invalid (missing min)" in result.stderr
    assert "unknown key 'n_totl'" in result.stderr
    assert "Traceback" not in result.output
    assert len(store_sweeps(env / ".collective" / "store.db")) == 1


def test_create_invalid_file_creates_no_store(env):
    (env / "bad.yaml").write_text(INVALID_SWEEP)
    assert invoke("sweep", "create", "bad.yaml").exit_code == 2
    assert not (env / ".collective" / "store.db").exists()


@pytest.mark.parametrize(
    "set_item, message",
    [
        ("epochz=1", "unknown key 'epochz' in the sweep's parameters; did you mean 'epochs'?"),
        ("epochs=0", "parameter epochs, value: invalid value 0"),
        ("epochs", "--set 'epochs': expected key=value"),
        ("expert_hidden=[512", "value is not valid YAML"),
    ],
)
def test_create_invalid_set_rejected(env, set_item, message):
    result = invoke("sweep", "create", "accuracy", "--set", set_item)
    assert result.exit_code == 2
    assert message in result.stderr
    assert store_sweeps(env / ".collective" / "store.db") == []


def test_create_unknown_name(env):
    result = invoke("sweep", "create", "acuracy")
    assert result.exit_code == 2
    assert "no sweep named 'acuracy'" in result.stderr


def test_create_local_rejects_wandb_only_sections(env):
    (env / "hb.yaml").write_text(
        "method: random\nearly_terminate: {type: hyperband, min_iter: 2}\nparameters: {epochs: {values: [1, 2]}}\n"
    )
    result = invoke("sweep", "create", "hb.yaml", "--backend", "local")
    assert result.exit_code == 2
    assert "early_terminate: not supported by the local backend" in result.stderr


def test_create_fills_missing_command(env):
    (env / "nocmd.yaml").write_text("method: random\nparameters: {epochs: {values: [1, 2]}}\n")
    result = invoke("sweep", "create", "nocmd.yaml")
    assert result.exit_code == 0
    assert "has no command; using ${env} collective train" in result.stderr
    assert store_sweeps(env / ".collective" / "store.db")[0]["config"]["command"] == ["${env}", "collective", "train"]


def test_create_auto_offline_mode_is_local(env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = invoke("sweep", "create", "accuracy")
    assert result.exit_code == 0
    assert "backend: local (WANDB_MODE=offline)" in result.stdout
    assert "x" * 40 not in result.output


# --------------------------------------------------------------------------------------------
# list and show
# --------------------------------------------------------------------------------------------


def populated_store(env: Path) -> tuple[str, str]:
    """Two sweeps of project 'study' with finished, failed and running runs, and one standalone run."""
    path = env / ".collective" / "store.db"
    accuracy_id = invoke("sweep", "create", "accuracy", "-q", "--project", "study").stdout.strip()
    efficiency_id = invoke("sweep", "create", "efficiency", "-q", "--project", "study").stdout.strip()
    with Store(path) as store:
        for number, (value, state) in enumerate([(85.0, "finished"), (87.5, "finished"), (float("nan"), "failed")]):
            run = store.claim_run(accuracy_id, lambda s, r, n=number: Claim({"n_total": 4 + n}, str(n), n, 1), env / "runs")
            summary = {"final/test_accuracy": value, "model_params": 100000 + number}
            store.finish_run(run["run_id"], state, 0 if state == "finished" else 3, None if state == "finished" else "non-finite loss", summary, None, 10.0 + number)
        store.claim_run(efficiency_id, lambda s, r: Claim({"n_total": 8}, "x", 0, 2), env / "runs")
        store.record_summary({"run_id": "solo0001", "project": "study", "state": "finished", "config": {}, "final/test_accuracy": 80.0})
    return accuracy_id, efficiency_id


def test_list_table(env):
    accuracy_id, efficiency_id = populated_store(env)
    result = invoke("sweep", "list", "--project", "study")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "project study"
    assert lines[1].split() == ["sweep", "name", "method", "metric", "runs", "running", "finished", "failed", "crashed", "killed", "best", "best", "run"]
    accuracy_row = next(line for line in lines if line.startswith(accuracy_id)).split()
    assert accuracy_row[1:] == ["accuracy", "bayes", "max", "final/test_accuracy", "3", "0", "2", "1", "0", "0", "87.5", accuracy_row[-1]]
    efficiency_row = next(line for line in lines if line.startswith(efficiency_id)).split()
    assert efficiency_row[5:7] == ["1", "1"]  # one run, running
    assert "standalone runs (collective train outside an agent): 1" in result.stdout


def test_list_json(env):
    accuracy_id, _ = populated_store(env)
    result = invoke("sweep", "list", "--project", "study", "--format", "json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)  # strict JSON: NaN became null
    assert data["project"] == "study"
    sweep = next(s for s in data["sweeps"] if s["sweep_id"] == accuracy_id)
    assert sweep["counts"]["finished"] == 2
    assert sweep["best_value"] == 87.5
    assert len(sweep["runs"]) == 3
    run = sweep["runs"][2]
    assert set(run) >= {"run_id", "state", "config", "summary", "informed_by_own", "informed_by_other"}
    assert run["summary"]["final/test_accuracy"] is None
    assert run["state"] == "failed"
    assert [r["run_id"] for r in data["standalone_runs"]] == ["solo0001"]


def test_list_empty_project(env):
    populated_store(env)
    result = invoke("sweep", "list", "--project", "other")
    assert result.exit_code == 0
    assert "no sweeps in project other" in result.stdout


def test_list_without_store(env):
    result = invoke("sweep", "list")
    assert result.exit_code == 1
    assert "no store at" in result.stderr


def test_show_table(env):
    accuracy_id, _ = populated_store(env)
    result = invoke("sweep", "show", accuracy_id)
    assert result.exit_code == 0, result.output
    assert f"sweep {accuracy_id} (accuracy: bayes, maximize final/test_accuracy) in project study" in result.stdout
    assert "runs: 3 (2 finished, 1 failed)" in result.stdout
    assert "best so far: final/test_accuracy = 87.5" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines()[4:]]
    assert [row[1:6] for row in rows] == [
        ["finished", "85", "100000", "0/1", "10"],
        ["finished", "87.5", "100001", "1/1", "11"],
        ["failed", "nan", "100002", "2/1", "12"],
    ]
    assert "non-finite loss" in result.stdout


def test_show_json(env):
    accuracy_id, _ = populated_store(env)
    result = invoke("sweep", "show", accuracy_id, "--format", "json")
    data = json.loads(result.stdout)
    assert data["sweep_id"] == accuracy_id
    assert data["best_value"] == 87.5
    assert [r["informed_by_own"] for r in data["runs"]] == [0, 1, 2]
    assert [r["config"] for r in data["runs"]] == [{"n_total": 4}, {"n_total": 5}, {"n_total": 6}]


def test_show_unknown_sweep(env):
    populated_store(env)
    result = invoke("sweep", "show", "nosuchid")
    assert result.exit_code == 2
    assert "sweep nosuchid not found in the store" in result.stderr


def test_agent_unknown_sweep(env):
    populated_store(env)
    result = invoke("agent", "nosuchid", "--count", "1")
    assert result.exit_code == 2
    assert "sweep nosuchid not found in the store" in result.stderr
    assert "--backend wandb" in result.stderr
