"""The local agent with a stand-in training script: environment, outcomes, failures, signals, concurrency.

The stand-in reads the W&B params file the way `collective train` does and writes a
summary.json. Its behaviour per run comes from a plan file: one mode per line, consumed in order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collective_model.sweeps import agent as agent_lib
from collective_model.sweeps.agent import AgentOptions, LocalAgent, classify_exit, error_from_log, expand_command
from collective_model.sweeps.store import Store

# The GP fit warns when a length scale hits its bound, which is normal with few runs.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

STANDIN = r'''
import fcntl, json, math, os, signal, sys, time
import yaml

params = yaml.safe_load(open(os.environ["WANDB_SWEEP_PARAM_PATH"]))
config = {k: v["value"] for k, v in params.items() if k != "wandb_version"}

# Take this run's mode from the plan file (first line), else "finish".
mode = "finish"
plan = os.environ.get("STANDIN_PLAN")
if plan:
    with open(plan, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        lines = handle.read().split()
        if lines:
            mode = lines[0]
            handle.seek(0)
            handle.truncate()
            handle.write("\n".join(lines[1:]))

names = ("WANDB_SWEEP_PARAM_PATH", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_SWEEP_ID",
         "COLLECTIVE_SWEEP_ID", "COLLECTIVE_RUNS_DIR", "COLLECTIVE_STORE")
if mode == "invalid":
    print("Error: invalid configuration:", file=sys.stderr)
    print("  - n_experts: n_experts gives 5 experts, but 3 members allow 2 to 2", file=sys.stderr)
    sys.exit(2)

run_id = os.environ["WANDB_RUN_ID"]
run_dir = os.path.join(os.environ["COLLECTIVE_RUNS_DIR"], run_id)
os.makedirs(run_dir)
summary = {"run_id": run_id, "project": os.environ["WANDB_PROJECT"], "sweep_id": os.environ["COLLECTIVE_SWEEP_ID"],
           "state": "running", "reason": None, "run_dir": run_dir, "config": config,
           "env": {name: os.environ.get(name) for name in names}, "argv": sys.argv[1:]}

def write():
    with open(os.path.join(run_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle)

write()
with open(os.path.join(run_dir, "pid"), "w") as handle:
    handle.write(str(os.getpid()))
print("training", json.dumps(config), flush=True)

if mode == "nan":
    summary.update(state="failed", reason="non-finite loss at epoch 1, step 3")
    write()
    sys.exit(3)
if mode == "crash":
    raise RuntimeError("stand-in crashed")
if mode == "exit0":
    sys.exit(0)
if mode in ("sleep", "ignore_int"):
    if mode == "ignore_int":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        summary.update(state="killed", reason="interrupted by SIGINT (Ctrl-C)")
        write()
        sys.exit(130)

lr = config.get("learning_rate", 0.001)
accuracy = 90.0 - 5.0 * abs(math.log10(lr) + 3.0)
model_params = 1000 * config.get("n_total", 8)
summary.update(state="finished", **{"final/test_accuracy": accuracy, "final/param_efficiency": accuracy / model_params * 1e5,
                                    "model_params": model_params})
write()
'''

PARAMETERS = {
    "learning_rate": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01},
    "n_total": {"values": [4, 8, 16]},
    "expert_hidden": {"values": [[512, 256], [384, 192, 96]]},
    "use_drop_models": {"values": [True, False]},
}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A store with one bayes sweep whose command is the stand-in; returns a namespace of paths."""
    script = tmp_path / "standin.py"
    script.write_text(STANDIN)
    plan = tmp_path / "plan.txt"
    plan.write_text("")
    monkeypatch.setenv("STANDIN_PLAN", str(plan))
    for name in list(os.environ):
        if name.startswith(("WANDB_", "COLLECTIVE_")):
            monkeypatch.delenv(name)
    store_path = tmp_path / "store.db"
    config = {
        "method": "bayes",
        "metric": {"name": "final/param_efficiency", "goal": "maximize"},
        "command": ["${interpreter}", str(script)],
        "parameters": PARAMETERS,
    }
    with Store(store_path) as store:
        sweep = store.create_sweep("p", "efficiency", config)

    class Setup:
        pass

    s = Setup()
    s.tmp, s.script, s.plan, s.store_path, s.runs_dir, s.sweep_id = tmp_path, script, plan, store_path, tmp_path / "runs", sweep["sweep_id"]
    s.config = config
    return s


def run_agent(s, count=None, max_failures=5, plan=()):
    s.plan.write_text("\n".join(plan))
    with Store(s.store_path) as store:
        options = AgentOptions(store_path=s.store_path, runs_dir=s.runs_dir, count=count, max_consecutive_failures=max_failures)
        report = LocalAgent(store, s.sweep_id, options).run()
        runs = store.list_runs(sweep_id=s.sweep_id)
    return report, runs


def agent_process(s, *args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    command = [sys.executable, "-m", "collective_model.cli", "agent", s.sweep_id, "--store", str(s.store_path),
               "--runs-dir", str(s.runs_dir), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=s.tmp)


def wait_for_pid_file(runs_dir: Path, known: set[Path], timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in runs_dir.glob("*/pid"):
            if path not in known and path.read_text().strip():
                return path
        time.sleep(0.05)
    raise AssertionError(f"no run started within {timeout} s")


# --------------------------------------------------------------------------------------------
# Command, environment and outcome helpers
# --------------------------------------------------------------------------------------------


def test_expand_command_macros(tmp_path):
    config = {"expert_hidden": [512, 256], "use_drop_models": False, "learning_rate": 0.01}
    json_path = tmp_path / "config-r.json"
    command = ["${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_no_boolean_flags}",
               "${args_json}", "${args_json_file}", "--tag=${envvar:TAG}", "${unknown_macro}", "literal"]
    argv = expand_command(command, config, "train.py", json_path, {"TAG": "x1"})
    assert argv == [
        "/usr/bin/env", sys.executable, "train.py",
        "--expert_hidden=[512, 256]", "--use_drop_models=False", "--learning_rate=0.01",
        "expert_hidden=[512, 256]", "use_drop_models=False", "learning_rate=0.01",
        "--expert_hidden=[512, 256]", "--learning_rate=0.01",
        json.dumps(config), str(json_path), "--tag=x1", "literal",
    ]
    assert json.loads(json_path.read_text()) == config


def test_expand_command_unset_envvar_keeps_name(tmp_path):
    assert expand_command(["${envvar:NOPE}"], {}, None, tmp_path / "x.json", {}) == ["NOPE"]


def test_shipped_command_expands_to_collective_train(tmp_path):
    argv = expand_command(["${env}", "collective", "train"], {"n_total": 4}, None, tmp_path / "x.json", {})
    assert argv == ["/usr/bin/env", "collective", "train"]


def test_child_environment_sets_sweep_variables(tmp_path):
    base = {"PATH": "/usr/bin", "WANDB_SWEEP_ID": "remote1", "HOME": "/home/x"}
    env = agent_lib.child_environment(
        base, params_path=tmp_path / "p.yaml", run_id="abcd1234", project="proj", sweep_id="sw1",
        runs_dir=tmp_path / "runs", store_path=tmp_path / "s.db",
    )
    assert env["WANDB_SWEEP_PARAM_PATH"] == str(tmp_path / "p.yaml")
    assert env["WANDB_MODE"] == "offline"
    assert env["WANDB_RUN_ID"] == "abcd1234"
    assert env["WANDB_PROJECT"] == "proj"
    assert env["COLLECTIVE_SWEEP_ID"] == "sw1"
    assert env["COLLECTIVE_RUNS_DIR"] == str(tmp_path / "runs")
    assert env["COLLECTIVE_STORE"] == str(tmp_path / "s.db")
    assert "WANDB_SWEEP_ID" not in env
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["HOME"] == "/home/x"
    assert base["WANDB_SWEEP_ID"] == "remote1"  # the agent's own environment is untouched


@pytest.mark.parametrize(
    "returncode, summary, log_text, interrupted, expected",
    [
        (0, {"state": "finished"}, "", False, ("finished", None)),
        (3, {"state": "failed", "reason": "non-finite loss at epoch 2, step 5"}, "", False, ("failed", "non-finite loss at epoch 2, step 5")),
        (2, None, "Error: invalid configuration:\n  - n_total: invalid value 2\n", False, ("failed", "invalid configuration: n_total: invalid value 2")),
        (130, {"state": "killed", "reason": "interrupted by SIGINT (Ctrl-C)"}, "", True, ("killed", "interrupted by SIGINT (Ctrl-C)")),
        (-15, {"state": "running"}, "", True, ("killed", "interrupted by the user (Ctrl-C or SIGTERM to the agent)")),
        (-9, {"state": "running"}, "epoch 1", False, ("crashed", "killed by SIGKILL")),
        (1, {"state": "running"}, "Traceback\nRuntimeError: boom\n", False, ("crashed", "exit code 1: RuntimeError: boom")),
        (0, None, "", False, ("crashed", "exited with code 0 without writing summary.json")),
        (3, None, "", False, ("failed", "non-finite loss (exit code 3)")),
    ],
)
def test_classify_exit(returncode, summary, log_text, interrupted, expected):
    assert classify_exit(returncode, summary, log_text, interrupted) == expected


def test_error_from_log_prefers_error_line():
    text = "epoch 1\nError: data not found: /x\nsome trailing line\n"
    assert error_from_log(text) == "data not found: /x"
    assert error_from_log("") is None
    assert error_from_log("a\n\nlast line\n\n") == "last line"


# --------------------------------------------------------------------------------------------
# The agent loop (in process)
# --------------------------------------------------------------------------------------------


def test_agent_runs_count_and_records(setup, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "fromshell")
    report, runs = run_agent(setup, count=3)
    assert report.stop_reason == "started 3 runs (--count 3)"
    assert [r["state"] for r in runs] == ["finished"] * 3
    for run in runs:
        summary = run["summary"]
        seen = summary["env"]
        assert seen["WANDB_RUN_ID"] == run["run_id"]
        assert seen["WANDB_MODE"] == "offline"
        assert seen["WANDB_PROJECT"] == "p"
        assert seen["WANDB_SWEEP_ID"] is None
        assert seen["COLLECTIVE_SWEEP_ID"] == setup.sweep_id
        assert seen["COLLECTIVE_RUNS_DIR"] == str(setup.runs_dir)
        assert seen["COLLECTIVE_STORE"] == str(setup.store_path)
        assert Path(seen["WANDB_SWEEP_PARAM_PATH"]).is_absolute()
        assert summary["config"] == run["config"]
        assert run["run_dir"] == str(setup.runs_dir / run["run_id"])
        assert run["exit_code"] == 0
        assert run["duration_s"] > 0
        assert "training" in Path(run["log_path"]).read_text()
        assert Path(run["params_path"]).read_text().startswith("wandb_version: 1\n")
    assert [(r["informed_by_own"], r["informed_by_other"]) for r in runs] == [(0, 0), (1, 0), (2, 0)]
    # Nothing leaks into the agent's own environment: a later `collective train` is standalone.
    for name in ("WANDB_SWEEP_PARAM_PATH", "WANDB_RUN_ID", "COLLECTIVE_SWEEP_ID", "COLLECTIVE_STORE", "WANDB_MODE"):
        assert name not in os.environ
    assert os.environ["WANDB_SWEEP_ID"] == "fromshell"


def test_run_sees_list_and_bool(setup):
    _, runs = run_agent(setup, count=2)
    for run in runs:
        config = run["summary"]["config"]
        assert type(config["expert_hidden"]) is list
        assert config["expert_hidden"] in ([512, 256], [384, 192, 96])
        assert type(config["use_drop_models"]) is bool


def test_fast_failures_stop_agent(setup):
    started = time.monotonic()
    report, runs = run_agent(setup, max_failures=3, plan=["invalid"] * 10)
    assert report.failed_too_often
    assert "3 runs in a row did not finish" in report.stop_reason
    assert len(runs) == 3
    failures = report.consecutive_failures()
    assert [f.run_id for f in failures] == [r["run_id"] for r in runs]
    for failure, run in zip(failures, runs):
        assert failure.state == run["state"] == "failed"
        assert failure.exit_code == run["exit_code"] == 2
        assert run["reason"] == "invalid configuration: n_experts: n_experts gives 5 experts, but 3 members allow 2 to 2"
        assert Path(failure.log_path).is_file()
        assert run["run_dir"] is None
    assert time.monotonic() - started < 30


def test_failure_count_resets_on_success(setup):
    report, runs = run_agent(setup, count=6, max_failures=2, plan=["invalid", "finish", "invalid", "finish", "invalid", "finish"])
    assert not report.failed_too_often
    assert [r["state"] for r in runs] == ["failed", "finished"] * 3


def test_nan_run_recorded_failed(setup):
    report, runs = run_agent(setup, count=2, plan=["nan", "finish"])
    assert runs[0]["state"] == "failed"
    assert runs[0]["exit_code"] == 3
    assert runs[0]["reason"].startswith("non-finite loss")
    assert runs[1]["state"] == "finished"
    # The next suggestion saw the failed run of its own sweep (and imputed it as the worst).
    assert len(report.outcomes) == 2


@pytest.mark.parametrize(
    "mode, state, reason",
    [
        ("crash", "crashed", "exit code 1: RuntimeError: stand-in crashed"),
        ("exit0", "crashed", None),  # summary.json holds state running: the process stopped without finishing
    ],
)
def test_crashing_run_recorded(setup, mode, state, reason):
    _, runs = run_agent(setup, count=1, plan=[mode])
    assert runs[0]["state"] == state
    if reason:
        assert runs[0]["reason"] == reason


def test_missing_command_recorded_crashed(setup):
    with Store(setup.store_path) as store:
        sweep = store.create_sweep("p", "broken", dict(setup.config, command=["no-such-program-xyz"]))
    setup.sweep_id = sweep["sweep_id"]
    report, runs = run_agent(setup, max_failures=2)
    assert report.failed_too_often
    assert [r["exit_code"] for r in runs] == [127, 127]
    assert runs[0]["reason"] == "exit code 127: command not found: no-such-program-xyz"


def test_grid_sweep_stops_when_exhausted(setup):
    with Store(setup.store_path) as store:
        sweep = store.create_sweep("p", "grid", dict(setup.config, method="grid", parameters={"n_total": {"values": [4, 8]}}))
    setup.sweep_id = sweep["sweep_id"]
    report, runs = run_agent(setup, count=5)
    assert report.stop_reason == f"sweep {sweep['sweep_id']}: the grid is exhausted"
    assert sorted(r["config"]["n_total"] for r in runs) == [4, 8]


def test_cross_sweep_informed_counts(setup):
    with Store(setup.store_path) as store:
        other = store.create_sweep("p", "accuracy", dict(setup.config, metric={"name": "final/test_accuracy", "goal": "maximize"}))
    run_agent(setup, count=2)
    own_id = setup.sweep_id
    setup.sweep_id = other["sweep_id"]
    _, runs = run_agent(setup, count=2)
    assert [(r["informed_by_own"], r["informed_by_other"]) for r in runs] == [(0, 2), (1, 2)]
    setup.sweep_id = own_id
    _, runs = run_agent(setup, count=1)
    assert (runs[-1]["informed_by_own"], runs[-1]["informed_by_other"]) == (2, 2)


# --------------------------------------------------------------------------------------------
# Agent processes: signals and concurrency
# --------------------------------------------------------------------------------------------


def test_kill_9_of_run_continues(setup):
    setup.plan.write_text("sleep\nfinish")
    process = agent_process(setup, "--count", "2")
    pid_file = wait_for_pid_file(setup.runs_dir, set())
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    with Store(setup.store_path) as store:
        runs = store.list_runs(sweep_id=setup.sweep_id)
    assert [r["state"] for r in runs] == ["crashed", "finished"]
    assert runs[0]["exit_code"] == -9
    assert runs[0]["reason"] == "killed by SIGKILL"


def test_first_ctrl_c_records_killed(setup):
    setup.plan.write_text("sleep\nfinish\nfinish")
    process = agent_process(setup, "--count", "3")
    wait_for_pid_file(setup.runs_dir, set())
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert "no new run started" in output
    with Store(setup.store_path) as store:
        runs = store.list_runs(sweep_id=setup.sweep_id)
    assert len(runs) == 1
    assert runs[0]["state"] == "killed"
    assert runs[0]["exit_code"] == 130
    assert runs[0]["reason"] == "interrupted by SIGINT (Ctrl-C)"  # written by the run itself


def test_second_ctrl_c_terminates_run(setup):
    setup.plan.write_text("ignore_int\nfinish")
    process = agent_process(setup, "--count", "2")
    wait_for_pid_file(setup.runs_dir, set())
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # the run ignores SIGINT, so the agent still waits
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    with Store(setup.store_path) as store:
        runs = store.list_runs(sweep_id=setup.sweep_id)
    assert len(runs) == 1
    assert runs[0]["state"] == "killed"
    assert runs[0]["exit_code"] == -15


def test_two_agents_same_second_differ(setup):
    processes = [agent_process(setup, "--count", "1") for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    with Store(setup.store_path) as store:
        runs = store.list_runs(sweep_id=setup.sweep_id)
    assert len(runs) == 2
    assert runs[0]["config"] != runs[1]["config"]
    assert runs[0]["config_key"] != runs[1]["config_key"]


def test_four_agents_twenty_distinct_runs(setup):
    started = time.monotonic()
    processes = [agent_process(setup, "--count", "5") for _ in range(4)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], outputs
    with Store(setup.store_path) as store:
        runs = store.list_runs(sweep_id=setup.sweep_id)
    assert len(runs) == 20
    assert [r["state"] for r in runs] == ["finished"] * 20
    assert len({r["config_key"] for r in runs}) == 20
    assert len({json.dumps(r["config"], sort_keys=True) for r in runs}) == 20
    logs = [Path(r["log_path"]).read_text() for r in runs]
    for text in outputs + logs:
        assert "database is locked" not in text
        assert "Traceback" not in text
    # Later runs learnt from earlier ones, including those of the other agents.
    assert max(r["informed_by_own"] for r in runs) >= 10
    print(f"4 agents x 5 runs: {time.monotonic() - started:.1f} s")


def test_interrupt_during_claim_starts_nothing(setup, monkeypatch):
    """Ctrl-C while a run is being claimed closes that run as killed without starting it."""
    with Store(setup.store_path) as store:
        options = AgentOptions(store_path=setup.store_path, runs_dir=setup.runs_dir, count=3)
        local_agent = LocalAgent(store, setup.sweep_id, options)
        claim_run = store.claim_run

        def claim_then_interrupt(*args, **kwargs):
            run = claim_run(*args, **kwargs)
            local_agent.interrupts.presses = 1
            return run

        monkeypatch.setattr(store, "claim_run", claim_then_interrupt)
        report = local_agent.run()
        runs = store.list_runs(sweep_id=setup.sweep_id)
    assert report.interrupted
    assert len(runs) == 1
    assert runs[0]["state"] == "killed"
    assert runs[0]["reason"] == "interrupted before the run started"
    assert not (setup.runs_dir / runs[0]["run_id"]).exists()
