"""Tasks: what a task distribution hands the meta-learner, and how tasks are indexed and batched.

Every task is addressed by (split, index) and drawn from a generator seeded by that address, so a
task is the same whatever process, worker or resumed run draws it. Training step `s` with meta-batch
`n` uses tasks `s*n ... s*n+n-1`; a DDP rank takes its contiguous slice of them, which is why one
process with meta-batch 2m and two ranks with m each see exactly the same tasks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.data import Dataset

from reptile.config import require

# A task is a dict of tensors. Training tasks use `support_*` for the inner loop and `query_*` for
# an optional held-out tail (FOMAML's separate tail; empty otherwise). Evaluation tasks adapt on
# `support_*` and are scored on `query_*`. `batch_index` [steps, batch] lists, per inner step, the
# support samples in that step's mini-batch.
Task = dict[str, torch.Tensor]
SPLITS = ("train", "val", "test")


class TaskSampler(Protocol):
    """What draws single tasks; every `reptile.data.distribution.TaskDistribution` does."""

    def sample_train_task(self, generator: torch.Generator, tail_size: int) -> Task: ...

    def sample_eval_task(self, split: str, generator: torch.Generator) -> Task: ...


@dataclass(frozen=True)
class InnerSchedule:
    """How the inner loop walks over a task's support set: `steps` mini-batches of `batch_size`."""

    steps: int
    batch_size: int


def task_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A generator for task `index` of `split`, independent of process, worker and call order."""
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def inner_batch_index(
    num_samples: int, schedule: InnerSchedule, generator: torch.Generator
) -> torch.Tensor:
    """Mini-batches drawn without replacement, reshuffled after every pass over the samples.

    As in the reference implementation, a batch may straddle two passes. Returns [steps, batch].
    """
    batch_size = min(schedule.batch_size, num_samples)
    needed = schedule.steps * batch_size
    passes = max(-(-needed // num_samples), 1)
    order = torch.cat([torch.randperm(num_samples, generator=generator) for _ in range(passes)])
    return order[:needed].view(schedule.steps, batch_size)


def with_schedule(task: Task, schedule: InnerSchedule, generator: torch.Generator) -> Task:
    """`task` with its inner mini-batches, drawn by the generator that drew the task."""
    task["batch_index"] = inner_batch_index(len(task["support_targets"]), schedule, generator)
    return task


def collate_tasks(tasks: list[Task]) -> Task:
    return {key: torch.stack([task[key] for task in tasks]) for key in tasks[0]}


class TrainTasks(Dataset):
    """Item `i` is this rank's share of the meta-batch of training step `start_step + i`."""

    def __init__(
        self,
        distribution: TaskSampler,
        schedule: InnerSchedule,
        tail_size: int,
        seed: int,
        tasks_per_step: int,
        rank_offset: int,
        rank_tasks: int,
        start_step: int,
        num_steps: int,
    ) -> None:
        self.distribution = distribution
        self.schedule = schedule
        self.tail_size = tail_size
        self.seed = seed
        self.tasks_per_step = tasks_per_step
        self.rank_offset = rank_offset
        self.rank_tasks = rank_tasks
        self.start_step = start_step
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, item: int) -> Task:
        first = (self.start_step + item) * self.tasks_per_step + self.rank_offset
        return collate_tasks([self.task(first + j) for j in range(self.rank_tasks)])

    def task(self, index: int) -> Task:
        generator = task_generator(self.seed, "train", index)
        task = self.distribution.sample_train_task(generator, self.tail_size)
        return with_schedule(task, self.schedule, generator)


class EvalTasks(Dataset):
    """The fixed, seeded evaluation tasks `indices` of `split` (a rank's shard under DDP)."""

    def __init__(
        self,
        distribution: TaskSampler,
        split: str,
        schedule: InnerSchedule,
        seed: int,
        indices: range,
    ) -> None:
        require(split in SPLITS, "split", split, f"one of {SPLITS}")
        self.distribution = distribution
        self.split = split
        self.schedule = schedule
        self.seed = seed
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> Task:
        generator = task_generator(self.seed, self.split, self.indices[item])
        task = self.distribution.sample_eval_task(self.split, generator)
        return with_schedule(task, self.schedule, generator)
