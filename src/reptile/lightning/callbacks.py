"""Callbacks: run outputs (results.json, the adaptation plot) and crash-safe checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from reptile.data.tasks import collate_tasks


def write_atomically(path: Path, write: Any) -> None:
    """Write through a temporary file and rename it into place: a reader, or a run killed
    mid-write, sees the old file or the new one, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a failed write leaves no partial file behind
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        write_atomically(Path(path), lambda handle: torch.save(checkpoint, handle))


class ResultsWriter(pl.Callback):
    """Writes the final test metrics, under their logged names, to a JSON file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results = {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("test/")
        }
        text = json.dumps(results, indent=2) + "\n"
        write_atomically(self.path, lambda handle: handle.write(text.encode()))


class AdaptationPlot(pl.Callback):
    """After testing, plots predictions on a few test tasks before and after adaptation."""

    def __init__(self, path: str, num_tasks: int = 4) -> None:
        self.path = Path(path)
        self.num_tasks = num_tasks

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        tasks = datamodule.eval_tasks("test")
        task = collate_tasks([tasks[i] for i in range(min(self.num_tasks, len(tasks)))])
        task = {key: value.to(pl_module.device) for key, value in task.items()}
        last = pl_module.algorithm.eval_inner_steps
        with torch.no_grad():
            params = pl_module.adapted_params(task, sorted({0, min(1, last), last}))
            predictions = {steps: pl_module.predict(p, task) for steps, p in params.items()}
        if not datamodule.plot_adaptation(predictions, task, self.path):
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="test/adaptation", images=[str(self.path)])
