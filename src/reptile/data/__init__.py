"""Task distributions: what a meta-learner adapts to."""

from reptile.data.datamodule import TaskDataModule
from reptile.data.tasks import InnerSchedule, Task

__all__ = ["InnerSchedule", "Task", "TaskDataModule"]
