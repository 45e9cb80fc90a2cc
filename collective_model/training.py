"""The training loop: optimiser, schedule, epochs, evaluation and the metrics of every epoch."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from .data import DataSplits, Normalizer, iterate_batches
from .errors import NonFiniteLossError
from .models import CollectiveModel

log = logging.getLogger(__name__)

# On CUDA the loss is checked for NaN/inf every this many steps, so that the host does not wait
# for the GPU at every batch. On the CPU it is checked at every step.
CUDA_FINITE_CHECK_INTERVAL = 50

# When set to a file path, the trainer writes the Unix time (seconds) at which the first training
# step starts into that file. The benchmark uses it to measure start-up time.
FIRST_STEP_MARK_ENV = "COLLECTIVE_BENCH_MARK_FIRST_STEP"


def per_100k(accuracy: float, params: int) -> float:
    """Return accuracy (percent) per 100K parameters.

    >>> per_100k(85.0, 850_000)
    10.0
    """
    return accuracy / params * 100000


def per_1m(accuracy: float, params: int) -> float:
    """Return accuracy (percent) per 1M parameters.

    >>> per_1m(85.0, 8_500_000)
    10.0
    """
    return accuracy / params * 1000000


def resolve_device(name: str) -> torch.device:
    """Map the config's device (auto, cpu, cuda) to a torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .errors import CollectiveError

        raise CollectiveError("device: 'cuda' was requested but no CUDA device is available; use --set device=cpu or auto")
    return torch.device(name)


def build_optimizer(model: torch.nn.Module, config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Build adam, adamw or sgd (momentum 0.9) with the config's learning rate and weight decay.

    The fused implementation updates every parameter in one pass over memory. On a 2-core CPU
    at the reference config an Adam step took 1.1 ms fused, 4.0 ms with ``foreach=True`` and
    7.2 ms with torch's CPU default, a loop over parameters whose temporaries also page-fault
    about 15 MB per step. torch 2.14.1 has fused kernels for the CPU and CUDA. Older releases
    that lack them raise RuntimeError or TypeError at construction, and then the default
    implementation is used.
    """
    params = list(model.parameters())
    lr, decay = config["learning_rate"], config["weight_decay"]
    classes = {"adam": (torch.optim.Adam, {}), "adamw": (torch.optim.AdamW, {}), "sgd": (torch.optim.SGD, {"momentum": 0.9})}
    optimizer_class, options = classes[config["optimizer"]]
    try:
        return optimizer_class(params, lr=lr, weight_decay=decay, fused=True, **options)
    except (RuntimeError, TypeError) as error:
        log.info("fused %s is not available here (%s); using the default implementation", config["optimizer"], error)
        return optimizer_class(params, lr=lr, weight_decay=decay, **options)


def learning_rate_at(config: Mapping[str, Any], epoch_index: int) -> float:
    """Return the learning rate of epoch ``epoch_index`` (0-based) under the config's schedule.

    Cosine starts at the base rate and follows base * (1 + cos(pi * e / epochs)) / 2, so the
    last epoch still trains with a small positive rate.

    >>> learning_rate_at({"learning_rate": 0.1, "lr_schedule": "cosine", "epochs": 2}, 1)
    0.05
    """
    base = config["learning_rate"]
    if config["lr_schedule"] == "constant":
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch_index / config["epochs"]))


@dataclass
class EvalResult:
    loss: float
    accuracy: float


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    best_state: dict | None = None
    train_seconds: float = 0.0


class Trainer:
    """Train a CollectiveModel on in-memory splits and produce the per-epoch and final metrics."""

    def __init__(self, model: CollectiveModel, data: DataSplits, config: Mapping[str, Any], device: torch.device):
        self.model = model.to(device)
        self.data = data
        self.config = dict(config)
        self.device = device
        self.params = model.num_parameters()
        self.optimizer = build_optimizer(model, config)
        self.normalizer = Normalizer(data.spec, device)
        seed = config["seed"]
        self.shuffle_generator = torch.Generator().manual_seed(seed + 1)
        self.augment_generator = torch.Generator().manual_seed(seed + 2) if config["use_augmentation"] else None
        model.drop_generator = torch.Generator().manual_seed(seed + 3)
        self.autocast_dtype = self._autocast_dtype()
        # fp16 needs loss scaling against gradient underflow; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self._first_step_mark = os.environ.get(FIRST_STEP_MARK_ENV) or None

    def _write_first_step_mark(self) -> None:
        path, self._first_step_mark = self._first_step_mark, None
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"{time.time():.6f}\n")

    def _autocast_dtype(self) -> torch.dtype | None:
        """Return the autocast dtype (bf16 where supported, else fp16), or None without autocast."""
        if not self.config["use_mixed_precision"] or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype)

    # ----------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, progress: Callable[[int], None] | None = None) -> dict[str, float]:
        """Train one epoch; return its mean losses and accuracy. ``epoch`` is 1-based."""
        model, config = self.model, self.config
        model.train()
        accumulation = config["gradient_accumulation_steps"]
        lam = config["diversity_lambda"]
        check_every = 1 if self.device.type != "cuda" else CUDA_FINITE_CHECK_INTERVAL
        scaler = self.scaler

        # Running sums stay on the device so that the loop does not wait for the GPU.
        sums = torch.zeros(5, device=self.device)  # total, prediction, div_expert, div_analyst, correct
        seen = 0
        self.optimizer.zero_grad(set_to_none=True)
        batches = iterate_batches(self.data.train, config["batch_size"], self.shuffle_generator)
        for step, (images, labels) in enumerate(batches, start=1):
            if self._first_step_mark:
                self._write_first_step_mark()
            inputs = self.normalizer(images, self.augment_generator)
            with self.autocast():
                out = model.forward_with_losses(inputs)
                prediction = F.cross_entropy(out.logits.float(), labels)
                loss = prediction + lam * (out.diversity_expert + out.diversity_analyst)

            if step % check_every == 0 and not torch.isfinite(loss).item():
                raise NonFiniteLossError(epoch, step, loss.item())

            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler else scaled).backward()
            if step % accumulation == 0:
                self._optimizer_step(scaler)

            count = labels.shape[0]
            seen += count
            with torch.no_grad():
                correct = (out.logits.argmax(dim=1) == labels).sum()
                sums += torch.stack([loss.detach() * count, prediction.detach() * count,
                                     out.diversity_expert.detach().float() * count,
                                     out.diversity_analyst.detach().float() * count, correct.float()])
            if progress:
                progress(count)

        if step % accumulation != 0:
            self._optimizer_step(scaler)
        totals = (sums / seen).tolist()
        if not all(math.isfinite(v) for v in totals):
            raise NonFiniteLossError(epoch, step, totals[0])
        return {
            "train/loss": totals[0],
            "train/accuracy": totals[4] * 100.0,
            "train/loss_prediction": totals[1],
            "train/loss_diversity_expert": totals[2],
            "train/loss_diversity_analyst": totals[3],
        }

    def _optimizer_step(self, scaler) -> None:
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, split) -> EvalResult:
        """Return mean cross-entropy and accuracy (percent) on a split, in evaluation mode."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for images, labels in iterate_batches(split, self.config["eval_batch_size"]):
            with self.autocast():
                logits = self.model(self.normalizer(images)).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
        count = len(split)
        return EvalResult(loss_sum.item() / count, correct.item() / count * 100.0)

    def epoch_metrics(self, epoch: int, train: Mapping[str, float], lr: float) -> dict[str, float]:
        """Evaluate on validation and test and return the full per-epoch metric dict."""
        val = self.evaluate(self.data.val)
        test = self.evaluate(self.data.test)
        return {
            "epoch": epoch,
            **train,
            "val/loss": val.loss,
            "val/accuracy": val.accuracy,
            "test/loss": test.loss,
            "test/accuracy": test.accuracy,
            "param_efficiency/accuracy_per_100k_params": per_100k(val.accuracy, self.params),
            "param_efficiency/accuracy_per_1m_params": per_1m(val.accuracy, self.params),
            "param_efficiency/test_accuracy_per_100k_params": per_100k(test.accuracy, self.params),
            "model_params": self.params,
            "lr": lr,
        }

    def final_metrics(self, best_epoch: int, best_val_accuracy: float) -> dict[str, float]:
        """Measure the current weights (best or last) and return the final metric dict."""
        val = self.evaluate(self.data.val)
        test = self.evaluate(self.data.test)
        return {
            "final/test_accuracy": test.accuracy,
            "final/test_loss": test.loss,
            "final/param_efficiency": per_100k(test.accuracy, self.params),
            "final/accuracy_per_million_params": per_1m(test.accuracy, self.params),
            "final/val_accuracy": val.accuracy,
            "best_val_accuracy": best_val_accuracy,
            "best_epoch": best_epoch,
            "model_params": self.params,
        }

    def fit(self, on_epoch: Callable[[dict], None] | None = None, on_best: Callable[[dict, int, float], None] | None = None,
            progress_factory: Callable[[int], Any] | None = None) -> TrainResult:
        """Run every epoch; keep the best-validation weights; return the history and final metrics.

        ``on_epoch`` receives each epoch's metrics, ``on_best`` the new best state dict, its epoch
        and validation accuracy, ``progress_factory(epoch)`` returns a callable advanced by the examples done.
        """
        result = TrainResult()
        best_val, best_epoch = -1.0, 0
        started = time.perf_counter()
        for epoch in range(1, self.config["epochs"] + 1):
            lr = learning_rate_at(self.config, epoch - 1)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            progress = progress_factory(epoch) if progress_factory else None
            try:
                train = self.train_epoch(epoch, progress)
            finally:
                if progress is not None and hasattr(progress, "close"):
                    progress.close()
            metrics = self.epoch_metrics(epoch, train, lr)
            result.history.append(metrics)
            if metrics["val/accuracy"] > best_val:
                best_val, best_epoch = metrics["val/accuracy"], epoch
                result.best_state = copy.deepcopy(self.model.state_dict())
                if on_best:
                    on_best(result.best_state, epoch, best_val)
            if on_epoch:
                on_epoch(metrics)
        result.train_seconds = time.perf_counter() - started

        if self.config["final_model"] == "best" and result.best_state is not None:
            self.model.load_state_dict(result.best_state)
        result.final = self.final_metrics(best_epoch, best_val)
        return result
