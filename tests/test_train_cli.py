"""`collective train` end to end on the real Fashion-MNIST, as subprocesses in W&B offline mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import SMALL_MODEL, isolated_env, run_collective

EPOCH_KEYS = {
    "epoch", "train/loss", "train/accuracy", "train/loss_prediction", "train/loss_diversity_expert",
    "train/loss_diversity_analyst", "val/loss", "val/accuracy", "test/loss", "test/accuracy",
    "param_efficiency/accuracy_per_100k_params", "param_efficiency/accuracy_per_1m_params",
    "param_efficiency/test_accuracy_per_100k_params", "model_params", "lr",
}
FINAL_KEYS = {
    "final/test_accuracy", "final/test_loss", "final/param_efficiency", "final/accuracy_per_million_params",
    "final/val_accuracy", "best_val_accuracy", "best_epoch", "model_params",
}

# Stated accuracy of the short run below (small model, 5,000 training examples, 2 epochs). It
# measured 76.1 % on a 2-core CPU; the margin covers other CPUs' float rounding.
SHORT_RUN_MIN_TEST_ACCURACY = 70.0


def run_folders(workdir: Path) -> list[Path]:
    runs = workdir / ".collective" / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.exists() else []


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, fashion_mnist_dir):
    """One real training run shared by the record tests of this module."""
    workdir = tmp_path_factory.mktemp("short_run")
    (workdir / "home").mkdir()
    env = isolated_env(workdir / "home")
    result = run_collective(["train", *SMALL_MODEL, "--set", "train_subset=5000", "--set", "epochs=2"], workdir, env)
    assert result.returncode == 0, result.stderr
    (folder,) = run_folders(workdir)
    return workdir, folder, result


def test_short_run_reaches_stated_accuracy(short_run):
    _, folder, _ = short_run
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["state"] == "finished"
    assert summary["final/test_accuracy"] >= SHORT_RUN_MIN_TEST_ACCURACY


def test_metrics_jsonl_has_every_epoch_key(short_run):
    _, folder, _ = short_run
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for metrics in lines:
        assert set(metrics) == EPOCH_KEYS
        params = metrics["model_params"]
        assert metrics["param_efficiency/accuracy_per_100k_params"] == pytest.approx(metrics["val/accuracy"] / params * 1e5, rel=1e-12)
        assert metrics["param_efficiency/accuracy_per_1m_params"] == pytest.approx(metrics["val/accuracy"] / params * 1e6, rel=1e-12)
        assert metrics["param_efficiency/test_accuracy_per_100k_params"] == pytest.approx(metrics["test/accuracy"] / params * 1e5, rel=1e-12)
        assert 0.0 <= metrics["test/accuracy"] <= 100.0


def test_summary_has_every_final_key(short_run):
    _, folder, _ = short_run
    summary = json.loads((folder / "summary.json").read_text())
    assert FINAL_KEYS <= set(summary)
    assert summary["final/param_efficiency"] == pytest.approx(summary["final/test_accuracy"] / summary["model_params"] * 100000, rel=1e-9)
    assert summary["final/accuracy_per_million_params"] == pytest.approx(summary["final/test_accuracy"] / summary["model_params"] * 1e6, rel=1e-9)
    assert summary["wandb_mode"] == "offline"
    assert summary["sweep_id"] is None
    assert summary["run_dir"] == str(folder)
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    best = max(history, key=lambda m: m["val/accuracy"])
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best_val_accuracy"] == best["val/accuracy"]
    # Final metrics are measured on the best-validation checkpoint.
    assert summary["final/val_accuracy"] == pytest.approx(best["val/accuracy"])


def test_config_yaml_holds_inputs_and_derived(short_run):
    _, folder, _ = short_run
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["expert_hidden"] == [64, 32]
    assert saved["train_subset"] == 5000
    assert saved["derived"]["n_experts"] == 2  # round(4 * 0.5)
    assert saved["derived"]["n_analysts"] == 2


def test_wandb_offline_run_written_inside_run_folder(short_run):
    workdir, folder, result = short_run
    assert list((folder / "wandb").glob("offline-run-*"))
    assert not (workdir / "wandb").exists()
    assert "wandb sync" in result.stderr


def test_checkpoint_reload_reproduces_test_accuracy(short_run, fashion_mnist_dir):
    import torch

    import collective_model
    from collective_model.data import Normalizer, SPECS, find_and_load, iterate_batches

    _, folder, _ = short_run
    summary = json.loads((folder / "summary.json").read_text())
    model = collective_model.load_model(folder)
    assert model.num_parameters() == summary["model_params"]
    splits, _ = find_and_load("fashion_mnist", fashion_mnist_dir, download=False)
    normalizer = Normalizer(SPECS["fashion_mnist"], "cpu")
    correct = 0
    with torch.no_grad():
        for images, labels in iterate_batches(splits["test"], 1000):
            correct += (model(normalizer(images)).argmax(1) == labels).sum().item()
    assert correct / len(splits["test"]) * 100.0 == pytest.approx(summary["final/test_accuracy"], abs=1e-9)


def test_same_seed_gives_same_metrics(workdir, cli_env, fashion_mnist_dir):
    args = ["train", "-q", *SMALL_MODEL, "--set", "train_subset=1000", "--set", "epochs=1", "--set", "use_augmentation=true",
            "--set", "use_drop_models=true"]
    for _ in range(2):
        result = run_collective(args, workdir, cli_env)
        assert result.returncode == 0, result.stderr
    first, second = [(f / "metrics.jsonl").read_text() for f in run_folders(workdir)]
    assert first == second


def test_misspelt_key_exits_2_and_writes_nothing(workdir, cli_env):
    (workdir / "config.yaml").write_text("learning_rat: 0.01\n")
    result = run_collective(["train", "--config", "config.yaml"], workdir, cli_env)
    assert result.returncode == 2
    assert "learning_rat" in result.stderr
    assert "did you mean 'learning_rate'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / ".collective").exists()
    assert not (workdir / "wandb").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", 'use_augmentation="False"'], "use_augmentation: invalid value 'False' (str); expected true or false"),
        (["--set", "use_augmentation=yes"], "use_augmentation: invalid value 'yes' (str); expected true or false"),
        (["--set", "expert_hidden=[]"], "expert_hidden: invalid value [] (list)"),
        (["--set", "epochs"], "--set 'epochs': expected key=value"),
        (["--config", "missing.yaml"], "config file not found: missing.yaml"),
    ],
)
def test_invalid_cli_values_exit_2(workdir, cli_env, args, fragment):
    result = run_collective(["train", *args], workdir, cli_env)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert not (workdir / ".collective").exists()


def test_sweep_params_override_config_and_set(workdir, cli_env, fashion_mnist_dir):
    (workdir / "base.yaml").write_text("n_total: 6\nexpert_hidden: [48, 24]\nlearning_rate: 0.01\n")
    params = workdir / "params.yaml"
    params.write_text(
        "wandb_version: 1\n\n"
        "n_total:\n  value: 4\n"
        "expert_hidden:\n  value:\n  - 40\n  - 20\n  - 10\n"
        "use_drop_models:\n  value: true\n"
        "learning_rate:\n  value: 0.002\n"
    )
    env = dict(cli_env, WANDB_SWEEP_PARAM_PATH=str(params))
    result = run_collective(
        ["train", "-q", "--config", "base.yaml", "--set", "n_total=5", "--set", "expert_hidden=[30,15]",
         "--set", "train_subset=500", "--set", "epochs=1", "--set", "analyst_hidden=[16,8]"],
        workdir, env,
    )
    assert result.returncode == 0, result.stderr
    (folder,) = run_folders(workdir)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["n_total"] == 4
    assert saved["expert_hidden"] == [40, 20, 10]
    assert saved["use_drop_models"] is True
    assert saved["learning_rate"] == 0.002
    assert saved["analyst_hidden"] == [16, 8]  # from --set, not overridden by the sweep

    import collective_model
    from collective_model import config as C
    from collective_model.models import CollectiveModel

    model = collective_model.load_model(folder)
    assert model.experts.member_widths == [[40, 20, 10], [40, 20, 10]]
    expected = CollectiveModel(C.validate({k: v for k, v in saved.items() if k != "derived"})).num_parameters()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["model_params"] == expected == model.num_parameters()


# SGD with learning_rate 10 and weight_decay 1 multiplies every weight by about -9 per step, so
# the loss overflows within a few dozen steps.
DIVERGING = ["--set", "batch_size=16", "--set", "optimizer=sgd", "--set", "learning_rate=10", "--set", "weight_decay=1.0"]


def test_non_finite_loss_fails_the_run(workdir, cli_env, fashion_mnist_dir):
    result = run_collective(
        ["train", "-q", *SMALL_MODEL, "--set", "train_subset=2000", "--set", "epochs=1", *DIVERGING],
        workdir, cli_env,
    )
    assert result.returncode == 3, result.stderr
    assert "non-finite loss" in result.stderr
    assert "epoch 1, step" in result.stderr
    (folder,) = run_folders(workdir)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["state"] == "failed"
    assert summary["reason"].startswith("non-finite loss at epoch 1, step")
    assert "final/test_accuracy" not in summary


def test_missing_data_gives_one_message(workdir, fashion_mnist_dir):
    empty = workdir / "empty"
    empty.mkdir()
    env = isolated_env(workdir / "home", COLLECTIVE_DATA_DIR=str(empty))
    # --no-download keeps the test off the network; the download path itself is tested in
    # test_data.py against a loopback server.
    result = run_collective(["train", "--no-download", "--set", "epochs=1"], workdir, env)
    assert result.returncode == 1
    assert "dataset 'fashion_mnist' not found" in result.stderr
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / ".collective" / "runs").exists()
    assert list(empty.iterdir()) == []


def test_mixed_precision_on_cpu_prints_notice(workdir, cli_env, fashion_mnist_dir):
    result = run_collective(
        ["train", *SMALL_MODEL, "--set", "train_subset=300", "--set", "epochs=1", "--set", "use_mixed_precision=true",
         "--set", "device=cpu"],
        workdir, cli_env,
    )
    assert result.returncode == 0, result.stderr
    assert "use_mixed_precision applies to CUDA only" in result.stderr


def test_print_config_shows_derived_without_training(workdir, cli_env):
    result = run_collective(["train", "--print-config", "--set", "n_total=10"], workdir, cli_env)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["n_total"] == 10
    assert printed["derived"]["n_experts"] == 2
    assert printed["derived"]["n_analysts"] == 8
    assert not (workdir / ".collective").exists()


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["sweep", "--help"], ["results", "--help"]])
def test_help_does_not_import_torch_or_wandb(args):
    code = (
        "import sys\n"
        "from collective_model.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
        "heavy = [m for m in ('torch', 'wandb', 'sweeps', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_wandb_config_wins_after_init(tmp_path, monkeypatch, fashion_mnist_dir):
    """When W&B's config after init differs (as a server-side sweep may make it), training uses it."""
    from collective_model import config as C
    from collective_model.run import RunOptions, execute_run
    from collective_model.tracking import WandbRun

    for name in ("WANDB_API_KEY", "WANDB_SWEEP_PARAM_PATH", "WANDB_RUN_ID", "COLLECTIVE_SWEEP_ID", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    original = WandbRun.effective_config

    def sweep_values(self):
        values = original(self)
        values.update(train_subset=300, expert_hidden=[24, 12])
        return values

    monkeypatch.setattr(WandbRun, "effective_config", sweep_values)
    config = C.resolve(set_values={"train_subset": 500, "epochs": 1, "expert_hidden": [32, 16], "analyst_hidden": [16, 8]})
    summary = execute_run(config, RunOptions(quiet=True, store_path=str(tmp_path / "store.db")))

    assert summary["train_examples"] == 300
    assert summary["config"]["expert_hidden"] == [24, 12]
    saved = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    assert saved["train_subset"] == 300
    assert saved["expert_hidden"] == [24, 12]
