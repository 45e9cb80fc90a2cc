"""The W&B source of `collective results`, with `wandb.Api` replaced by a paginating fake."""

import json
from types import SimpleNamespace

import pytest
import wandb
from click.testing import CliRunner

from collective_model.cli import main
from collective_model.results import analyse, sources
from collective_model.results.sources import load_wandb, resolve_backend

ACCURACY_SWEEP = SimpleNamespace(
    id="swacc001",
    name="accuracy",
    config={"name": "accuracy", "method": "bayes", "metric": {"name": "final/test_accuracy", "goal": "maximize"}},
)
EFFICIENCY_SWEEP = SimpleNamespace(
    id="sweff002",
    name="efficiency",
    config={"method": "bayes", "metric": {"name": "final/param_efficiency", "goal": "maximize"}},
)


class FakeRun:
    """The attributes of wandb.apis.public.Run that the results source reads."""

    def __init__(self, run_id, state, accuracy, params, sweep=None, config=None, run_dir=None):
        self.id = run_id
        self.state = state
        self.sweep = sweep
        self.created_at = "2026-01-01T00:00:00"
        self.config = config if config is not None else {"n_total": 8, "_wandb": {"cli_version": "0.31"}}
        self.summary_metrics = {"_runtime": 12}
        if accuracy is not None:
            self.summary_metrics["final/test_accuracy"] = accuracy
            self.summary_metrics["final/param_efficiency"] = accuracy / params * 100_000
        if params is not None:
            self.summary_metrics["model_params"] = params
        if run_dir is not None:
            self.summary_metrics["run_dir"] = run_dir


class FakeRuns:
    """A lazy paginated collection like wandb's Runs: pages load only while iterating further.

    The server serves at most ``page_size`` runs per request whatever ``per_page`` requests, so
    a project of more runs always spans several pages.
    """

    def __init__(self, all_runs, page_size):
        self._all = all_runs
        self._page_size = page_size
        self.objects = []
        self.pages_loaded = 0
        self._index = -1

    def _load_page(self):
        if len(self.objects) >= len(self._all):
            return False
        start = len(self.objects)
        self.objects.extend(self._all[start:start + self._page_size])
        self.pages_loaded += 1
        return True

    def __iter__(self):
        self._index = -1
        return self

    def __next__(self):
        self._index += 1
        if self._index >= len(self.objects) and not self._load_page():
            raise StopIteration
        return self.objects[self._index]

    def __len__(self):
        return len(self._all)

    def __getitem__(self, index):
        while index >= len(self.objects) and self._load_page():
            pass
        return self.objects[index]


class FakeApi:
    """Stands in for wandb.Api; records each runs() call."""

    runs_by_path = {}
    calls = []
    page_size = 3

    def __init__(self, *args, **kwargs):
        pass

    def runs(self, path=None, filters=None, order="+created_at", per_page=50, include_sweeps=False, lazy=True):
        collection = FakeRuns(self.runs_by_path.get(path, []), self.page_size)
        FakeApi.calls.append({"path": path, "per_page": per_page, "include_sweeps": include_sweeps, "lazy": lazy, "runs": collection})
        return collection


def make_project(count=20):
    """``count`` runs alternating between the sweeps, with a failed and a standalone run among them."""
    runs = []
    for i in range(count):
        sweep = ACCURACY_SWEEP if i % 2 == 0 else EFFICIENCY_SWEEP
        accuracy = 80.0 + i * 0.4
        params = 100_000 * (i + 1) if sweep is ACCURACY_SWEEP else 50_000 * (i + 1)
        runs.append(FakeRun(f"run{i:03d}", "finished", accuracy, params, sweep, config={"n_total": 4 + i % 3, "learning_rate": {"value": 0.001 * (i + 1), "desc": None}}))
    runs.append(FakeRun("failed01", "failed", None, None, ACCURACY_SWEEP))
    runs.append(FakeRun("running1", "running", None, 10_000, EFFICIENCY_SWEEP))
    runs.append(FakeRun("handmade", "finished", 95.0, 10_000_000, None))
    return runs


@pytest.fixture
def fake_wandb(monkeypatch):
    monkeypatch.setattr(wandb, "Api", FakeApi)
    FakeApi.runs_by_path = {"ent/proj": make_project()}
    FakeApi.calls = []
    FakeApi.page_size = 3
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    return FakeApi


def test_every_page_is_read(fake_wandb):
    run_set = load_wandb("proj", "ent")
    assert len(run_set.runs) == 23
    assert [run.run_id for run in run_set.runs][-3:] == ["failed01", "running1", "handmade"]
    call = fake_wandb.calls[0]
    assert call["path"] == "ent/proj"
    assert call["runs"].pages_loaded == 8  # 23 runs, 3 per page
    assert call["include_sweeps"] is True
    assert call["lazy"] is False


def test_page_size_one(fake_wandb):
    fake_wandb.page_size = 1
    assert len(load_wandb("proj", "ent").runs) == 23
    assert fake_wandb.calls[0]["runs"].pages_loaded == 23


def test_records_from_wandb_runs(fake_wandb):
    run_set = load_wandb("proj", "ent")
    by_id = {run.run_id: run for run in run_set.runs}
    first = by_id["run000"]
    assert first.sweep_id == "swacc001"
    assert first.sweep_name == "accuracy"
    assert first.config == {"n_total": 4, "learning_rate": 0.001}
    assert first.test_accuracy == 80.0
    assert first.model_params == 100_000
    assert by_id["handmade"].sweep_id is None
    assert [(s.sweep_id, s.metric, s.goal) for s in run_set.sweeps] == [
        ("swacc001", "final/test_accuracy", "maximize"),
        ("sweff002", "final/param_efficiency", "maximize"),
    ]
    assert run_set.location == "ent/proj"


def test_sweep_metric_without_goal_minimizes(fake_wandb):
    loss_sweep = SimpleNamespace(id="swloss03", name="loss", config={"metric": {"name": "final/test_loss"}})
    runs = [FakeRun("l1", "finished", 80.0, 1000, loss_sweep), FakeRun("l2", "finished", 82.0, 1000, loss_sweep)]
    runs[0].summary_metrics["final/test_loss"] = 0.3
    runs[1].summary_metrics["final/test_loss"] = 0.5
    fake_wandb.runs_by_path = {"ent/proj": runs}
    run_set = load_wandb("proj", "ent")
    assert run_set.sweeps[0].goal == "minimize"
    assert analyse(run_set).winners[0].run.run_id == "l1"


def test_entity_from_environment(fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_ENTITY", "ent")
    assert len(load_wandb("proj").runs) == 23


def test_without_entity_uses_project_path(fake_wandb):
    fake_wandb.runs_by_path = {"proj": make_project(2)}
    run_set = load_wandb("proj")
    assert fake_wandb.calls[0]["path"] == "proj"
    assert len(run_set.runs) == 5


def test_summary_object_without_summary_metrics(fake_wandb):
    class SummaryOnlyRun:
        id, state, sweep, config, created_at = "old00001", "finished", None, {}, None
        summary = {"final/test_accuracy": 70.0, "model_params": 1000}

    fake_wandb.runs_by_path = {"ent/proj": [SummaryOnlyRun()]}
    run = load_wandb("proj", "ent").runs[0]
    assert run.test_accuracy == 70.0
    assert run.model_params == 1000


def test_api_error_becomes_message(monkeypatch):
    def raise_usage_error(*args, **kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "Api", raise_usage_error)
    with pytest.raises(sources.CollectiveError, match=r"reading runs of W&B project ent/proj failed: api_key not configured"):
        load_wandb("proj", "ent")


def test_cli_wandb_analysis(fake_wandb):
    result = CliRunner().invoke(main, ["results", "--backend", "wandb", "--project", "proj", "--entity", "ent", "--format", "json", "--max-params", "1M"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["backend"] == "wandb"
    assert document["runs_total"] == 23
    assert document["excluded"] == {"failed": 1, "running": 1}
    winners = {w["sweep"]: w["run_id"] for w in document["best_per_sweep"]}
    # run018 has the highest accuracy of the accuracy sweep; run001 the best accuracy per parameter.
    assert winners == {"accuracy": "run018", "efficiency": "run001"}
    assert document["frontier"][-1] == "handmade"
    assert document["choice"]["run_id"] == "run019"  # 87.6 % at 1M, the most accurate within 1M
    assert document["choice"]["checkpoint"] is None


def test_cli_wandb_table_notes_missing_run_folder(fake_wandb):
    result = CliRunner().invoke(main, ["results", "--backend", "wandb", "--project", "proj", "--entity", "ent", "--max-params", "1M"])
    assert result.exit_code == 0, result.output
    assert "W&B ent/proj" in result.stdout
    assert "checkpoint: unknown (the run record names no run folder)" in result.stdout


def test_cli_wandb_export_uses_local_run_folder(fake_wandb, tmp_path):
    run_dir = tmp_path / "runs" / "local001"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"w")
    (run_dir / "config.yaml").write_text("n_total: 8\n")
    fake_wandb.runs_by_path["ent/proj"].append(FakeRun("local001", "finished", 90.0, 5000, ACCURACY_SWEEP, run_dir=str(run_dir)))
    target = tmp_path / "out"
    result = CliRunner().invoke(main, ["results", "export", "local001", str(target), "--backend", "wandb", "--project", "proj", "--entity", "ent"])
    assert result.exit_code == 0, result.output
    assert (target / "checkpoint.pt").read_bytes() == b"w"

    missing = CliRunner().invoke(main, ["results", "export", "run001", str(tmp_path / "o2"), "--backend", "wandb", "--project", "proj", "--entity", "ent"])
    assert missing.exit_code == 1
    assert "run run001 has no run folder in its record" in missing.stderr


@pytest.mark.parametrize(
    "environment, netrc_text, expected",
    [
        ({"WANDB_API_KEY": "k" * 40}, None, "wandb"),
        ({"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}, None, "local"),
        ({"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "disabled"}, None, "local"),
        ({}, "machine api.wandb.ai\n  login user\n  password " + "p" * 40 + "\n", "wandb"),
        ({}, "machine other.example\n  login user\n  password secret\n", "local"),
        ({"WANDB_BASE_URL": "http://127.0.0.1:8080"}, "machine 127.0.0.1:8080\n  login user\n  password " + "p" * 40 + "\n", "wandb"),
        ({}, None, "local"),
        ({}, "this is not netrc syntax \"\n", "local"),
    ],
)
def test_backend_auto(environment, netrc_text, expected, monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    netrc_path = tmp_path / "netrc"
    if netrc_text is not None:
        netrc_path.write_text(netrc_text)
        netrc_path.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_path))
    assert resolve_backend("auto")[0] == expected
    assert resolve_backend("local")[0] == "local"
    assert resolve_backend("wandb")[0] == "wandb"
