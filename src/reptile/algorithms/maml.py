"""MAML: the true meta-gradient, differentiating the tail loss through the k − 1 inner steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, grad_and_value, vmap

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
    three. The tasks are vectorised as `vmap(grad(one task's tail loss))`; `task_chunk_size` caps
    memory by differentiating that many tasks at a time (0: the whole meta-batch at once).
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
        require(
            not self.compile,
            "compile",
            self.compile,
            "false (MAML differentiates through its own uncompiled inner loop)",
        )

    def meta_gradient(self, inner: InnerLoop, phi: Params, state: State, task: Task) -> MetaStep:
        step_grad = grad_and_value(inner.task_loss)

        def tail_loss(phi: Params, one: Task) -> tuple[torch.Tensor, torch.Tensor]:
            """One task: its k − 1 steps from φ, then the tail loss (and all losses, as aux).

            The steps take gradients of the unbatched `task_loss` and the tasks are vmapped
            outside the grad: differentiating through the inner loop's own vmap(grad(...)) gives
            silently wrong second derivatives of batch norm (torch 2.13; the finite-difference
            test catches it), while grad(vmap-free grad) is exact.
            """
            params, losses = phi, []
            for step in range(self.inner_steps - 1):
                index = one["batch_index"][step]
                grads, loss = step_grad(
                    params, one["support_inputs"][index], one["support_targets"][index]
                )
                params, _ = inner.optimizer.step(params, grads, state)
                losses.append(loss)
            inputs, targets = self.tail({key: value.unsqueeze(0) for key, value in one.items()})
            loss = inner.task_loss(params, inputs[0], targets[0])
            return loss, torch.stack([*losses, loss]).detach()

        per_task = vmap(
            grad(tail_loss, has_aux=True),
            in_dims=(None, 0),
            chunk_size=self.task_chunk_size or None,
        )
        grads, losses = per_task(phi, task)
        gradient = {name: self.inner_lr * g.mean(0) for name, g in grads.items()}
        return MetaStep(gradient, state, losses.T)
