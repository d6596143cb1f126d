"""Task distributions: what a meta-learner adapts to."""

from reptile.data.distribution import TaskDistribution
from reptile.data.tasks import InnerSchedule, Task

__all__ = ["InnerSchedule", "Task", "TaskDistribution"]
