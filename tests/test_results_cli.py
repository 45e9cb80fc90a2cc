"""`collective results` and `collective results export` on a real SQLite store with run folders."""

import csv
import io
import json
import os
import re

import pytest
import yaml
from click.testing import CliRunner

from collective_model import config as config_lib
from collective_model.cli import main
from collective_model.sweeps.store import Claim, Store

PROJECT = "proj"
ACCURACY_SWEEP = {"method": "bayes", "metric": {"name": "final/test_accuracy", "goal": "maximize"}, "parameters": {}}
EFFICIENCY_SWEEP = {"method": "bayes", "metric": {"name": "final/param_efficiency", "goal": "maximize"}, "parameters": {}}

# (sweep, state, test accuracy, model_params, config overrides); None metrics are left out.
RUNS = [
    ("accuracy", "finished", 89.5, 1_200_000, {"n_total": 12, "expert_hidden": [512, 256]}),
    ("accuracy", "finished", 88.0, 1_500_000, {"n_total": 16, "expert_hidden": [512, 256]}),
    ("accuracy", "failed", None, None, {"n_total": 16}),
    ("efficiency", "finished", 86.0, 150_000, {"n_total": 4, "expert_hidden": [128, 64]}),
    ("efficiency", "finished", 87.5, 420_000, {"n_total": 6, "expert_hidden": [256, 128]}),
    ("efficiency", "crashed", None, None, {"n_total": 6}),
    (None, "finished", 85.0, 900_000, {"n_total": 8}),
]


def write_run_folder(folder, config, summary, checkpoint=True):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_lib.to_yaml(config, config_lib.derive_dimensions(config)))
    (folder / "summary.json").write_text(json.dumps(summary))
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"weights")


def summary_for(run_id, state, accuracy, params, config, run_dir, sweep_id):
    summary = {"run_id": run_id, "project": PROJECT, "sweep_id": sweep_id, "state": state, "run_dir": str(run_dir), "config": config}
    if params is not None:
        summary["model_params"] = params
    if accuracy is not None:
        summary["final/test_accuracy"] = accuracy
        summary["final/param_efficiency"] = accuracy / params * 100_000
        summary["final/accuracy_per_million_params"] = accuracy / params * 1_000_000
    return summary


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A store with an accuracy sweep, an efficiency sweep and a standalone run, plus run folders."""
    # No W&B credentials anywhere, so --backend auto picks the local store.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    store_path = tmp_path / "store.db"
    runs_dir = tmp_path / "runs"
    ids = {}
    with Store(store_path) as store:
        sweeps = {
            "accuracy": store.create_sweep(PROJECT, "accuracy", ACCURACY_SWEEP)["sweep_id"],
            "efficiency": store.create_sweep(PROJECT, "efficiency", EFFICIENCY_SWEEP)["sweep_id"],
        }
        for index, (sweep, state, accuracy, params, overrides) in enumerate(RUNS):
            config = config_lib.resolve(set_values=overrides)
            if sweep is None:
                run_id = "standalone1"
                run_dir = runs_dir / run_id
                summary = summary_for(run_id, state, accuracy, params, config, run_dir, None)
                write_run_folder(run_dir, config, summary)
                store.record_summary(summary)
            else:
                claimed = store.claim_run(sweeps[sweep], lambda s, runs, c=config, i=index: Claim(c, f"key{i}", 0, 0), runs_dir)
                run_id = claimed["run_id"]
                run_dir = runs_dir / run_id
                summary = summary_for(run_id, state, accuracy, params, config, run_dir, sweeps[sweep])
                write_run_folder(run_dir, config, summary, checkpoint=state == "finished")
                store.finish_run(run_id, state, 0 if state == "finished" else 1, None, summary, str(run_dir), 2.0)
            ids[(sweep, accuracy, state)] = run_id
    return {"store": store_path, "sweeps": sweeps, "ids": ids, "tmp": tmp_path}


def invoke(args, study):
    runner = CliRunner()
    return runner.invoke(main, ["results", "--store", str(study["store"]), "--project", PROJECT, *args])


def best_accuracy(study):
    return study["ids"][("accuracy", 89.5, "finished")]


def best_efficiency(study):
    return study["ids"][("efficiency", 86.0, "finished")]


# --------------------------------------------------------------------------------------------
# Analysis output
# --------------------------------------------------------------------------------------------


def test_table_report(study):
    result = invoke(["--max-params", "500K"], study)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Project proj (local store" in out
    assert "7 runs, 5 analysed, 2 sweeps" in out
    assert "Excluded 2 of 7 runs: 1 crashed, 1 failed." in out
    assert best_accuracy(study) in out
    assert best_efficiency(study) in out
    assert "Trade-off: efficiency's best" in out
    assert "-3.5 points of test accuracy for 88 % fewer parameters" in out
    assert "Pareto frontier of test accuracy against parameters: 3 runs, smallest first" in out
    assert re.search(r"^  n_total\s+4\s+6\s+12$", out, flags=re.M)
    assert re.search(r"^  expert_hidden\s+\[128, 64\]\s+\[256, 128\]\s+\[512, 256\]$", out, flags=re.M)
    # 87.5 % at 420K is the most accurate run within 500K.
    chosen = study["ids"][("efficiency", 87.5, "finished")]
    assert f"run:        {chosen} (efficiency)" in out
    checkpoint = study["tmp"] / "runs" / chosen / "checkpoint.pt"
    assert f"checkpoint: {checkpoint}\n" in out
    assert f"collective_model.load_model('{checkpoint.parent}')" in out
    assert "Backend local: no W&B credentials" in result.stderr


def test_store_is_only_read(study):
    before = study["store"].stat().st_mtime_ns
    assert invoke([], study).exit_code == 0
    with Store(study["store"]) as store:
        assert len(store.list_runs(PROJECT)) == 7
    assert study["store"].stat().st_mtime_ns == before


def test_csv_and_json_carry_table_runs(study):
    table = invoke([], study).stdout
    frontier_ids = re.findall(r"^\s+\d+\s+(\S+)\s", table.split("Pareto frontier")[1], flags=re.M)
    listed = set(frontier_ids) | {best_accuracy(study), best_efficiency(study)}

    csv_result = invoke(["--format", "csv"], study)
    assert csv_result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(csv_result.stdout)))
    assert {row["run_id"] for row in rows} == listed
    assert [row["run_id"] for row in rows if row["on_frontier"] == "true"] == frontier_ids
    assert "Excluded 2 of 7 runs" in csv_result.stderr

    json_result = invoke(["--format", "json"], study)
    document = json.loads(json_result.stdout)
    assert {run["run_id"] for run in document["runs"]} == listed
    assert document["frontier"] == frontier_ids
    assert document["excluded"] == {"crashed": 1, "failed": 1}
    assert document["runs_total"] == 7
    assert {w["run_id"] for w in document["best_per_sweep"]} == {best_accuracy(study), best_efficiency(study)}


def test_sweep_option(study):
    result = invoke(["--sweep", "efficiency", "--format", "json"], study)
    document = json.loads(result.stdout)
    assert document["runs_total"] == 3
    assert [w["sweep"] for w in document["best_per_sweep"]] == ["efficiency"]


def test_plot_written(study, tmp_path):
    target = tmp_path / "plots" / "front.png"
    result = invoke(["--plot", str(target), "--max-params", "500000", "--min-accuracy", "86"], study)
    assert result.exit_code == 0, result.output
    assert f"Plot written to {target}" in result.stdout
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 20_000


def test_plot_folder_not_writable(study, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    result = invoke(["--plot", str(blocker / "front.png")], study)
    assert result.exit_code == 1
    assert f"writing the plot to {blocker / 'front.png'} failed" in result.stderr


@pytest.mark.parametrize("name", ["front.svg", "front.PDF"])
def test_plot_other_formats(study, tmp_path, name):
    result = invoke(["--plot", str(tmp_path / name)], study)
    assert result.exit_code == 0, result.output
    assert (tmp_path / name).stat().st_size > 0


def test_plot_path_goes_to_stderr_for_json(study, tmp_path):
    result = invoke(["--plot", str(tmp_path / "f.png"), "--format", "json"], study)
    assert result.exit_code == 0
    json.loads(result.stdout)
    assert "Plot written to" in result.stderr


def test_none_qualifies(study):
    result = invoke(["--max-params", "100000"], study)
    assert result.exit_code == 0
    assert "No analysed run meets the constraints (at most 100,000 parameters): the smallest analysed run has 150,000 parameters." in result.stdout


def test_min_accuracy_fraction_note(study):
    result = invoke(["--min-accuracy", "0.88"], study)
    assert result.exit_code == 0
    assert "note: --min-accuracy is in percent; 0.88 requests 0.88 %, not 88 %" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-params", "-5"], "Invalid value for '--max-params': '-5' is not a parameter count"),
        (["--max-params", "0"], "'0' is not a positive parameter count"),
        (["--max-params", "lots"], "'lots' is not a parameter count"),
        (["--max-params", "1.5"], "'1.5' is not a whole number of parameters"),
        (["--min-accuracy", "150"], "'150' is outside 0 to 100"),
        (["--min-accuracy", "-1"], "'-1' is outside 0 to 100"),
        (["--min-accuracy", "nan"], "'nan' is outside 0 to 100"),
        (["--min-accuracy", "high"], "'high' is not a number"),
        (["--format", "xml"], "Invalid value for '--format'"),
        (["--backend", "cloud"], "Invalid value for '--backend'"),
        (["--sweep", "nope"], "--sweep 'nope': no such sweep in project proj"),
        (["--plot", "front.txt"], "'front.txt' has no image suffix matplotlib can write"),
        (["--plot", "front"], "'front' has no image suffix matplotlib can write"),
    ],
)
def test_bad_options_exit_2(study, args, message):
    result = invoke(args, study)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("text, count", [("500000", 500_000), ("500_000", 500_000), ("500K", 500_000), ("1.5M", 1_500_000), ("2b", 2_000_000_000)])
def test_max_params_forms(study, text, count):
    result = invoke(["--max-params", text, "--format", "json"], study)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["constraints"]["max_params"] == count


def test_missing_store(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    missing = tmp_path / "nothing" / "store.db"
    result = CliRunner().invoke(main, ["results", "--store", str(missing)])
    assert result.exit_code == 1
    assert f"no local store at {missing}" in result.stderr
    assert not missing.parent.exists()


def test_empty_project(study):
    result = CliRunner().invoke(main, ["results", "--store", str(study["store"]), "--project", "other"])
    assert result.exit_code == 1
    assert "no runs in project other" in result.stderr


def test_project_with_only_failed_runs(study):
    result = invoke(["--sweep", "efficiency", "--sweep", "accuracy", "--min-accuracy", "10"], study)
    assert result.exit_code == 0
    with Store(study["store"]) as store:
        store.create_sweep(PROJECT, "broken", ACCURACY_SWEEP, sweep_id="broken01")
        claimed = store.claim_run("broken01", lambda s, r: Claim({"n_total": 4}, "k", 0, 0), study["tmp"] / "runs")
        store.finish_run(claimed["run_id"], "failed", 1, "non-finite loss", {}, None, 1.0)
    result = invoke(["--sweep", "broken"], study)
    assert result.exit_code == 1
    assert "no finished run with final/test_accuracy and model_params in project proj. Excluded 1 of 1 runs: 1 failed." in result.stderr


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export(study, *args):
    return CliRunner().invoke(main, ["results", "--store", str(study["store"]), "export", *args])


def test_export_copies_files_and_readme(study, tmp_path):
    run_id = best_efficiency(study)
    target = tmp_path / "deploy"
    result = export(study, run_id, str(target))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "checkpoint.pt", "config.yaml", "summary.json"]
    assert (target / "checkpoint.pt").read_bytes() == b"weights"
    assert yaml.safe_load((target / "config.yaml").read_text())["n_total"] == 4
    readme = (target / "README.md").read_text()
    assert f"# Collective Model, run {run_id}" in readme
    assert "sweep efficiency" in readme
    assert "- final/test_accuracy: 86.00 %" in readme
    assert "- model_params: 150,000 (150K)" in readme
    assert 'collective_model.load_model(".")' in readme
    assert "shape (batch, 784)" in readme
    assert "mean [0.286] and std [0.353]" in readme
    assert f"Exported run {run_id} to {target}" in result.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deploy.")]


def test_export_folder_permissions(study, tmp_path):
    target = tmp_path / "deploy"
    result = export(study, best_accuracy(study), str(target))
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask


def test_export_parent_is_a_file(study, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    result = export(study, best_accuracy(study), str(blocker / "deploy"))
    assert result.exit_code == 1
    assert f"exporting run {best_accuracy(study)} to {blocker / 'deploy'} failed" in result.stderr


def test_export_into_empty_folder_and_by_prefix(study, tmp_path):
    run_id = best_accuracy(study)
    target = tmp_path / "empty"
    target.mkdir()
    result = export(study, run_id[:6], str(target))
    assert result.exit_code == 0, result.output
    assert (target / "checkpoint.pt").is_file()


def test_export_unknown_run(study, tmp_path):
    result = export(study, "zzzzzzzz", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "run 'zzzzzzzz' not found in the local store" in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_ambiguous_prefix(study, tmp_path):
    result = export(study, "", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "run id prefix '' matches 7 runs in the local store" in result.stderr


def test_export_without_checkpoint(study, tmp_path):
    failed = study["ids"][("accuracy", None, "failed")]
    result = export(study, failed, str(tmp_path / "out"))
    assert result.exit_code == 1
    assert f"run {failed}: checkpoint.pt not found in its run folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_export_into_non_empty_folder(study, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = export(study, best_accuracy(study), str(target))
    assert result.exit_code == 2
    assert f"export destination {target} is not empty" in result.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_export_onto_a_file(study, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = export(study, best_accuracy(study), str(target))
    assert result.exit_code == 2
    assert "is a file" in result.stderr or "is a file" in result.output


def test_export_rejects_analysis_options(study, tmp_path):
    result = CliRunner().invoke(main, ["results", "--store", str(study["store"]), "--max-params", "5", "export", "x", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--max-params applies only to the analysis" in result.stderr


def test_exported_model_reloads(tmp_path, monkeypatch):
    """A real checkpoint exported by run id reloads with load_model and gives the same logits."""
    torch = pytest.importorskip("torch")
    import collective_model
    from collective_model.checkpoint import save_checkpoint
    from collective_model.models import build_model

    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = config_lib.resolve(set_values={"n_total": 3, "expert_hidden": [8, 8], "analyst_hidden": [8, 8], "expert_output": 4, "analyst_output": 4})
    derived = config_lib.derive_dimensions(config)
    torch.manual_seed(0)
    model = build_model(config).eval()
    run_dir = tmp_path / "runs" / "real0001"
    summary = summary_for("real0001", "finished", 80.0, model.num_parameters(), config, run_dir, None)
    write_run_folder(run_dir, config, summary, checkpoint=False)
    save_checkpoint(run_dir / "checkpoint.pt", model.state_dict(), config, derived, 1, 80.0)
    store_path = tmp_path / "store.db"
    with Store(store_path) as store:
        store.record_summary(summary)

    target = tmp_path / "deploy"
    result = CliRunner().invoke(main, ["results", "--store", str(store_path), "export", "real0001", str(target)])
    assert result.exit_code == 0, result.output
    reloaded = collective_model.load_model(target)
    x = torch.randn(5, derived["input_dim"])
    assert torch.equal(reloaded(x), model(x))
