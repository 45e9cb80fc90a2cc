"""The benchmark's parts that run in seconds: the first-step mark, the torchvision layout, the table.

The benchmark itself takes minutes and its figures depend on the machine, so it is not run here.
"""

from __future__ import annotations

import gzip
import json
import time

import pytest
import torch

from collective_model import benchmark as B
from collective_model import config as C
from collective_model.data import IDX_FILES, SPECS, ArraySplit, DataSplits
from collective_model.models import build_model
from collective_model.training import FIRST_STEP_MARK_ENV, Trainer

TINY_MODEL = {
    "n_total": 3, "expert_hidden": [8, 4], "expert_output": 4, "analyst_hidden": [6, 4], "analyst_output": 3,
    "epochs": 1, "batch_size": 8,
}


def tiny_data() -> DataSplits:
    generator = torch.Generator().manual_seed(0)

    def split(count: int) -> ArraySplit:
        images = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=generator)
        return ArraySplit(images, torch.arange(count) % 10)

    return DataSplits(split(24), split(8), split(8), SPECS["fashion_mnist"], "synthetic")


def test_first_step_mark_written_once(tmp_path, monkeypatch):
    mark = tmp_path / "first-step"
    monkeypatch.setenv(FIRST_STEP_MARK_ENV, str(mark))
    config = C.resolve(set_values=TINY_MODEL)
    trainer = Trainer(build_model(config), tiny_data(), config, torch.device("cpu"))
    before = time.time()
    trainer.train_epoch(1)
    written = float(mark.read_text())
    assert before <= written <= time.time()
    mark.unlink()
    trainer.train_epoch(2)
    assert not mark.exists()


def test_no_mark_without_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(FIRST_STEP_MARK_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    config = C.resolve(set_values=TINY_MODEL)
    Trainer(build_model(config), tiny_data(), config, torch.device("cpu")).train_epoch(1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compressed", [True, False])
def test_torchvision_layout_has_plain_files(tmp_path, compressed):
    source = tmp_path / "source"
    source.mkdir()
    for index, stem in enumerate(IDX_FILES.values()):
        payload = bytes([index]) * 20
        if compressed:
            (source / (stem + ".gz")).write_bytes(gzip.compress(payload))
        else:
            (source / stem).write_bytes(payload)
    B.write_torchvision_layout(source, tmp_path / "root")
    for index, stem in enumerate(IDX_FILES.values()):
        assert (tmp_path / "root" / "FashionMNIST" / "raw" / stem).read_bytes() == bytes([index]) * 20


def test_train_command_sets_reference_config(tmp_path):
    command = B._train_command("cpu", 1280, tmp_path, None)
    settings = dict(command[i + 1].split("=", 1) for i, part in enumerate(command) if part == "--set")
    values = {key: json.loads(value) for key, value in settings.items()}
    assert values["expert_hidden"] == [512, 256]
    assert values["train_subset"] == 1280
    assert values["epochs"] == 1
    # Every value must also parse as the YAML that `--set` reads.
    resolved = C.resolve(set_values=C.parse_set_options(f"{k}={v}" for k, v in settings.items()))
    assert resolved["collective_version"] == "simple_mlp"
    assert resolved["optimizer"] == "adam"


def test_reference_config_has_stated_parameter_count():
    assert build_model(B.reference_config("cpu")).num_parameters() == 2_851_113


def test_table_lists_every_figure():
    measurements = {key: [1000.0, 1100.0] for key in (
        "product_train_no_aug", "product_train_aug", "product_eval",
        "reference_train_no_aug", "reference_train_aug", "matmul_flops",
    )}
    results = {
        "device": "cpu", "device_name": "test", "torch_version": "0", "torch_threads": 2, "model_params": 10,
        "train_samples_per_measurement": 100, "rounds": 2,
        "a_train_no_aug_samples_per_s": 6000.0, "a_train_aug_samples_per_s": 5500.0, "a_eval_samples_per_s": 20000.0,
        "b_train_no_aug_samples_per_s": 2000.0, "b_train_aug_samples_per_s": 1500.0,
        "c_bound_samples_per_s": 10000.0, "ratio_a_b_no_aug": 3.0, "ratio_a_b_aug": 3.6667,
        "ratio_a_c_no_aug": 0.6, "ratio_a_c_aug": 0.55, "matmul_size": 2048, "matmul_float32_flops": 1.8e11,
        "startup_s": 3.2, "startup_runs_s": [3.2, 3.4], "peak_rss_mib": 900.0, "peak_rss_run_train_samples": 54000,
        "load_average_before": 1.0, "load_average_after": 2.0, "measurements": measurements,
    }
    table = B.format_table(results)
    assert "a/b 3.00" in table
    assert "a/b 3.67" in table
    assert "a/c 0.60 without augmentation, 0.55 with" in table
    assert "3.20 s" in table
    assert "900 MiB" in table
    assert "180.0 GFLOP/s" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_device_is_usage_error():
    from click.testing import CliRunner

    from collective_model.cli import main

    result = CliRunner().invoke(main, ["bench", "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA device is available; use --device cpu or auto" in result.output
