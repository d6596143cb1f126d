"""Throughput as metrics: meta-iterations per second while training, tasks per second while
evaluating, measured end to end (data loading, logging and checkpoints included)."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # count the queued kernels in the interval that ran them
    return time.perf_counter()


class Speed(pl.Callback):
    """Logs `speed/meta_iterations_per_s` over every `trainer.log_every_n_steps` meta-iterations
    (time spent validating is not counted) and `speed/val_tasks_per_s`, `speed/test_tasks_per_s`
    per evaluation. Under `speed/`, not `test/`: results.json keeps only what the seed decides."""

    def __init__(self) -> None:
        self.started: float | None = None  # of the current interval
        self.steps = 0  # meta-iterations in it
        self.paused = 0.0  # seconds of it spent evaluating
        self.evaluating: dict[str, Any] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        if self.started is None:
            self.started, self.steps, self.paused = now(pl_module.device), 0, 0.0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        self.steps += 1
        if self.steps < trainer.log_every_n_steps:
            return
        seconds = now(pl_module.device) - self.started - self.paused
        pl_module.log("speed/meta_iterations_per_s", self.steps / seconds)
        self.started = None

    def start_evaluation(self, pl_module: pl.LightningModule) -> None:
        self.evaluating = {"started": now(pl_module.device), "tasks": 0}

    def count(self, batch: Any) -> None:
        self.evaluating["tasks"] += len(batch["support_targets"])

    def end_evaluation(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        seconds = now(pl_module.device) - self.evaluating["started"]
        if self.started is not None:
            self.paused += seconds
        tasks = self.evaluating["tasks"] * trainer.world_size  # each rank scores its share
        pl_module.log(f"speed/{stage}_tasks_per_s", tasks / seconds)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_evaluation(pl_module)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        self.count(batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_evaluation(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_evaluation(pl_module)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        self.count(batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end_evaluation(trainer, pl_module, "test")
