"""What FOMAML and MAML share: k − 1 inner steps from φ, then a final mini-batch, the "tail".

`inner_steps` = k counts mini-batch gradients per task for every algorithm, so equal k means equal
work: Reptile takes k steps and uses them all; FOMAML and MAML take k − 1 steps and evaluate the
k-th gradient on the tail. The tail is either mini-batch k of the task's schedule, drawn from the
same samples as the earlier ones ("shared tail", `tail_shots: 0`), or the task's held-out
`query_*` samples, `tail_shots` per class that the earlier batches never see ("separate tail").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reptile.algorithms.base import Algorithm
from reptile.algorithms.inner_loop import gather
from reptile.data.tasks import Task


@dataclass(frozen=True)
class TailAlgorithm(Algorithm):
    def tail(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of every task's final mini-batch, [tasks, batch, ...]."""
        if self.tail_shots > 0:
            return task["query_inputs"], task["query_targets"]
        index = task["batch_index"][:, self.inner_steps - 1]
        return gather(task["support_inputs"], index), gather(task["support_targets"], index)
