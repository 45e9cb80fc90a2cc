"""Sweeps with the real `collective train` on the real Fashion-MNIST (tiny models, one epoch, 500 examples).

Each agent and training run is a subprocess in W&B offline mode, in a fresh working directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from collective_model.sweeps.store import Store
from conftest import isolated_env, run_collective

# Tiny settings pinned in every sweep below; one run takes about 10 s on a 2-core CPU.
TINY = {"epochs": 1, "train_subset": 500, "analyst_hidden": [32, 16], "n_total": 4, "expert_output": 16, "analyst_output": 16}

SWEEP_FILE = {
    "method": "bayes",
    "metric": {"name": "final/param_efficiency", "goal": "maximize"},
    "command": ["${env}", "collective", "train"],
    "parameters": {
        "expert_hidden": {"values": [[32, 16], [24, 12, 6]]},
        "use_drop_models": {"values": [True, False]},
        "learning_rate": {"distribution": "log_uniform_values", "min": 0.0005, "max": 0.005},
        **{name: {"value": value} for name, value in TINY.items()},
    },
}

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(tmp_path, fashion_mnist_dir):
    (tmp_path / "home").mkdir()
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(SWEEP_FILE))
    return tmp_path


def collective(workdir: Path, *args: str):
    return run_collective(list(args), workdir, isolated_env(workdir / "home"), timeout=900)


def store_runs(workdir: Path, **filters) -> list[dict]:
    with Store(workdir / ".collective" / "store.db") as store:
        return store.list_runs(**filters)


def test_agent_trains_swept_values_and_learns_across(workdir):
    created = collective(workdir, "sweep", "create", "tiny.yaml", "-q", "--project", "study")
    assert created.returncode == 0, created.stderr
    sweep_id = created.stdout.strip()

    # 1. Two sweep runs: each trains with exactly the suggested list and boolean.
    agent = collective(workdir, "agent", sweep_id, "--count", "2")
    assert agent.returncode == 0, agent.stdout + agent.stderr
    runs = store_runs(workdir, sweep_id=sweep_id)
    assert [r["state"] for r in runs] == ["finished", "finished"]
    for run in runs:
        trained = yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())
        assert trained["expert_hidden"] == run["config"]["expert_hidden"]
        assert type(trained["expert_hidden"]) is list
        assert trained["use_drop_models"] is run["config"]["use_drop_models"]
        assert trained["learning_rate"] == pytest.approx(run["config"]["learning_rate"])
        assert run["summary"]["sweep_id"] == sweep_id
        assert run["summary"]["final/param_efficiency"] > 0
        assert run["summary"]["model_params"] > 0
        assert run["summary"]["wandb_mode"] == "offline"
        assert "finished" in agent.stdout

    # 2. `collective train` by hand in the same folder after the agent: a standalone run.
    manual = collective(workdir, "train", "-q", "--project", "study", "--set", "expert_hidden=[32,16]",
                        "--set", "use_drop_models=false", "--set", "learning_rate=0.001",
                        *[f"--set={name}={json.dumps(value)}" for name, value in TINY.items()])
    assert manual.returncode == 0, manual.stderr
    standalone = [r for r in store_runs(workdir, project="study") if r["sweep_id"] is None]
    assert len(standalone) == 1
    assert standalone[0]["state"] == "finished"
    assert standalone[0]["summary"]["sweep_id"] is None

    # 3. A second sweep in the project learns from the first sweep's runs and the standalone run.
    second = collective(workdir, "sweep", "create", "tiny.yaml", "-q", "--project", "study")
    other_id = second.stdout.strip()
    agent = collective(workdir, "agent", other_id, "--count", "1")
    assert agent.returncode == 0, agent.stdout + agent.stderr
    (run,) = store_runs(workdir, sweep_id=other_id)
    assert run["state"] == "finished"
    assert (run["informed_by_own"], run["informed_by_other"]) == (0, 3)

    # 4. `sweep show` reports it.
    show = collective(workdir, "sweep", "show", other_id, "--format", "json")
    data = json.loads(show.stdout)
    assert data["runs"][0]["informed_by_other"] == 3


def test_invalid_combinations_stop_agent(workdir):
    """Every suggestion is an invalid config, rejected by `collective train` in under a second."""
    sweep_file = {
        "method": "random",
        "command": ["${env}", "collective", "train"],
        "parameters": {"n_total": {"value": 3}, "n_experts": {"values": [5, 6, 7]}},
    }
    (workdir / "invalid.yaml").write_text(yaml.safe_dump(sweep_file))
    created = collective(workdir, "sweep", "create", "invalid.yaml", "-q")
    assert created.returncode == 0, created.stderr
    sweep_id = created.stdout.strip()

    agent = collective(workdir, "agent", sweep_id, "--max-failures", "3")
    assert agent.returncode == 1
    runs = store_runs(workdir, sweep_id=sweep_id)
    assert len(runs) == 3
    assert "the agent stopped after these runs in a row did not finish" in agent.stderr
    for run in runs:
        assert run["state"] == "failed"
        assert run["exit_code"] == 2
        assert run["reason"].startswith("invalid configuration: n_experts:")
        assert run["duration_s"] < 10
        assert f"run {run['run_id']}: failed, exit code 2" in agent.stderr
        assert run["log_path"] in agent.stderr


def test_diverging_run_recorded_failed(workdir):
    """A real run whose loss overflows: failed, reason non-finite loss, and the agent goes on."""
    sweep_file = {
        "method": "random",
        "metric": {"name": "final/param_efficiency", "goal": "maximize"},
        "command": ["${env}", "collective", "train"],
        "parameters": {
            # SGD with learning_rate 10 and weight_decay 1 multiplies each weight by about -9 per
            # step, so the loss overflows within a few dozen steps.
            "learning_rate": {"values": [10.0]},
            "optimizer": {"value": "sgd"},
            "weight_decay": {"value": 1.0},
            "batch_size": {"value": 16},
            "expert_hidden": {"value": [32, 16]},
            **{name: {"value": value} for name, value in TINY.items()},
        },
    }
    (workdir / "diverging.yaml").write_text(yaml.safe_dump(sweep_file))
    created = collective(workdir, "sweep", "create", "diverging.yaml", "-q")
    assert created.returncode == 0, created.stderr
    sweep_id = created.stdout.strip()

    agent = collective(workdir, "agent", sweep_id, "--count", "2", "--max-failures", "5")
    assert agent.returncode == 0, agent.stdout + agent.stderr
    runs = store_runs(workdir, sweep_id=sweep_id)
    assert len(runs) == 2
    for run in runs:
        assert run["state"] == "failed"
        assert run["exit_code"] == 3
        assert run["reason"].startswith("non-finite loss at epoch 1, step")
        assert "final/param_efficiency" not in run["summary"]
