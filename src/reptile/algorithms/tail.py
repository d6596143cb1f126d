"""What FOMAML, MAML, ANIL and Meta-SGD share: k − 1 inner steps from φ, then a final mini-batch,
the "tail", whose loss the meta-gradient descends, to first order or through the inner loop.

`inner_steps` = k counts mini-batch gradients per task for every algorithm, so equal k means equal
work: Reptile takes k steps and uses them all; these take k − 1 steps and evaluate the k-th
gradient on the tail. The tail is either mini-batch k of the task's schedule, drawn from the same
samples as the earlier ones ("shared tail", `tail_shots: 0`), or the task's held-out `query_*`
samples, `tail_shots` per class that the earlier batches never see ("separate tail").

Every meta-gradient is in weight units, inner_lr · ∇L_tail (or the k-th inner step itself), so
that ε means the same for all algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.func import grad, vmap

from reptile.algorithms.base import Algorithm, MetaStep
from reptile.algorithms.inner_loop import InnerLoop, gather
from reptile.algorithms.params import MetaParams, Params, State, broadcast
from reptile.config import require, require_int
from reptile.data.tasks import Task


class TailResult(NamedTuple):
    """Where k − 1 inner steps led, and the tail's gradient there."""

    params: Params  # W_k−1, per task
    state: State
    losses: torch.Tensor  # [k − 1, tasks]
    tail_grads: Params  # ∇L_tail(W_k−1) for every parameter, adapted or not
    tail_losses: torch.Tensor  # [tasks]

    def all_losses(self) -> torch.Tensor:
        return torch.cat([self.losses, self.tail_losses.unsqueeze(0)])


@dataclass(frozen=True)
class TailAlgorithm(Algorithm):
    def tail(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of every task's final mini-batch, [tasks, batch, ...]."""
        if self.tail_shots > 0:
            return task["query_inputs"], task["query_targets"]
        index = task["batch_index"][:, self.inner_steps - 1]
        return gather(task["support_inputs"], index), gather(task["support_targets"], index)

    def to_tail(self, inner: InnerLoop, phi: Params, state: State, task: Task) -> TailResult:
        """The k − 1 inner steps from φ, and the tail's gradient at W_k−1."""
        tasks = len(task["support_targets"])
        params = broadcast(phi, tasks)
        losses = next(iter(phi.values())).new_empty(0, tasks)  # k = 1: the tail is at φ
        if self.inner_steps > 1:
            params, state, losses = inner.adapt(params, state, task, self.inner_steps - 1)
        tail_grads, tail_losses = inner.task_grad(params, *self.tail(task), names=list(phi))
        return TailResult(params, state, losses, tail_grads, tail_losses)

    def first_order_gradient(
        self, inner: InnerLoop, meta: MetaParams, state: State, task: Task
    ) -> MetaStep:
        """FOMAML's rule: mean_i(W_i,k−1 − W_i,k), the k-th inner step, taken on the tail, for
        the adapted parameters (inner_lr · ∇L_tail(W_k−1) with SGD; Adam's step, from the carried
        moments, with Adam, as in the reference implementation); inner_lr · ∇L_tail(W_k−1) for
        the parameters the inner loop does not adapt."""
        reached = self.to_tail(inner, meta["phi"], state, task)
        adapted_grads = {name: reached.tail_grads[name] for name in inner.adapted}
        stepped, state = inner.optimizer_step(reached.params, adapted_grads, reached.state)
        gradient = {
            name: (value - stepped[name]).mean(0)
            if name in adapted_grads
            else self.inner_lr * reached.tail_grads[name].mean(0)
            for name, value in reached.params.items()
        }
        return MetaStep({"phi": gradient}, state, reached.all_losses())


@dataclass(frozen=True)
class SecondOrderTail(TailAlgorithm):
    """A tail algorithm that can differentiate its tail loss through the inner loop."""

    # Tasks differentiated at a time (caps memory); 0 = the whole meta-batch.
    task_chunk_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("task_chunk_size", self.task_chunk_size, 0)

    def check_second_order(self) -> None:
        """Differentiating through the inner loop needs plain SGD steps, uncompiled."""
        name = type(self).__name__
        require(
            self.inner_optimizer == "sgd",
            "inner_optimizer",
            self.inner_optimizer,
            f"sgd ({name} differentiates through plain SGD inner steps)",
        )
        require(
            not self.compile,
            "compile",
            self.compile,
            f"false ({name} differentiates through its own uncompiled inner loop)",
        )

    def second_order_gradient(
        self, inner: InnerLoop, meta: MetaParams, state: State, task: Task
    ) -> MetaStep:
        """inner_lr · ∇_meta mean_i L_tail,i(U_i(meta)), U_i = k − 1 SGD steps on task i,
        differentiated through the steps with torch.func, for every meta-parameter (φ and the
        algorithm's own). `state` is not used: the steps start from `learned_state(meta)`."""

        def tail_loss(meta: MetaParams, one: Task) -> tuple[torch.Tensor, torch.Tensor]:
            """One task: its k − 1 steps, then the tail loss (and all losses, as aux).

            The steps take gradients of the unbatched task loss and the tasks are vmapped
            outside the grad: differentiating through the inner loop's own vmap(grad(...)) gives
            silently wrong second derivatives of batch norm (torch 2.13; the finite-difference
            test catches it), while grad(vmap-free grad) is exact.
            """
            params = meta["phi"]
            state = {**inner.init_state(params), **self.learned_state(meta)}
            losses = []
            for step in range(self.inner_steps - 1):
                index = one["batch_index"][step]
                grads, loss = inner.single_task_grad(
                    params,
                    one["support_inputs"][index],
                    one["support_targets"][index],
                    inner.adapted,
                )
                params, state = inner.optimizer_step(params, grads, state)
                losses.append(loss)
            inputs, targets = self.tail({key: value.unsqueeze(0) for key, value in one.items()})
            loss = inner.task_loss(params, inputs[0], targets[0])
            return loss, torch.stack([*losses, loss]).detach()

        per_task = vmap(
            grad(tail_loss, has_aux=True),
            in_dims=(None, 0),
            chunk_size=self.task_chunk_size or None,
        )
        grads, losses = per_task(meta, task)
        gradient = {
            group: {name: self.inner_lr * g.mean(0) for name, g in values.items()}
            for group, values in grads.items()
        }
        return MetaStep(gradient, state, losses.T)
