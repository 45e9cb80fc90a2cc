"""Training-speed benchmark: the product's pipeline, a conventional pipeline and the arithmetic bound.

Figures, all on real Fashion-MNIST at ``REFERENCE_CONFIG``:

- (a) the product: ``Trainer.train_epoch`` with and without augmentation, and ``Trainer.evaluate``;
- (b) a conventional pipeline written here: torchvision's ``FashionMNIST`` with PIL transforms,
  ``DataLoader(batch_size=128, shuffle=True, num_workers=2)``, the member-by-member
  ``ReferenceCollectiveModel`` and Adam, with and without augmentation;
- (c) the arithmetic bound: large-matmul FLOP/s / (6 x model_params) samples/s;
- start-up time (process start to the first training step) and peak resident memory of
  ``collective train`` subprocesses.

(a) and (b) run interleaved in one process, round after round. Each figure is the best of its
rounds, so that load from other processes on the machine slows both sides alike, and a quiet
moment shows each at its speed. The load averages before and after are recorded.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from . import config as config_lib
from .data import IDX_FILES, SPECS

# The configuration the speed targets refer to (all other keys keep their defaults).
REFERENCE_CONFIG: dict[str, Any] = {
    "dataset": "fashion_mnist",
    "n_total": 8, "expert_ratio": 0.2, "expert_hidden": [512, 256], "expert_output": 128,
    "analyst_hidden": [256, 128], "analyst_output": 64, "c_expert": 0.25, "c_collective": 1.0,
    "collective_version": "simple_mlp", "batch_size": 128, "optimizer": "adam",
}

QUICK_SAMPLES = 6400  # training samples per measurement with --quick (50 batches of 128)
WARMUP_BATCHES = 10
STARTUP_RUNS = 3  # short `collective train` runs; start-up time is the best of them
STARTUP_RUN_SAMPLES = 1280

# Runs one command, then prints its start time and the peak resident memory of the largest
# process among its descendants. A separate small process, so that no other child of the
# benchmark (such as DataLoader workers) counts.
_SUBPROCESS_PROBE = """
import json, resource, subprocess, sys, time
command = json.loads(sys.argv[1])
start = time.time()
completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"start": start, "returncode": completed.returncode, "peak_kib": peak_kib, "stderr": completed.stderr[-3000:]}))
"""


@dataclass
class BenchSettings:
    quick: bool = False
    device: str = "auto"
    rounds: int = 3
    data_dir: str | None = None
    progress: Callable[[str], None] = lambda message: None


def reference_config(device: str) -> dict[str, Any]:
    """Return the validated reference config for ``device`` (mixed precision on CUDA)."""
    return config_lib.resolve(set_values={**REFERENCE_CONFIG, "device": device, "use_mixed_precision": device == "cuda"})


# --------------------------------------------------------------------------------------------
# (c) The arithmetic bound
# --------------------------------------------------------------------------------------------


def matmul_flops(device, size: int, repeats: int = 5) -> float:
    """Return the best FLOP/s of a float32 [size, size] @ [size, size] product on ``device``."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = 0.0
    for _ in range(repeats + 1):  # the first product is a warm-up
        _synchronize(device)
        started = time.perf_counter()
        a @ b
        _synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


def _synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# (a) The product
# --------------------------------------------------------------------------------------------


class ProductPipeline:
    """One ``Trainer`` per augmentation setting, on the first ``samples`` training examples."""

    def __init__(self, data, config: dict[str, Any], device, samples: int):
        import torch

        from .data import ArraySplit
        from .models import build_model
        from .training import Trainer

        self.device = device
        self.test = data.test
        train = ArraySplit(data.train.images[:samples], data.train.labels[:samples])
        self.data = dataclasses.replace(data, train=train)
        self.trainers = {}
        for augmentation in (False, True):
            run_config = {**config, "use_augmentation": augmentation}
            torch.manual_seed(run_config["seed"])
            self.trainers[augmentation] = Trainer(build_model(run_config), self.data, run_config, device)

    def warm_up(self) -> None:
        """Train a few batches with each trainer, so that allocations and kernels are warm."""
        from .data import ArraySplit

        batch = self.data.train.images[: WARMUP_BATCHES * 128], self.data.train.labels[: WARMUP_BATCHES * 128]
        short = dataclasses.replace(self.data, train=ArraySplit(*batch))
        for trainer in self.trainers.values():
            trainer.data = short
            trainer.train_epoch(1)
            trainer.data = self.data
        self.trainers[False].evaluate(self.data.val)

    def train_throughput(self, augmentation: bool) -> float:
        """Train one epoch over the samples; return samples per second."""
        trainer = self.trainers[augmentation]
        _synchronize(self.device)
        started = time.perf_counter()
        trainer.train_epoch(1)  # ends with a host copy of the epoch's sums, so the device is done
        return len(self.data.train) / (time.perf_counter() - started)

    def eval_throughput(self) -> float:
        """Evaluate the test split; return samples per second."""
        started = time.perf_counter()
        self.trainers[False].evaluate(self.test)  # ends with .item(), so the device is done
        return len(self.test) / (time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# (b) The conventional pipeline
# --------------------------------------------------------------------------------------------


def write_torchvision_layout(source: Path, root: Path) -> None:
    """Write the four Fashion-MNIST IDX files, decompressed, to root/FashionMNIST/raw/.

    torchvision's ``FashionMNIST(root, download=False)`` reads that folder. ``source`` contains
    the files the product found, plain or gzip-compressed.
    """
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES.values():
        plain, compressed = source / stem, source / (stem + ".gz")
        if plain.is_file():
            shutil.copyfile(plain, raw / stem)
        else:
            with gzip.open(compressed, "rb") as reader, open(raw / stem, "wb") as writer:
                shutil.copyfileobj(reader, writer)


class ReferencePipeline:
    """torchvision dataset + PIL transforms + DataLoader + member-by-member model + Adam."""

    def __init__(self, root: Path, config: dict[str, Any], device, samples: int):
        import torch
        from torch.utils.data import DataLoader, Subset
        from torchvision import datasets, transforms

        from .models import build_model
        from .reference import ReferenceCollectiveModel

        spec = SPECS["fashion_mnist"]
        to_vector = [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std), transforms.Lambda(torch.flatten)]
        augmentation = [
            transforms.RandomRotation(10),
            transforms.RandomAffine(0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        ]
        self.loaders = {}
        for augmented in (False, True):
            transform = transforms.Compose((augmentation if augmented else []) + to_vector)
            dataset = datasets.FashionMNIST(str(root), train=True, download=False, transform=transform)
            subset = Subset(dataset, range(samples))
            self.loaders[augmented] = DataLoader(subset, batch_size=config["batch_size"], shuffle=True, num_workers=2)
        self.samples = samples
        self.device = device
        self.diversity_lambda = config["diversity_lambda"]
        torch.manual_seed(config["seed"])
        self.model = ReferenceCollectiveModel.from_fast(build_model(config)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config["learning_rate"])

    def _step(self, images, labels) -> float:
        import torch.nn.functional as F

        images, labels = images.to(self.device), labels.to(self.device)
        out = self.model.forward_with_losses(images)
        loss = F.cross_entropy(out.logits, labels) + self.diversity_lambda * (out.diversity_expert + out.diversity_analyst)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def warm_up(self) -> None:
        self.model.train()
        for index, (images, labels) in enumerate(self.loaders[False]):
            self._step(images, labels)
            if index + 1 == WARMUP_BATCHES:
                break

    def train_throughput(self, augmentation: bool) -> float:
        """Train one epoch over the samples, loader start included; return samples per second."""
        self.model.train()
        started = time.perf_counter()
        running_loss = 0.0
        for images, labels in self.loaders[augmentation]:
            running_loss += self._step(images, labels)
        return self.samples / (time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# Start-up time and peak memory of `collective train`
# --------------------------------------------------------------------------------------------


def _train_command(device: str, train_subset: int, folder: Path, data_dir: str | None) -> list[str]:
    command = [sys.executable, "-m", "collective_model.cli", "train", "-q"]
    for key, value in {**REFERENCE_CONFIG, "device": device, "epochs": 1, "train_subset": train_subset}.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    command += ["--runs-dir", str(folder / "runs"), "--store", str(folder / "store.db")]
    if data_dir:
        command += ["--data-dir", data_dir]
    return command


def probe_train_run(device: str, train_subset: int, folder: Path, data_dir: str | None, tag: str) -> dict[str, float]:
    """Run `collective train` for one epoch; return its start-up seconds and peak RSS in MiB.

    W&B runs offline, so nothing leaves the machine; records go to ``folder``.
    """
    from .training import FIRST_STEP_MARK_ENV

    mark = folder / f"first-step-{tag}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_SWEEP", "COLLECTIVE_SWEEP"))}
    env.update({FIRST_STEP_MARK_ENV: str(mark), "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    # The package's own folder first, so that a checkout runs without being installed.
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = _train_command(device, train_subset, folder, data_dir)
    completed = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_PROBE, json.dumps(command)],
        env=env, cwd=folder, capture_output=True, text=True, check=False,
    )
    try:
        report = json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise click.ClickException(f"the `collective train` probe failed: {completed.stderr[-2000:]}") from None
    if report["returncode"] != 0 or not mark.is_file():
        raise click.ClickException(f"`collective train` exited with {report['returncode']}:\n{report['stderr']}")
    first_step = float(mark.read_text(encoding="utf-8"))
    return {"startup_s": first_step - report["start"], "peak_rss_mib": report["peak_kib"] / 1024}


# --------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    """Measure every figure and return them as one flat dict (the JSON line of the benchmark)."""
    import torch

    from .data import find_and_load, load_splits
    from .training import resolve_device

    say = settings.progress
    device = resolve_device(settings.device)
    config = reference_config(device.type)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="collective-bench-") as temporary:
        folder = Path(temporary)

        # Start-up and memory first, while this process has no other children.
        say("measuring start-up time and peak memory of `collective train` ...")
        startups = []
        for index in range(STARTUP_RUNS):
            startups.append(probe_train_run(device.type, STARTUP_RUN_SAMPLES, folder, settings.data_dir, f"short{index}")["startup_s"])
        memory_samples = QUICK_SAMPLES if settings.quick else 0
        full = probe_train_run(device.type, memory_samples, folder, settings.data_dir, "memory")
        startups.append(full["startup_s"])

        # The product's data, and the same files in torchvision's layout for the reference.
        data = load_splits(config, settings.data_dir, device)
        _, source = find_and_load("fashion_mnist", settings.data_dir, download=False)
        write_torchvision_layout(Path(source), folder / "torchvision")
        samples = min(QUICK_SAMPLES, len(data.train)) if settings.quick else len(data.train)

        product = ProductPipeline(data, config, device, samples)
        reference = ReferencePipeline(folder / "torchvision", config, device, samples)
        flops_size = 8192 if device.type == "cuda" else 2048
        say("warming up ...")
        product.warm_up()
        reference.warm_up()

        measured: dict[str, list[float]] = {key: [] for key in (
            "product_train_no_aug", "product_train_aug", "product_eval",
            "reference_train_no_aug", "reference_train_aug", "matmul_flops",
        )}
        for round_index in range(settings.rounds):
            for augmentation in (False, True):
                suffix = "aug" if augmentation else "no_aug"
                measured[f"product_train_{suffix}"].append(product.train_throughput(augmentation))
                measured[f"reference_train_{suffix}"].append(reference.train_throughput(augmentation))
            measured["product_eval"].append(product.eval_throughput())
            measured["matmul_flops"].append(matmul_flops(device, flops_size))
            say(f"round {round_index + 1}/{settings.rounds}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in measured.items()))

    params = product.trainers[False].params
    best = {key: max(values) for key, values in measured.items()}
    bound = best["matmul_flops"] / (6 * params)
    results: dict[str, Any] = {
        "device": str(device),
        "device_name": _device_name(device),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "quick": settings.quick,
        "rounds": settings.rounds,
        "train_samples_per_measurement": samples,
        "model_params": params,
        "mixed_precision": bool(config["use_mixed_precision"]),
        "a_train_no_aug_samples_per_s": best["product_train_no_aug"],
        "a_train_aug_samples_per_s": best["product_train_aug"],
        "a_eval_samples_per_s": best["product_eval"],
        "b_train_no_aug_samples_per_s": best["reference_train_no_aug"],
        "b_train_aug_samples_per_s": best["reference_train_aug"],
        "matmul_float32_flops": best["matmul_flops"],
        "matmul_size": flops_size,
        "c_bound_samples_per_s": bound,
        "ratio_a_b_no_aug": best["product_train_no_aug"] / best["reference_train_no_aug"],
        "ratio_a_b_aug": best["product_train_aug"] / best["reference_train_aug"],
        "ratio_a_c_no_aug": best["product_train_no_aug"] / bound,
        "ratio_a_c_aug": best["product_train_aug"] / bound,
        "startup_s": min(startups),
        "startup_runs_s": startups,
        "peak_rss_mib": full["peak_rss_mib"],
        "peak_rss_run_train_samples": memory_samples or len(data.train),
        "load_average_before": load_before[0],
        "load_average_after": os.getloadavg()[0],
        "measurements": measured,
    }
    return results


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def format_table(results: dict[str, Any]) -> str:
    """Return the human-readable table of a result dict."""
    def rate(key: str) -> str:
        return f"{results[key]:>10,.0f}"

    def spread(key: str) -> str:
        values = results["measurements"][key]
        return f"(rounds: {', '.join(f'{v:,.0f}' for v in values)})"

    lines = [
        f"Fashion-MNIST, reference config ({results['model_params']:,} parameters), device {results['device']} "
        f"({results['device_name']}), torch {results['torch_version']}, {results['torch_threads']} threads, "
        f"{results['train_samples_per_measurement']:,} training samples per measurement, best of {results['rounds']} rounds",
        "",
        f"{'figure':44} {'samples/s':>10}  ratio",
        f"{'(a) product training, no augmentation':44} {rate('a_train_no_aug_samples_per_s')}  {spread('product_train_no_aug')}",
        f"{'(a) product training, augmentation':44} {rate('a_train_aug_samples_per_s')}  {spread('product_train_aug')}",
        f"{'(a) product evaluation':44} {rate('a_eval_samples_per_s')}  {spread('product_eval')}",
        f"{'(b) conventional pipeline, no augmentation':44} {rate('b_train_no_aug_samples_per_s')}  "
        f"a/b {results['ratio_a_b_no_aug']:.2f}  {spread('reference_train_no_aug')}",
        f"{'(b) conventional pipeline, augmentation':44} {rate('b_train_aug_samples_per_s')}  "
        f"a/b {results['ratio_a_b_aug']:.2f}  {spread('reference_train_aug')}",
        f"{'(c) arithmetic bound (6 x params x samples)':44} {rate('c_bound_samples_per_s')}  "
        f"a/c {results['ratio_a_c_no_aug']:.2f} without augmentation, {results['ratio_a_c_aug']:.2f} with",
        "",
        f"float32 matmul {results['matmul_size']}^3: {results['matmul_float32_flops'] / 1e9:,.1f} GFLOP/s",
        f"start-up of `collective train` (process start to first training step): {results['startup_s']:.2f} s "
        f"(best of {', '.join(f'{v:.2f}' for v in results['startup_runs_s'])})",
        f"peak RSS of `collective train` (1 epoch, {results['peak_rss_run_train_samples']:,} training samples): "
        f"{results['peak_rss_mib']:,.0f} MiB",
        f"load average (1 min) before / after: {results['load_average_before']:.2f} / {results['load_average_after']:.2f}",
    ]
    return "\n".join(lines)
