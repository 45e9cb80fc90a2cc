"""The W&B backend, with W&B mocked at the `wandb` API boundary (wandb.Api, wandb.sweep, wandb.agent)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import wandb

from collective_model.sweeps import wandb_backend
from collective_model.sweeps.store import Store
from conftest import invoke

FAKE_KEY = "k" * 40




def api_run(run_id: str, state: str = "finished", **overrides) -> SimpleNamespace:
    """A run as wandb.Api().runs() returns it: id, state, config (plain values), summary_metrics."""
    config = {
        "n_total": 8, "expert_ratio": 0.3, "expert_hidden": [512, 256], "expert_output": 64,
        "analyst_hidden": [128, 64], "analyst_output": 64, "c_expert": 0.25, "c_collective": 1.0,
        "collective_version": "simple_mlp", "vary_expert_architectures": False, "vary_analyst_architectures": True,
        "use_expert_diversity": True, "use_analyst_diversity": False, "diversity_lambda": 0.01,
        "diversity_temperature": 1.0, "use_drop_models": False, "drop_models_expert_rate": 0.1,
        "drop_models_analyst_rate": 0.1, "learning_rate": 0.001, "batch_size": 128, "optimizer": "adam",
        "weight_decay": 0.0, "epochs": 15, "seed": 42,
    }
    summary = {"final/test_accuracy": 88.0, "final/param_efficiency": 2.5, "model_params": 3_500_000}
    config.update(overrides.pop("config", {}))
    summary.update(overrides.pop("summary", {}))
    return SimpleNamespace(id=run_id, state=state, config=config, summary_metrics=summary, **overrides)


class FakeApi:
    """wandb.Api stand-in that records the path asked for."""

    runs_by_path: dict = {}
    requested: list = []

    def runs(self, path=None, **kwargs):
        FakeApi.requested.append(path)
        return list(FakeApi.runs_by_path.get(path, []))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = {"sweep": [], "agent": []}

    def fake_sweep(sweep, entity=None, project=None, prior_runs=None):
        calls["sweep"].append({"sweep": sweep, "entity": entity, "project": project, "prior_runs": prior_runs})
        return "wb5weep1"

    def fake_agent(sweep_id, function=None, entity=None, project=None, count=None, max_consecutive_failed_runs=None, **kwargs):
        calls["agent"].append({"sweep_id": sweep_id, "entity": entity, "project": project, "count": count,
                               "max_consecutive_failed_runs": max_consecutive_failed_runs})

    FakeApi.runs_by_path = {}
    FakeApi.requested = []
    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setattr(wandb, "sweep", fake_sweep)
    monkeypatch.setattr(wandb, "agent", fake_agent)
    return calls


# --------------------------------------------------------------------------------------------
# Credentials and backend choice
# --------------------------------------------------------------------------------------------


def test_credentials_from_api_key():
    assert wandb_backend.credentials_source({"WANDB_API_KEY": FAKE_KEY}) == "WANDB_API_KEY"


def test_credentials_from_identity_token_file():
    assert wandb_backend.credentials_source({"WANDB_IDENTITY_TOKEN_FILE": "/tmp/token"}) == "WANDB_IDENTITY_TOKEN_FILE"


def test_credentials_from_netrc(tmp_path):
    netrc_path = tmp_path / "netrc"
    netrc_path.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc_path.chmod(0o600)
    assert wandb_backend.credentials_source({"NETRC": str(netrc_path)}) == str(netrc_path)


def test_credentials_netrc_for_self_hosted(tmp_path):
    netrc_path = tmp_path / "netrc"
    netrc_path.write_text(f"machine 127.0.0.1:8080\n  login user\n  password {FAKE_KEY}\n")
    netrc_path.chmod(0o600)
    env = {"NETRC": str(netrc_path), "WANDB_BASE_URL": "http://127.0.0.1:8080"}
    assert wandb_backend.credentials_source(env) == str(netrc_path)
    assert wandb_backend.credentials_source({"NETRC": str(netrc_path)}) is None  # other host


def test_no_credentials(tmp_path):
    assert wandb_backend.credentials_source({"NETRC": str(tmp_path / "missing")}) is None


@pytest.mark.parametrize(
    "requested, env, expected",
    [
        ("local", {"WANDB_API_KEY": FAKE_KEY}, "local"),
        ("wandb", {}, "wandb"),
        ("auto", {"WANDB_API_KEY": FAKE_KEY}, "wandb"),
        ("auto", {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "offline"}, "local"),
        ("auto", {"WANDB_API_KEY": FAKE_KEY, "WANDB_MODE": "disabled"}, "local"),
        ("auto", {"NETRC": "/nonexistent/netrc"}, "local"),
    ],
)
def test_choose_backend(requested, env, expected):
    backend, why = wandb_backend.choose_backend(requested, env)
    assert backend == expected
    assert FAKE_KEY not in why


# --------------------------------------------------------------------------------------------
# Prior runs
# --------------------------------------------------------------------------------------------


def test_select_prior_runs_reasons():
    parameters = {
        "learning_rate": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01},
        "expert_hidden": {"values": [[512, 256], [384, 192, 96]]},
        "epochs": {"value": 15},
    }
    config = {"metric": {"name": "final/param_efficiency", "goal": "maximize"}, "parameters": parameters}
    runs = [
        api_run("fits0001"),
        api_run("fits0002", config={"expert_hidden": [384, 192, 96]}),
        api_run("running1", state="running"),
        api_run("nometric", summary={"final/param_efficiency": None}),
        api_run("nanmetri", summary={"final/param_efficiency": float("nan")}),
        api_run("lr_high1", config={"learning_rate": 0.5}),
        api_run("lr_high2", config={"learning_rate": 0.2}),
        api_run("epochs_1", config={"epochs": 1}),
        api_run("hidden_x", config={"expert_hidden": [64, 32]}),
    ]
    del runs[-1].config["expert_hidden"]
    prior = wandb_backend.select_prior_runs(runs, config)
    assert prior.run_ids == ["fits0001", "fits0002"]
    assert dict(prior.skipped) == {
        "state running, not finished": 1,
        "no final/param_efficiency in the summary": 2,
        "learning_rate outside the sweep's space": 2,
        "epochs outside the sweep's space": 1,
        "missing parameter expert_hidden": 1,
    }
    assert prior.examples["learning_rate outside the sweep's space"] == "lr_high1"


# --------------------------------------------------------------------------------------------
# sweep create --backend wandb
# --------------------------------------------------------------------------------------------


def test_create_on_wandb_passes_prior_runs(env, fake_wandb):
    FakeApi.runs_by_path["team/study"] = [
        api_run("fits0001", config={"epochs": 1, "train_subset": 5000}),
        api_run("epochs15"),
        api_run("crashed1", state="crashed"),
    ]
    result = invoke("sweep", "create", "efficiency", "--backend", "wandb", "--project", "study", "--entity", "team",
                    "--set", "epochs=1", "--set", "train_subset=5000")
    assert result.exit_code == 0, result.output
    assert FakeApi.requested == ["team/study"]
    assert len(fake_wandb["sweep"]) == 1
    call = fake_wandb["sweep"][0]
    assert call["project"] == "study"
    assert call["entity"] == "team"
    assert call["prior_runs"] == ["fits0001"]
    assert call["sweep"]["metric"] == {"name": "final/param_efficiency", "goal": "maximize"}
    assert call["sweep"]["parameters"]["epochs"] == {"value": 1}
    assert call["sweep"]["parameters"]["train_subset"] == {"value": 5000}
    assert call["sweep"]["command"] == ["${env}", "collective", "train"]
    assert "backend: wandb (--backend wandb)" in result.stdout
    assert "created W&B sweep team/study/wb5weep1" in result.stdout
    assert "prior runs attached: 1 of 3 runs in the project" in result.stdout
    assert "not attached: 1 run(s), epochs outside the sweep's space (e.g. epochs15)" in result.stdout
    assert "not attached: 1 run(s), state crashed, not finished (e.g. crashed1)" in result.stdout
    assert "wandb agent team/study/wb5weep1" in result.stdout
    assert not (env / ".collective" / "store.db").exists()


def test_create_auto_with_key_uses_wandb(env, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    result = invoke("sweep", "create", "accuracy", "--project", "study")
    assert result.exit_code == 0, result.output
    assert "backend: wandb (W&B credentials found in WANDB_API_KEY)" in result.stdout
    assert FakeApi.requested == ["study"]
    assert fake_wandb["sweep"][0]["entity"] is None
    assert fake_wandb["sweep"][0]["prior_runs"] == []
    assert FAKE_KEY not in result.output


def test_create_wandb_allows_wandb_only_sections(env, fake_wandb):
    (env / "hb.yaml").write_text(
        "method: bayes\nmetric: {name: final/test_accuracy, goal: maximize}\n"
        "early_terminate: {type: hyperband, min_iter: 2}\nparameters: {epochs: {values: [1, 2]}}\n"
    )
    result = invoke("sweep", "create", "hb.yaml", "--backend", "wandb", "--project", "p")
    assert result.exit_code == 0, result.output
    assert fake_wandb["sweep"][0]["sweep"]["early_terminate"]["type"] == "hyperband"


def test_create_wandb_invalid_file_not_sent(env, fake_wandb):
    (env / "bad.yaml").write_text("method: bayes\nmetric: {name: m, goal: maximize}\nparameters: {learning_rate: {distribution: uniform, max: 1}}\n")
    result = invoke("sweep", "create", "bad.yaml", "--backend", "wandb")
    assert result.exit_code == 2
    assert "missing min" in result.stderr
    assert fake_wandb["sweep"] == []


def test_create_wandb_failure_reported(env, monkeypatch):
    monkeypatch.setattr(wandb, "Api", FakeApi)

    def failing_sweep(*args, **kwargs):
        raise ValueError("project not found")

    monkeypatch.setattr(wandb, "sweep", failing_sweep)
    result = invoke("sweep", "create", "accuracy", "--backend", "wandb", "--project", "p")
    assert result.exit_code == 1
    assert "creating the sweep on W&B in project 'p' failed: project not found" in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# collective agent on a W&B sweep id
# --------------------------------------------------------------------------------------------


def test_agent_full_path_hands_over(env, fake_wandb):
    result = invoke("agent", "team/study/wb5weep1", "--count", "2")
    assert result.exit_code == 0, result.output
    assert fake_wandb["agent"] == [{"sweep_id": "team/study/wb5weep1", "entity": None, "project": None, "count": 2,
                                    "max_consecutive_failed_runs": 5}]
    assert "handing over to wandb agent" in result.stderr


def test_agent_bare_id_with_wandb_backend(env, fake_wandb):
    result = invoke("agent", "wb5weep1", "--backend", "wandb", "--project", "study", "--entity", "team", "--max-failures", "3")
    assert result.exit_code == 0, result.output
    assert fake_wandb["agent"] == [{"sweep_id": "wb5weep1", "entity": "team", "project": "study", "count": None,
                                    "max_consecutive_failed_runs": 3}]


def test_agent_local_id_stays_local(env, fake_wandb, monkeypatch):
    """With credentials present, an id found in the local store still runs locally."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    with Store(env / ".collective" / "store.db") as store:
        sweep = store.create_sweep("p", "grid", {"method": "grid", "command": ["true"], "parameters": {"n_total": {"values": [4]}}})
    result = invoke("agent", sweep["sweep_id"], "--count", "1")
    assert fake_wandb["agent"] == []
    assert f"agent for sweep {sweep['sweep_id']}" in result.stdout


def test_agent_unknown_id_with_key_hands_over(env, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    result = invoke("agent", "wb5weep1")
    assert result.exit_code == 0, result.output
    assert fake_wandb["agent"][0]["sweep_id"] == "wb5weep1"
