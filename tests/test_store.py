"""The local SQLite store: schema, the run and sweep records, locking and recovery, on real files."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from collective_model.sweeps import store as store_lib
from collective_model.sweeps.store import Claim, Store, StoreError, record_standalone_run

SWEEP_CONFIG = {
    "method": "bayes",
    "metric": {"name": "final/test_accuracy", "goal": "maximize"},
    "parameters": {"learning_rate": {"min": 0.001, "max": 0.1}},
}

RUN_KEYS = {
    "run_id", "project", "sweep_id", "sweep_name", "sweep_metric", "sweep_goal", "state", "exit_code", "reason",
    "config", "summary", "run_dir", "duration_s", "created_at", "informed_by_own", "informed_by_other",
}
SWEEP_KEYS = {"sweep_id", "name", "project", "method", "metric", "goal", "config", "created_at"}


def fixed_claim(config: dict, own: int = 0, other: int = 0):
    def suggest(sweep, runs):
        return Claim(config=config, config_key=json.dumps(config, sort_keys=True), informed_by_own=own, informed_by_other=other)
    return suggest


def summary_for(run_id: str, project: str = "p", **extra) -> dict:
    summary = {
        "run_id": run_id, "project": project, "sweep_id": None, "state": "finished", "reason": None,
        "exit_code": 0, "started_at": "2026-01-01T00:00:00+00:00", "ended_at": "2026-01-01T00:01:00+00:00",
        "duration_s": 60.0, "run_dir": f"/runs/{run_id}", "config": {"learning_rate": 0.01, "expert_hidden": [512, 256]},
        "final/test_accuracy": 85.0, "model_params": 1000,
    }
    summary.update(extra)
    return summary


# --------------------------------------------------------------------------------------------
# Schema and files
# --------------------------------------------------------------------------------------------


def test_store_created_with_parent(tmp_path):
    path = tmp_path / "a" / "b" / "store.db"
    with Store(path):
        pass
    assert path.is_file()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store_lib.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_reopens_existing(tmp_path):
    path = tmp_path / "store.db"
    with Store(path) as store:
        store.create_sweep("p", "accuracy", SWEEP_CONFIG)
    with Store(path) as store:
        assert len(store.list_sweeps("p")) == 1


def test_store_newer_schema_rejected(tmp_path):
    path = tmp_path / "store.db"
    with Store(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {store_lib.SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this collective"):
        Store(path)


def test_store_foreign_sqlite_rejected(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a collective store.*notes"):
        Store(path)


def test_store_garbage_file_rejected(tmp_path):
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not sqlite" * 200)
    with pytest.raises(StoreError, match="damaged or not an SQLite file"):
        Store(path)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def test_list_sweeps_contract_keys(tmp_path):
    with Store(tmp_path / "s.db") as store:
        created = store.create_sweep("p", "accuracy", SWEEP_CONFIG, source="sweeps/accuracy.yaml")
        store.create_sweep("q", "other", SWEEP_CONFIG)
        sweeps = store.list_sweeps("p")
    assert len(sweeps) == 1
    assert SWEEP_KEYS <= set(sweeps[0])
    assert sweeps[0] == created
    assert sweeps[0]["metric"] == "final/test_accuracy"
    assert sweeps[0]["goal"] == "maximize"
    assert sweeps[0]["config"] == SWEEP_CONFIG


def test_claim_and_finish_run(tmp_path):
    with Store(tmp_path / "s.db") as store:
        sweep = store.create_sweep("p", "accuracy", SWEEP_CONFIG)
        run = store.claim_run(sweep["sweep_id"], fixed_claim({"expert_hidden": [384, 192, 96], "use_drop_models": True}, 2, 3), tmp_path / "runs")
        assert run["state"] == "running"
        assert run["run_dir"] == str(tmp_path / "runs" / run["run_id"])
        store.finish_run(run["run_id"], "finished", 0, None, {"final/test_accuracy": 80.0}, run["run_dir"], 12.5)
        runs = store.list_runs("p")
    assert len(runs) == 1
    recorded = runs[0]
    assert RUN_KEYS <= set(recorded)
    assert recorded["sweep_name"] == "accuracy"
    assert recorded["sweep_metric"] == "final/test_accuracy"
    assert recorded["sweep_goal"] == "maximize"
    assert recorded["state"] == "finished"
    assert recorded["config"] == {"expert_hidden": [384, 192, 96], "use_drop_models": True}
    assert recorded["summary"] == {"final/test_accuracy": 80.0}
    assert recorded["duration_s"] == 12.5
    assert (recorded["informed_by_own"], recorded["informed_by_other"]) == (2, 3)
    assert len(run["run_id"]) == 8 and run["run_id"].isalnum() and run["run_id"].islower()


def test_finish_run_rejects_running_state(tmp_path):
    with Store(tmp_path / "s.db") as store:
        sweep = store.create_sweep("p", "accuracy", SWEEP_CONFIG)
        run = store.claim_run(sweep["sweep_id"], fixed_claim({"a": 1}), tmp_path)
        with pytest.raises(ValueError, match="invalid terminal run state 'running'"):
            store.finish_run(run["run_id"], "running", None, None, None, None, None)


def test_claim_unknown_sweep(tmp_path):
    with Store(tmp_path / "s.db") as store:
        with pytest.raises(StoreError, match="sweep nosuchid not found"):
            store.claim_run("nosuchid", fixed_claim({"a": 1}), tmp_path)


def test_claim_none_inserts_nothing(tmp_path):
    with Store(tmp_path / "s.db") as store:
        sweep = store.create_sweep("p", "accuracy", SWEEP_CONFIG)
        assert store.claim_run(sweep["sweep_id"], lambda sweep, runs: None, tmp_path) is None
        assert store.list_runs("p") == []


def test_claim_error_rolls_back(tmp_path):
    def failing(sweep, runs):
        raise RuntimeError("suggestion failed")

    with Store(tmp_path / "s.db") as store:
        sweep = store.create_sweep("p", "accuracy", SWEEP_CONFIG)
        with pytest.raises(RuntimeError):
            store.claim_run(sweep["sweep_id"], failing, tmp_path)
        # The connection is usable again and holds no transaction.
        assert store.list_runs("p") == []
        assert store.claim_run(sweep["sweep_id"], fixed_claim({"a": 1}), tmp_path) is not None


def test_standalone_run_creates_store(tmp_path):
    path = tmp_path / "new" / "store.db"
    record_standalone_run(path, summary_for("abcd1234"))
    with Store(path) as store:
        runs = store.list_runs("p")
    assert len(runs) == 1
    run = runs[0]
    assert run["sweep_id"] is None
    assert run["sweep_name"] is None
    assert run["state"] == "finished"
    assert run["config"] == {"learning_rate": 0.01, "expert_hidden": [512, 256]}
    assert run["summary"]["final/test_accuracy"] == 85.0
    assert run["run_dir"] == "/runs/abcd1234"
    assert run["duration_s"] == 60.0


def test_standalone_run_replaced_by_id(tmp_path):
    path = tmp_path / "store.db"
    record_standalone_run(path, summary_for("abcd1234", state="killed"))
    record_standalone_run(path, summary_for("abcd1234", state="finished"))
    with Store(path) as store:
        runs = store.list_runs()
    assert [r["state"] for r in runs] == ["finished"]


def test_standalone_run_nan_summary(tmp_path):
    path = tmp_path / "store.db"
    record_standalone_run(path, summary_for("nan00001", state="failed", reason="non-finite loss", **{"final/test_accuracy": float("nan")}))
    with Store(path) as store:
        run = store.get_run("nan00001")
    assert run["state"] == "failed"
    assert run["summary"]["final/test_accuracy"] != run["summary"]["final/test_accuracy"]  # NaN


def test_standalone_run_unknown_state_is_crashed(tmp_path):
    path = tmp_path / "store.db"
    record_standalone_run(path, summary_for("r0000001", state="running"))
    with Store(path) as store:
        assert store.get_run("r0000001")["state"] == "crashed"


def test_standalone_run_needs_ids(tmp_path):
    with pytest.raises(ValueError, match="needs 'run_id' and 'project'"):
        record_standalone_run(tmp_path / "s.db", {"state": "finished"})


def test_standalone_run_waits_for_lock(tmp_path):
    """A write lock held by another process delays the record; it does not fail it."""
    path = tmp_path / "store.db"
    with Store(path):
        pass
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.5, lambda: blocker.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    try:
        store = Store(path, busy_timeout_s=0.2, retry_deadline_s=None)
        store.record_summary(summary_for("late0001"))
    finally:
        release.join()
    assert time.monotonic() - started >= 1.0
    assert store.get_run("late0001")["state"] == "finished"
    store.close()
    blocker.close()


def test_lock_deadline_raises_store_error(tmp_path):
    path = tmp_path / "store.db"
    with Store(path):
        pass
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with Store(path, busy_timeout_s=0.1, retry_deadline_s=0.5) as store:
            with pytest.raises(StoreError, match="stayed locked"):
                store.record_summary(summary_for("late0002"))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_readers_not_blocked_by_writer(tmp_path):
    path = tmp_path / "store.db"
    record_standalone_run(path, summary_for("r0000001"))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    blocker.execute("UPDATE runs SET state = 'killed'")
    try:
        with Store(path, busy_timeout_s=0.1, retry_deadline_s=0.2) as store:
            runs = store.list_runs()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert [r["state"] for r in runs] == ["finished"]


# --------------------------------------------------------------------------------------------
# Orphans and concurrency
# --------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    process = multiprocessing.get_context("spawn").Process(target=int)
    process.start()
    process.join()
    return process.pid


def test_orphan_run_reaped_as_crashed(tmp_path):
    with Store(tmp_path / "s.db") as store:
        sweep = store.create_sweep("p", "accuracy", SWEEP_CONFIG)
        run = store.claim_run(sweep["sweep_id"], fixed_claim({"a": 1}), tmp_path / "runs", agent_pid=_dead_pid())
        assert store.reap_orphans() == 1
        reaped = store.get_run(run["run_id"])
    assert reaped["state"] == "crashed"
    assert "ended without recording the run" in reaped["reason"]


def test_orphan_run_reaped_from_summary(tmp_path):
    runs_dir = tmp_path / "runs"
    with Store(tmp_path / "s.db") as store:
        sweep = store.create_sweep("p", "accuracy", SWEEP_CONFIG)
        run = store.claim_run(sweep["sweep_id"], fixed_claim({"a": 1}), runs_dir, agent_pid=_dead_pid())
        Path(run["run_dir"]).mkdir(parents=True)
        (Path(run["run_dir"]) / "summary.json").write_text(json.dumps({"state": "finished", "final/test_accuracy": 81.0}))
        store.reap_orphans()
        reaped = store.get_run(run["run_id"])
    assert reaped["state"] == "finished"
    assert reaped["summary"]["final/test_accuracy"] == 81.0


def test_live_agent_run_not_reaped(tmp_path):
    with Store(tmp_path / "s.db") as store:
        sweep = store.create_sweep("p", "accuracy", SWEEP_CONFIG)
        run = store.claim_run(sweep["sweep_id"], fixed_claim({"a": 1}), tmp_path)
        assert store.reap_orphans() == 0
        assert store.get_run(run["run_id"])["state"] == "running"


def _claim_many(path: str, sweep_id: str, count: int, queue) -> None:
    """Claim ``count`` runs, each suggestion numbered after the runs the transaction sees."""
    def suggest(sweep, runs):
        number = len([r for r in runs if r["sweep_id"] == sweep_id])
        time.sleep(0.01)  # widen the window in which a second claimer would see the same runs
        return Claim({"n": number}, str(number), 0, 0)

    errors = []
    with Store(path) as store:
        for _ in range(count):
            try:
                store.claim_run(sweep_id, suggest, Path("/tmp"))
            except Exception as error:  # noqa: BLE001 - reported to the parent test
                errors.append(repr(error))
    queue.put(errors)


def test_concurrent_claims_see_each_other(tmp_path):
    """Four processes claim 10 runs each; every suggestion sees all earlier claims."""
    path = tmp_path / "s.db"
    with Store(path) as store:
        sweep_id = store.create_sweep("p", "accuracy", SWEEP_CONFIG)["sweep_id"]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_claim_many, args=(str(path), sweep_id, 10, queue)) for _ in range(4)]
    for process in processes:
        process.start()
    errors = [queue.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert errors == [[], [], [], []]
    with Store(path) as store:
        runs = store.list_runs(sweep_id=sweep_id)
    assert len(runs) == 40
    assert sorted(r["config"]["n"] for r in runs) == list(range(40))
