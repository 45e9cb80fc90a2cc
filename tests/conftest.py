"""Shared fixtures: an isolated environment for CLI subprocesses and the real Fashion-MNIST."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# A small model that trains in seconds on 2 CPU cores; tests that need the reference size state it.
SMALL_MODEL = [
    "--set", "expert_hidden=[64,32]", "--set", "expert_output=32",
    "--set", "analyst_hidden=[64,32]", "--set", "analyst_output=16",
    "--set", "n_total=4", "--set", "expert_ratio=0.5",
]


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The real Fashion-MNIST from Debian's dataset-fashion-mnist; the tests fail without it."""
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"real Fashion-MNIST not found in {FASHION_MNIST_DIR}; "
            "install it with: sudo apt-get install dataset-fashion-mnist (.ci/run does this)"
        )
    return FASHION_MNIST_DIR


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """Return an environment with no W&B credentials, no sweep variables and a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "COLLECTIVE_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_collective(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `collective ARGS` as a subprocess with the interpreter running the tests."""
    command = [sys.executable, "-m", "collective_model.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh working directory with its own HOME inside."""
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.fixture
def cli_env(workdir: Path) -> dict[str, str]:
    return isolated_env(workdir / "home")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A working directory (the current one) with no W&B credentials and no collective variables."""
    for name in list(os.environ):
        if name.startswith(("WANDB_", "COLLECTIVE_")) or name == "NETRC":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str):
    """Run the CLI in this process with click's test runner."""
    from click.testing import CliRunner

    from collective_model.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)
