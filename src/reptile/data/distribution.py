"""The base of every task distribution: its settings, meta-batches to train on, fixed tasks to
score. Lightning-free, so that a run's values are checked before Lightning is imported; the
Lightning side is `reptile.lightning.datamodule`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from reptile.config import require, require_int
from reptile.data.tasks import EvalTasks, InnerSchedule, Task, TrainTasks


class TaskDistribution(ABC):
    """Base of every dataset: a subclass says how to draw one task; this class does the rest.

    `meta_batch_size` is global: the number of tasks per meta-iteration, split evenly across DDP
    ranks (it must be divisible by the number of devices). Evaluation tasks are sharded across
    ranks and their scores gathered by the metrics. `eval_batch_tasks` and `num_workers` are how
    the run's DataLoaders batch and draw them.
    """

    loss: str  # "mse" or "cross_entropy": what the inner loop minimises
    # Names of the logged scores of the unadapted and the adapted model (None: not reported).
    score_before: str | None
    score_after: str
    # One sample's input shape and the outputs a model gives per sample, known without loading any
    # data: the run checks its model against them (None: not known, not checked).
    input_shape: tuple[int, ...] | None = None
    num_outputs: int | None = None

    def __init__(
        self,
        meta_batch_size: int = 5,
        train_schedule: InnerSchedule = InnerSchedule(steps=5, batch_size=10),  # noqa: B008
        eval_schedule: InnerSchedule = InnerSchedule(steps=50, batch_size=5),  # noqa: B008
        tail_size: int = 0,
        num_val_tasks: int = 100,
        num_test_tasks: int = 1000,
        eval_batch_tasks: int = 100,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        require_int("meta_batch_size", meta_batch_size, 1)
        require_int("tail_size", tail_size, 0)
        require_int("num_val_tasks", num_val_tasks, 0)
        require_int("num_test_tasks", num_test_tasks, 1)
        require_int("eval_batch_tasks", eval_batch_tasks, 1)
        require_int("num_workers", num_workers, 0)
        require_int("seed", seed, 0)
        self.meta_batch_size = meta_batch_size
        self.train_schedule = train_schedule
        self.eval_schedule = eval_schedule
        self.tail_size = tail_size
        self.num_eval_tasks = {"val": num_val_tasks, "test": num_test_tasks}
        self.eval_batch_tasks = eval_batch_tasks
        self.num_workers = num_workers
        self.seed = seed

    @abstractmethod
    def sample_train_task(self, generator: torch.Generator, tail_size: int) -> Task:
        """Support samples for the inner loop plus `tail_size` held-out query samples."""

    @abstractmethod
    def sample_eval_task(self, split: str, generator: torch.Generator) -> Task:
        """Support samples to adapt on and query samples to score."""

    def prepare(self) -> None:
        """Loads what sampling needs (files, caches) in the process that will sample; called
        before every loader is made, so a second call must do nothing."""
        return None  # nothing, for a distribution drawn from formulas

    def plot_adaptation(self, predictions: dict[str, torch.Tensor], task: Task, path: Path) -> bool:
        """Draw the predictions of a few adapted models on `task`; False if not supported."""
        return False

    def train_tasks(
        self, start_step: int, num_steps: int, rank: int = 0, world_size: int = 1
    ) -> TrainTasks:
        """The meta-batches of steps `start_step` ... +`num_steps`: rank `rank`'s share of each."""
        self.prepare()  # here at the latest: DataLoader workers then inherit what it loaded
        require(
            self.meta_batch_size % world_size == 0,
            "meta_batch_size",
            self.meta_batch_size,
            f"a multiple of the number of devices ({world_size})",
        )
        rank_tasks = self.meta_batch_size // world_size
        return TrainTasks(
            self,
            self.train_schedule,
            self.tail_size,
            self.seed,
            tasks_per_step=self.meta_batch_size,
            rank_offset=rank * rank_tasks,
            rank_tasks=rank_tasks,
            start_step=start_step,
            num_steps=num_steps,
        )

    def eval_tasks(self, split: str, rank: int = 0, world_size: int = 1) -> EvalTasks:
        """The fixed tasks of `split` ("val" or "test"), every `world_size`-th from `rank`."""
        self.prepare()
        indices = range(rank, self.num_eval_tasks[split], world_size)
        return EvalTasks(self, split, self.eval_schedule, self.seed, indices)
