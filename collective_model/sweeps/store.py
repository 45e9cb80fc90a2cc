"""The local backend's store: one SQLite file with the sweeps and runs of every project.

Concurrency model: any number of agents, `collective train` processes and readers open the same
file. The file is in WAL mode, so readers never block the single writer. Every write is one
short ``BEGIN IMMEDIATE`` transaction. A write that finds the file locked first waits in SQLite's
busy handler, then retries with random jitter so that waiting agents do not wake in lockstep.
No transaction is held while a run trains.

NOTE: WAL needs shared memory between the processes, so the store must sit on a local file
system; SQLite's WAL mode does not work on network file systems such as NFS.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import socket
import sqlite3
import string
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from ..errors import CollectiveError

log = logging.getLogger(__name__)

# Version of the table layout below, stored in SQLite's user_version header field.
SCHEMA_VERSION = 1

TERMINAL_STATES = ("finished", "failed", "crashed", "killed")
RUN_STATES = ("running", *TERMINAL_STATES)

# Waiting limits for a locked store. SQLite's busy handler waits up to BUSY_TIMEOUT_S inside one
# attempt; the retry loop then backs off with jitter until RETRY_DEADLINE_S has passed.
BUSY_TIMEOUT_S = 10.0
RETRY_DEADLINE_S = 300.0

_ID_ALPHABET = string.ascii_lowercase + string.digits

_SCHEMA = f"""
CREATE TABLE sweeps (
    sweep_id   TEXT PRIMARY KEY,
    project    TEXT NOT NULL,
    name       TEXT NOT NULL,
    method     TEXT NOT NULL,
    metric     TEXT,
    goal       TEXT,
    config     TEXT NOT NULL,          -- the registered sweep config as JSON
    backend    TEXT NOT NULL,
    source     TEXT,                   -- the sweep file it was created from
    created_at TEXT NOT NULL
);
CREATE TABLE runs (
    run_id            TEXT PRIMARY KEY,
    project           TEXT NOT NULL,
    sweep_id          TEXT REFERENCES sweeps (sweep_id),   -- NULL for a standalone run
    state             TEXT NOT NULL CHECK (state IN {RUN_STATES!r}),
    exit_code         INTEGER,
    reason            TEXT,
    config            TEXT NOT NULL,   -- plain key: value JSON
    config_key        TEXT,            -- canonical JSON of the swept values, to spot duplicates
    summary           TEXT NOT NULL,   -- summary.json content
    run_dir           TEXT,
    log_path          TEXT,
    params_path       TEXT,
    duration_s        REAL,
    created_at        TEXT NOT NULL,
    ended_at          TEXT,
    informed_by_own   INTEGER,
    informed_by_other INTEGER,
    search_info       TEXT,
    agent_host        TEXT,
    agent_pid         INTEGER
);
CREATE INDEX runs_by_project ON runs (project, created_at);
CREATE INDEX runs_by_sweep ON runs (sweep_id, created_at);
"""

T = TypeVar("T")


class StoreError(CollectiveError):
    """The store file is unusable: corrupt, from a newer version, or locked for too long."""


@dataclass
class Claim:
    """A suggested run that the claim transaction inserts as running."""

    config: dict[str, Any]
    config_key: str
    informed_by_own: int
    informed_by_other: int
    search_info: dict[str, Any] | None = None


def now_iso() -> str:
    """Return the current UTC time as ISO 8601 with microseconds, so strings sort by time."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def generate_id(length: int = 8) -> str:
    """Return a random id of lowercase letters and digits, the shape of W&B run and sweep ids."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def _is_lock_error(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


class Store:
    """The SQLite store at ``path``, created with its parent folder on first use."""

    def __init__(
        self,
        path: str | os.PathLike,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        retry_deadline_s: float | None = RETRY_DEADLINE_S,
    ):
        self.path = Path(path)
        self.retry_deadline_s = retry_deadline_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None)
        except sqlite3.Error as error:
            raise StoreError(f"cannot open the store {self.path}: {error}") from None
        try:
            self._retry(self._configure)
            self._ensure_schema()
        except BaseException:
            self._conn.close()
            raise

    # ----------------------------------------------------------------------------------------
    # Connection and transactions
    # ----------------------------------------------------------------------------------------

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _configure(self) -> None:
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.warning("store %s: SQLite kept journal_mode=%s instead of WAL; readers may block writers", self.path, mode)
        self._conn.execute("PRAGMA foreign_keys=ON")
        # NORMAL is durable in WAL mode except for the last commits before a power loss.
        self._conn.execute("PRAGMA synchronous=NORMAL")

    def _ensure_schema(self) -> None:
        if self._retry(lambda: self._conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
            return

        def create_or_check(conn: sqlite3.Connection) -> None:
            # Checked again inside the write transaction: another process may have just created it.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self.path} has schema version {version}, newer than this "
                    f"collective's {SCHEMA_VERSION}; upgrade collective-model or use another --store"
                )
            tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            if tables:
                raise StoreError(
                    f"{self.path} is an SQLite file but not a collective store (tables: "
                    f"{', '.join(t[0] for t in tables)}); point --store or COLLECTIVE_STORE at another file"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            log.info("created store %s (schema version %d)", self.path, SCHEMA_VERSION)

        self.write(create_or_check)

    def _retry(self, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying with jitter while the database is locked."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return operation()
            except sqlite3.OperationalError as error:
                if not _is_lock_error(error):
                    raise StoreError(f"store {self.path}: {error}") from None
                waited = time.monotonic() - started
                if self.retry_deadline_s is not None and waited > self.retry_deadline_s:
                    raise StoreError(
                        f"the store {self.path} stayed locked for {waited:.0f} s ({error}); another "
                        "process holds a write transaction; check for a stopped `collective` process"
                    ) from None
                attempt += 1
                delay = random.uniform(0.05, 0.2) * min(2**attempt, 16)
                # A short wait is normal with several agents; a long one points at a stuck process.
                level = logging.WARNING if waited > BUSY_TIMEOUT_S else logging.INFO
                log.log(level, "store %s busy (%s); retry %d in %.2f s", self.path, error, attempt, delay)
                time.sleep(delay)
            except sqlite3.DatabaseError as error:
                # A file that is not SQLite, or a damaged page: retrying cannot help.
                raise StoreError(
                    f"the store {self.path} is damaged or not an SQLite file ({error}); move it "
                    "aside and start a new store, or point --store or COLLECTIVE_STORE at another file"
                ) from None

    @contextmanager
    def _transaction(self, immediate: bool) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def write(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one write transaction, retried whole while the store is locked.

        ``body`` may run more than once, so it must have no effects outside the database.
        """

        def attempt() -> T:
            with self._transaction(immediate=True) as conn:
                return body(conn)

        return self._retry(attempt)

    def read(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in one read transaction, a consistent snapshot that blocks no writer."""

        def attempt() -> T:
            with self._transaction(immediate=False) as conn:
                return body(conn)

        return self._retry(attempt)

    # ----------------------------------------------------------------------------------------
    # Sweeps
    # ----------------------------------------------------------------------------------------

    def create_sweep(
        self,
        project: str,
        name: str,
        config: Mapping[str, Any],
        backend: str = "local",
        source: str | None = None,
        sweep_id: str | None = None,
    ) -> dict[str, Any]:
        """Insert a sweep and return it as list_sweeps does; ``sweep_id`` defaults to a new id."""
        metric = config.get("metric") or {}
        row = {
            "sweep_id": sweep_id or generate_id(),
            "project": project,
            "name": name,
            "method": config["method"],
            "metric": metric.get("name"),
            "goal": metric.get("goal", "minimize") if metric else None,
            "config": json.dumps(config),
            "backend": backend,
            "source": source,
            "created_at": now_iso(),
        }

        def insert(conn: sqlite3.Connection) -> None:
            columns = ", ".join(row)
            conn.execute(f"INSERT INTO sweeps ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))

        self.write(insert)
        return _sweep_from_row(row)

    def get_sweep(self, sweep_id: str) -> dict[str, Any] | None:
        """Return the sweep with this id, or None."""
        rows = self.read(lambda conn: _select_sweeps(conn, sweep_id=sweep_id))
        return rows[0] if rows else None

    def list_sweeps(self, project: str | None = None) -> list[dict[str, Any]]:
        """Return the sweeps of ``project`` (all projects when None), oldest first.

        Each dict has sweep_id, name, project, method, metric, goal, config (the registered
        sweep config), backend, source and created_at.
        """
        return self.read(lambda conn: _select_sweeps(conn, project=project))

    # ----------------------------------------------------------------------------------------
    # Runs
    # ----------------------------------------------------------------------------------------

    def list_runs(self, project: str | None = None, sweep_id: str | None = None) -> list[dict[str, Any]]:
        """Return runs of ``project`` (all when None), or of one sweep, oldest first.

        Each dict has run_id, project, sweep_id (None for a standalone run), sweep_name,
        sweep_metric, sweep_goal, state, exit_code, reason, config (plain values), summary
        (summary.json content or {}), run_dir, log_path, duration_s, created_at, ended_at,
        informed_by_own and informed_by_other.
        """
        return self.read(lambda conn: _select_runs(conn, project, sweep_id))

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """Return the run with this id, or None."""
        rows = self.read(lambda conn: _select_runs(conn, None, None, run_id))
        return rows[0] if rows else None

    def claim_run(
        self,
        sweep_id: str,
        suggest: Callable[[dict[str, Any], list[dict[str, Any]]], Claim | None],
        runs_dir: Path,
        agent_pid: int | None = None,
    ) -> dict[str, Any] | None:
        """Insert the next run of a sweep as running and return it, or None when ``suggest`` has none.

        ``suggest(sweep, project_runs)`` runs inside the write transaction, so no other agent
        can claim a run between the suggestion and its insert, and two agents never receive the
        same pending suggestion. It must be fast and free of side effects: it may run again when
        the transaction is retried. Runs whose agent process is gone are reaped first.
        """
        host = socket.gethostname()
        pid = os.getpid() if agent_pid is None else agent_pid

        def claim(conn: sqlite3.Connection) -> dict[str, Any] | None:
            _reap_orphans(conn, host)
            sweeps = _select_sweeps(conn, sweep_id=sweep_id)
            if not sweeps:
                raise StoreError(f"sweep {sweep_id} not found in the store {self.path}")
            sweep = sweeps[0]
            project_runs = _select_runs(conn, sweep["project"], None)
            suggestion = suggest(sweep, project_runs)
            if suggestion is None:
                return None
            run_id = _unused_run_id(conn)
            row = {
                "run_id": run_id,
                "project": sweep["project"],
                "sweep_id": sweep_id,
                "state": "running",
                "config": json.dumps(suggestion.config),
                "config_key": suggestion.config_key,
                "summary": "{}",
                "run_dir": str(runs_dir / run_id),
                "created_at": now_iso(),
                "informed_by_own": suggestion.informed_by_own,
                "informed_by_other": suggestion.informed_by_other,
                "search_info": json.dumps(suggestion.search_info, default=_json_default) if suggestion.search_info else None,
                "agent_host": host,
                "agent_pid": pid,
            }
            conn.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
            return _select_runs(conn, None, None, run_id)[0]

        return self.write(claim)

    def set_run_paths(self, run_id: str, log_path: str, params_path: str) -> None:
        """Record where a claimed run's log and W&B params file are."""
        self.write(lambda conn: conn.execute(
            "UPDATE runs SET log_path = ?, params_path = ? WHERE run_id = ?", (log_path, params_path, run_id)
        ))

    def finish_run(
        self,
        run_id: str,
        state: str,
        exit_code: int | None,
        reason: str | None,
        summary: Mapping[str, Any] | None,
        run_dir: str | None,
        duration_s: float | None,
    ) -> None:
        """Record the end of a claimed run: its terminal state, exit code, reason and summary."""
        if state not in TERMINAL_STATES:
            raise ValueError(f"invalid terminal run state {state!r}; expected one of {', '.join(TERMINAL_STATES)}")
        values = (
            state, exit_code, reason, json.dumps(dict(summary or {}), default=_json_default),
            run_dir, duration_s, now_iso(), run_id,
        )

        def update(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "UPDATE runs SET state = ?, exit_code = ?, reason = ?, summary = ?, run_dir = ?, "
                "duration_s = ?, ended_at = ? WHERE run_id = ?",
                values,
            )
            if cursor.rowcount != 1:
                raise StoreError(f"run {run_id} not found in the store {self.path}")

        self.write(update)

    def record_summary(self, summary: Mapping[str, Any]) -> None:
        """Insert or replace a run from its summary.json content (the run is not from an agent)."""
        run_id = summary.get("run_id")
        project = summary.get("project")
        if not run_id or not project:
            raise ValueError(f"summary needs 'run_id' and 'project' to be recorded, got run_id={run_id!r}, project={project!r}")
        state = summary.get("state") if summary.get("state") in TERMINAL_STATES else "crashed"
        row = {
            "run_id": str(run_id),
            "project": str(project),
            "sweep_id": None,
            "state": state,
            "exit_code": summary.get("exit_code"),
            "reason": summary.get("reason"),
            "config": json.dumps(summary.get("config") or {}, default=_json_default),
            "config_key": None,
            "summary": json.dumps(dict(summary), default=_json_default),
            "run_dir": summary.get("run_dir"),
            "duration_s": summary.get("duration_s"),
            "created_at": summary.get("started_at") or now_iso(),
            "ended_at": summary.get("ended_at") or now_iso(),
        }
        self.write(lambda conn: conn.execute(
            f"INSERT OR REPLACE INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
        ))

    def reap_orphans(self) -> int:
        """Mark running runs whose agent on this host has exited as crashed; return how many."""
        host = socket.gethostname()
        return self.write(lambda conn: _reap_orphans(conn, host))


def record_standalone_run(store_path: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """Record a `collective train` run that no agent started, from its summary.json content.

    The store is created when missing. A locked store is retried without a deadline and each
    retry is logged, so a finished run is not lost to a busy database. A damaged store raises
    StoreError.
    """
    with Store(store_path, retry_deadline_s=None) as store:
        store.record_summary(summary)


# --------------------------------------------------------------------------------------------
# Row helpers
# --------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """Encode numpy scalars and arrays, which summaries and search info may contain."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} as JSON: {value!r}")


def _sweep_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    sweep = dict(row)
    if isinstance(sweep.get("config"), str):
        sweep["config"] = json.loads(sweep["config"])
    return sweep


def _select_sweeps(conn: sqlite3.Connection, project: str | None = None, sweep_id: str | None = None) -> list[dict[str, Any]]:
    clauses, args = [], []
    for column, value in (("project", project), ("sweep_id", sweep_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    query = "SELECT * FROM sweeps" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY created_at, rowid"
    cursor = conn.execute(query, args)
    names = [d[0] for d in cursor.description]
    return [_sweep_from_row(dict(zip(names, values))) for values in cursor.fetchall()]


_RUN_QUERY = """
SELECT runs.*, sweeps.name AS sweep_name, sweeps.metric AS sweep_metric, sweeps.goal AS sweep_goal
FROM runs LEFT JOIN sweeps ON runs.sweep_id = sweeps.sweep_id
"""


def _select_runs(
    conn: sqlite3.Connection, project: str | None, sweep_id: str | None, run_id: str | None = None
) -> list[dict[str, Any]]:
    clauses, args = [], []
    for column, value in (("runs.project", project), ("runs.sweep_id", sweep_id), ("runs.run_id", run_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    query = _RUN_QUERY + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY runs.created_at, runs.rowid"
    cursor = conn.execute(query, args)
    names = [d[0] for d in cursor.description]
    runs = []
    for values in cursor.fetchall():
        run = dict(zip(names, values))
        run["config"] = json.loads(run["config"]) if run["config"] else {}
        run["summary"] = json.loads(run["summary"]) if run["summary"] else {}
        run["search_info"] = json.loads(run["search_info"]) if run["search_info"] else None
        runs.append(run)
    return runs


def _unused_run_id(conn: sqlite3.Connection) -> str:
    while True:
        run_id = generate_id()
        if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            return run_id


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def _reap_orphans(conn: sqlite3.Connection, host: str) -> int:
    """Close running runs of this host whose agent process is gone.

    A run whose summary.json exists gets the state recorded there; others become crashed.
    NOTE: a reused pid keeps its dead agent's runs running, and a child that outlives its
    agent (killed with SIGKILL) is marked crashed while it may still be training.
    """
    rows = conn.execute(
        "SELECT run_id, agent_pid, run_dir FROM runs WHERE state = 'running' AND agent_host = ?", (host,)
    ).fetchall()
    reaped = 0
    for run_id, pid, run_dir in rows:
        if pid is None or _process_exists(pid):
            continue
        summary = _read_summary(Path(run_dir) / "summary.json") if run_dir else None
        if summary and summary.get("state") in TERMINAL_STATES:
            state, reason = summary["state"], summary.get("reason")
        else:
            state, summary = "crashed", {}
            reason = f"agent process {pid} ended without recording the run"
        conn.execute(
            "UPDATE runs SET state = ?, reason = ?, summary = ?, ended_at = ? WHERE run_id = ?",
            (state, reason, json.dumps(summary, default=_json_default), now_iso(), run_id),
        )
        log.warning("run %s: %s; marked %s", run_id, reason or "its agent exited", state)
        reaped += 1
    return reaped


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_finite_number(value: Any) -> bool:
    """Return True for an int or float that is neither NaN nor infinite (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
