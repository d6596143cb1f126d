"""The Lightning side of a task distribution: its meta-batches and evaluation tasks as this rank's
DataLoaders."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from reptile.cli import init_data_worker
from reptile.data.distribution import TaskDistribution
from reptile.data.tasks import EvalTasks, collate_tasks


class TaskDataModule(pl.LightningDataModule):
    """`tasks` for a Trainer: loaded once per process, sharded by the trainer's rank."""

    def __init__(self, tasks: TaskDistribution) -> None:
        super().__init__()
        self.tasks = tasks

    def prepare_data(self) -> None:
        # Builds a cache (or downloads) once, before the other processes of a run load it.
        self.tasks.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.tasks.prepare()

    def _placement(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def eval_tasks(self, split: str) -> EvalTasks:
        return self.tasks.eval_tasks(split, *self._placement())

    def _loader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        workers = self.tasks.num_workers
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            dataset,
            num_workers=workers,
            persistent_workers=workers > 0,
            # Lightning copies batches to a GPU with non_blocking=True, which only overlaps the
            # step's kernels when the batch is in pinned memory.
            pin_memory=on_cuda,
            worker_init_fn=init_data_worker,  # workers outlive SIGTERM: the run stops them
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        # Resuming starts at the restored global step: tasks are addressed by step, so the resumed
        # run sees exactly the tasks the uninterrupted run would have seen.
        start = self.trainer.global_step
        steps = max(self.trainer.max_steps - start, 0)
        tasks = self.tasks.train_tasks(start, steps, *self._placement())
        return self._loader(tasks, batch_size=None)

    def _eval_loader(self, split: str) -> DataLoader:
        batch = self.tasks.eval_batch_tasks
        return self._loader(self.eval_tasks(split), batch_size=batch, collate_fn=collate_tasks)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
