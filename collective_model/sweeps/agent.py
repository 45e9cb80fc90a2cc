"""The local agent: runs a local sweep's trials one after another, as `wandb agent` does.

For each trial the agent claims the next suggestion in the store, writes it to a W&B-style
params file and starts the sweep's ``command`` as a fresh subprocess. The sweep variables
(WANDB_SWEEP_PARAM_PATH, WANDB_RUN_ID, ...) are set only in the child's environment, so a
`collective train` started later by hand in the same shell is a standalone run. The child's
stdout and stderr go to a log file; its summary.json and exit code decide the recorded state.

Interrupts: the child runs in its own session, so a terminal's Ctrl-C reaches only the agent.
The first Ctrl-C forwards SIGINT to the run, records it killed and starts nothing new; a second
Ctrl-C sends SIGTERM, then SIGKILL after TERMINATE_GRACE_S. SIGTERM to the agent acts like the
second Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ..errors import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_USAGE
from . import search
from .store import TERMINAL_STATES, Store

log = logging.getLogger(__name__)

DEFAULT_MAX_CONSECUTIVE_FAILURES = 5
TERMINATE_GRACE_S = 10.0
# Seconds between checks of a running child for an escalation deadline.
_POLL_S = 0.2


@dataclass
class AgentOptions:
    """Settings of one agent process."""

    store_path: Path
    runs_dir: Path
    count: int | None = None  # runs to start; None runs until the sweep is complete or stopped
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    terminate_grace_s: float = TERMINATE_GRACE_S


@dataclass
class RunOutcome:
    """The end of one trial, as recorded in the store."""

    run_id: str
    state: str
    exit_code: int | None
    reason: str | None
    duration_s: float
    log_path: str
    run_dir: str | None
    config: dict[str, Any]
    summary: dict[str, Any]


@dataclass
class AgentReport:
    """An agent's runs in order and the reason it stopped."""

    outcomes: list[RunOutcome] = field(default_factory=list)
    stop_reason: str = ""
    failed_too_often: bool = False
    interrupted: bool = False

    def consecutive_failures(self) -> list[RunOutcome]:
        """Return the trailing runs that did not finish, oldest first."""
        tail = []
        for outcome in reversed(self.outcomes):
            if outcome.state == "finished":
                break
            tail.append(outcome)
        return list(reversed(tail))


# --------------------------------------------------------------------------------------------
# Command and environment of a trial
# --------------------------------------------------------------------------------------------


def write_params_file(path: Path, config: Mapping[str, Any]) -> None:
    """Write the W&B params file that `wandb agent` writes: ``wandb_version: 1``, then ``key: {value: v}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"wandb_version": 1}
    data.update({key: {"value": value} for key, value in config.items()})
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, default_flow_style=False, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def command_arguments(config: Mapping[str, Any]) -> dict[str, list[str]]:
    """Return the ${args...} macro expansions of `wandb agent` for a config.

    Values are formatted with str(), as wandb 0.31 does, so a list reads ``[512, 256]``.
    """
    args, no_hyphens, no_booleans, no_equals = [], [], [], []
    for key, value in config.items():
        args.append(f"--{key}={value}")
        no_hyphens.append(f"{key}={value}")
        no_equals += [f"--{key}", str(value)]
        if isinstance(value, bool):
            if value:
                no_booleans.append(f"--{key}")
        else:
            no_booleans.append(f"--{key}={value}")
    return {
        "args": args,
        "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans,
        "args_no_equals": no_equals,
        "args_json": [json.dumps(dict(config))],
    }


def expand_command(
    command: list[str], config: Mapping[str, Any], program: str | None, args_json_path: Path, env: Mapping[str, str]
) -> list[str]:
    """Expand the macros of a sweep ``command`` the way `wandb agent` does.

    ``${env}`` is /usr/bin/env, ``${interpreter}`` this Python, ``${program}`` the sweep's
    program, ``${args}`` and its variants the config as flags, ``${args_json_file}`` a JSON file
    of the config, and ``${envvar:NAME}`` the variable's value (NAME itself when unset). A macro
    token with no expansion is dropped, as wandb drops it.
    """
    expansions = command_arguments(config)
    expansions["env"] = ["/usr/bin/env"] if os.path.exists("/usr/bin/env") else []
    expansions["interpreter"] = [sys.executable]
    expansions["program"] = [program] if program else []
    expansions["args_json_file"] = [str(args_json_path)]
    if "${args_json_file}" in command:
        args_json_path.write_text(expansions["args_json"][0], encoding="utf-8")

    argv = []
    for token in command:
        if token.startswith("${") and token.endswith("}") and ":" not in token:
            argv += expansions.get(token[2:-1], [])
            continue
        while "${envvar:" in token:
            start = token.index("${envvar:")
            end = token.index("}", start)
            name = token[start + len("${envvar:"):end]
            token = token[:start] + env.get(name, name) + token[end + 1:]
        argv.append(token)
    return argv


def child_environment(
    base: Mapping[str, str], *, params_path: Path, run_id: str, project: str, sweep_id: str, runs_dir: Path, store_path: Path
) -> dict[str, str]:
    """Return the environment of a trial: the agent's own plus the sweep variables.

    WANDB_SWEEP_ID is removed: a local sweep does not exist on W&B, and wandb.init would try
    to attach the run to it. The interpreter's folder is put first on PATH so the `collective`
    of this installation is found even when its virtual environment is not activated.
    """
    env = dict(base)
    env.pop("WANDB_SWEEP_ID", None)
    env.update(
        {
            "WANDB_SWEEP_PARAM_PATH": str(params_path.absolute()),
            "WANDB_MODE": "offline",
            "WANDB_RUN_ID": run_id,
            "WANDB_PROJECT": project,
            "COLLECTIVE_SWEEP_ID": sweep_id,
            "COLLECTIVE_RUNS_DIR": str(runs_dir),
            "COLLECTIVE_STORE": str(store_path),
            "PYTHONUNBUFFERED": "1",
        }
    )
    bin_dir = str(Path(sys.executable).parent)
    path_entries = env.get("PATH", "").split(os.pathsep) if env.get("PATH") else []
    if bin_dir not in path_entries:
        env["PATH"] = os.pathsep.join([bin_dir, *path_entries])
    return env


# --------------------------------------------------------------------------------------------
# Outcome of a trial
# --------------------------------------------------------------------------------------------


def error_from_log(text: str, max_chars: int = 500) -> str | None:
    """Return the child's last error: the last ``Error:`` line with its indented detail lines,
    else the last non-empty line.

    >>> error_from_log("epoch 1\\nError: invalid configuration:\\n  - n_total: invalid value 2\\n")
    'invalid configuration: n_total: invalid value 2'
    """
    lines = [line.rstrip() for line in text.splitlines()]
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("Error:"):
            parts = [lines[index][len("Error:"):].strip()]
            for detail in lines[index + 1:]:
                if not detail.startswith((" ", "\t")) or not detail.strip():
                    break
                parts.append(detail.strip().lstrip("- ").strip())
            message = parts[0] if len(parts) == 1 else parts[0] + " " + "; ".join(parts[1:])
            return message[:max_chars]
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:max_chars]
    return None


def classify_exit(returncode: int, summary: Mapping[str, Any] | None, log_text: str, interrupted: bool) -> tuple[str, str | None]:
    """Return the (state, reason) of a trial from its exit code, summary.json and log.

    A summary.json with a terminal state is trusted. Otherwise: exit code 2 (invalid config)
    and 3 (non-finite loss) are failed, 130 or an interrupt from the agent is killed, and
    anything else, including death by a signal, is crashed.
    """
    if summary and summary.get("state") in TERMINAL_STATES:
        return summary["state"], summary.get("reason")
    detail = error_from_log(log_text)
    if interrupted or returncode == EXIT_INTERRUPTED:
        return "killed", "interrupted by the user (Ctrl-C or SIGTERM to the agent)"
    if returncode == 0:
        return "crashed", "exited with code 0 without writing summary.json"
    if returncode == EXIT_USAGE:
        return "failed", detail or "invalid config (exit code 2)"
    if returncode == EXIT_DIVERGED:
        return "failed", detail or "non-finite loss (exit code 3)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return "crashed", f"killed by {name}"
    return "crashed", f"exit code {returncode}" + (f": {detail}" if detail else "")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# Interrupts
# --------------------------------------------------------------------------------------------


class _Interrupts:
    """SIGINT and SIGTERM handling while the agent runs (main thread only)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.presses = 0
        self.child: subprocess.Popen | None = None
        self.child_interrupted = False
        self.kill_at: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.info("agent not in the main thread: Ctrl-C is not forwarded to runs")
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def stop_requested(self) -> bool:
        return self.presses > 0

    def _handle(self, signum: int, _frame: Any) -> None:
        self.presses += 2 if signum == signal.SIGTERM else 1
        child = self.child
        if child is None or child.poll() is not None:
            if self.presses >= 2 and signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.child_interrupted = True
        if self.presses == 1:
            log.warning("interrupt: forwarding SIGINT to run process %d; no new run will start", child.pid)
            self._signal_child(signal.SIGINT)
        elif self.kill_at is None:
            log.warning("second interrupt: terminating run process %d", child.pid)
            self._signal_child(signal.SIGTERM)
            self.kill_at = time.monotonic() + self.grace_s

    def _signal_child(self, signum: int) -> None:
        child = self.child
        if child is None:
            return
        try:
            os.killpg(child.pid, signum)  # the child leads its own session and process group
        except ProcessLookupError:
            pass

    def escalate_if_due(self) -> None:
        if self.kill_at is not None and time.monotonic() >= self.kill_at:
            log.warning("run process did not exit %.0f s after SIGTERM; sending SIGKILL", self.grace_s)
            self._signal_child(signal.SIGKILL)
            self.kill_at = None


# --------------------------------------------------------------------------------------------
# The agent loop
# --------------------------------------------------------------------------------------------


class LocalAgent:
    """Runs trials of one local sweep until the count, the failure limit or an interrupt stops it.

    ``on_start(run)`` and ``on_end(outcome)`` are called around each trial, for progress output.
    """

    def __init__(
        self,
        store: Store,
        sweep_id: str,
        options: AgentOptions,
        on_start: Callable[[dict[str, Any]], None] | None = None,
        on_end: Callable[[RunOutcome], None] | None = None,
    ):
        self.store = store
        self.sweep_id = sweep_id
        self.options = options
        self.on_start = on_start or (lambda run: None)
        self.on_end = on_end or (lambda outcome: None)
        self.interrupts = _Interrupts(options.terminate_grace_s)

    def run(self) -> AgentReport:
        """Run trials and return the report; the store stays consistent when interrupted."""
        search.load_engine()  # import scikit-learn before any transaction, not inside one
        report = AgentReport()
        self.interrupts.install()
        try:
            self._loop(report)
        except KeyboardInterrupt:
            report.interrupted = True
            report.stop_reason = "interrupted"
        finally:
            self.interrupts.restore()
        return report

    def _loop(self, report: AgentReport) -> None:
        started = 0
        while True:
            if self.interrupts.stop_requested:
                report.interrupted = True
                report.stop_reason = "interrupted; no new run started"
                return
            if self.options.count is not None and started >= self.options.count:
                report.stop_reason = f"started {started} runs (--count {self.options.count})"
                return
            try:
                run = self.store.claim_run(self.sweep_id, search.suggest, self.options.runs_dir)
            except search.SweepComplete as complete:
                report.stop_reason = str(complete)
                return
            started += 1
            outcome = self._run_trial(run)
            report.outcomes.append(outcome)
            self.on_end(outcome)

            failures = report.consecutive_failures()
            if self.interrupts.stop_requested:
                report.interrupted = True
                report.stop_reason = "interrupted; no new run started"
                return
            if len(failures) >= self.options.max_consecutive_failures:
                report.failed_too_often = True
                report.stop_reason = f"{len(failures)} runs in a row did not finish (--max-failures {self.options.max_consecutive_failures})"
                return

    def _run_trial(self, run: dict[str, Any]) -> RunOutcome:
        run_id = run["run_id"]
        sweep_dir = self.options.runs_dir / f"sweep-{self.sweep_id}"
        params_path = sweep_dir / f"config-{run_id}.yaml"
        log_path = sweep_dir / f"{run_id}.log"
        run_dir = Path(run["run_dir"])
        sweep = self.store.get_sweep(self.sweep_id)
        sweep_config = sweep["config"]

        if self.interrupts.stop_requested:
            # Ctrl-C arrived while the run was being claimed: close it without starting it.
            reason = "interrupted before the run started"
            self.store.finish_run(run_id, "killed", None, reason, {}, None, 0.0)
            return RunOutcome(run_id, "killed", None, reason, 0.0, str(log_path), None, run["config"], {})

        write_params_file(params_path, run["config"])
        self.store.set_run_paths(run_id, str(log_path), str(params_path))
        env = child_environment(
            os.environ, params_path=params_path, run_id=run_id, project=run["project"], sweep_id=self.sweep_id,
            runs_dir=self.options.runs_dir, store_path=self.options.store_path,
        )
        argv = expand_command(
            sweep_config.get("command") or [], run["config"], sweep_config.get("program"), sweep_dir / f"config-{run_id}.json", env
        )
        self.on_start({**run, "log_path": str(log_path), "argv": argv})
        log.info("run %s: starting %s", run_id, " ".join(argv))

        started = time.monotonic()
        returncode = self._execute(argv, env, log_path)
        duration = time.monotonic() - started

        # Record the outcome
        summary = _read_json(run_dir / "summary.json") or {}
        log_text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
        state, reason = classify_exit(returncode, summary, log_text, self.interrupts.child_interrupted)
        recorded_dir = summary.get("run_dir") or (str(run_dir) if run_dir.exists() else None)
        self.store.finish_run(run_id, state, returncode, reason, summary, recorded_dir, duration)
        log.info("run %s: %s (exit code %s) after %.1f s", run_id, state, returncode, duration)
        return RunOutcome(run_id, state, returncode, reason, duration, str(log_path), recorded_dir, run["config"], summary)

    def _execute(self, argv: list[str], env: dict[str, str], log_path: Path) -> int:
        """Start the trial's process with output to ``log_path`` and return its exit code.

        A command that cannot be started returns 127, as a shell does.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:
            if not argv or (shutil.which(argv[0], path=env.get("PATH")) is None and not os.path.exists(argv[0])):
                log_file.write(f"Error: command not found: {argv[0] if argv else '(empty command)'}\n".encode())
                return 127
            try:
                child = subprocess.Popen(
                    argv, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
                )
            except OSError as error:
                log_file.write(f"Error: cannot start {argv[0]}: {error}\n".encode())
                return 127
            self.interrupts.child = child
            try:
                while True:
                    try:
                        return child.wait(timeout=_POLL_S)
                    except subprocess.TimeoutExpired:
                        self.interrupts.escalate_if_due()
            finally:
                self.interrupts.child = None
