"""MAML: the true meta-gradient, differentiating the tail loss through the k − 1 inner steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from reptile.algorithms.base import MetaStep
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.optimizers import Params, State
from reptile.algorithms.tail import TailAlgorithm
from reptile.config import require, require_int
from reptile.data.tasks import Task


@dataclass(frozen=True)
class MAML(TailAlgorithm):
    """Meta-gradient inner_lr · ∇_φ mean_i L_tail,i(U_i(φ)), U_i = k − 1 SGD steps on task i.

    Scaled by inner_lr so that it is in the units of Reptile's and FOMAML's (a displacement of the
    weights; FOMAML is this with ∂U/∂φ replaced by the identity), and ε means the same for all
    three. `torch.func.grad` differentiates through the batched inner loop itself (vmap over the
    tasks inside), so the second-order terms come from the very code every algorithm adapts with.
    `task_chunk_size` caps memory: that many tasks are differentiated at a time (0: all at once)
    and their gradients summed.
    """

    task_chunk_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.inner_optimizer == "sgd",
            "inner_optimizer",
            self.inner_optimizer,
            "sgd (MAML differentiates through plain SGD inner steps)",
        )
        require_int("task_chunk_size", self.task_chunk_size, 0)

    def meta_gradient(self, inner: InnerLoop, phi: Params, state: State, task: Task) -> MetaStep:
        tasks = len(task["support_targets"])
        chunk = self.task_chunk_size or tasks

        def tail_loss_sum(phi: Params, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
            adapted, _, losses = self.adapt_before_tail(inner, phi, state, task)
            tail_losses = vmap(inner.task_loss)(adapted, *self.tail(task))
            all_losses = torch.cat([losses, tail_losses.unsqueeze(0)])
            return tail_losses.sum(), all_losses.detach()

        gradient = {name: torch.zeros_like(p) for name, p in phi.items()}
        losses = []
        for start in range(0, tasks, chunk):
            part = {key: value[start : start + chunk] for key, value in task.items()}
            grads, part_losses = grad(tail_loss_sum, has_aux=True)(phi, part)
            for name, g in grads.items():
                gradient[name] += g
            losses.append(part_losses)
        scale = self.inner_lr / tasks
        gradient = {name: scale * g for name, g in gradient.items()}
        return MetaStep(gradient, state, torch.cat(losses, dim=1))
