"""The inner loop: k optimizer steps from φ on every task of a batch at once.

Per-task "clones" of the model are batched parameter tensors ([tasks, ...]); the per-task gradient
is `vmap(grad(loss))` over them, or, on the "folded" backend, one autograd pass through a forward
that folds the tasks into batched matrix products and grouped convolutions (algorithms/folded.py).
There is no deep copy and no Python loop over tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map_only

from reptile.algorithms.folded import folded_forward
from reptile.algorithms.optimizers import InnerOptimizer, Params, State, in_functorch_transform
from reptile.config import require, require_choice
from reptile.data.tasks import Task

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss,
    "cross_entropy": F.cross_entropy,
}
BACKENDS = ("auto", "folded", "vmap")


def broadcast(tree: State | Params, tasks: int) -> State | Params:
    """One copy per task of every tensor in `tree` (a view: no memory until written)."""
    return tree_map_only(torch.Tensor, lambda t: t.expand(tasks, *t.shape), tree)


def task_mean(tree: State | Params) -> State | Params:
    return tree_map_only(torch.Tensor, lambda t: t.mean(0), tree)


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [tasks, samples, ...], index [tasks, batch] → [tasks, batch, ...]."""
    tasks = torch.arange(len(index), device=index.device).unsqueeze(-1)
    return values[tasks, index]


class InnerLoop:
    """Adapts batched parameters with `optimizer` on the mini-batches a task's schedule lists.

    `backend`: "folded" computes the per-task gradients with the folded forward, "vmap" with
    `vmap(grad)`; "auto" folds whenever the model's layers allow it. Both give the same results to
    float rounding; folding is faster on CPU (benchmarks/). Inside a `torch.func` transform (MAML
    differentiating through the inner loop) it is always vmap, which composes with them.

    `compile`: run `adapt` through `torch.compile`, all k steps as one graph (opt-in: the first
    meta-iteration compiles for a minute or more without a warm inductor cache). Worth it where
    the per-op dispatch dominates (small models such as the sine MLP; benchmarks/). Evaluation
    (`step`) stays uncompiled; MAML, which differentiates through its own loop, refuses it.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str,
        optimizer: InnerOptimizer,
        backend: str = "auto",
        compile: bool = False,
    ) -> None:
        require_choice("backend", backend, BACKENDS)
        require(isinstance(compile, bool), "compile", compile, "true or false")
        self.model = model
        self.loss = LOSSES[loss]
        self.optimizer = optimizer
        self.vmap_grad = vmap(grad_and_value(self.task_loss))
        self.folded = None if backend == "vmap" else folded_forward(model)
        require(
            backend != "folded" or self.folded is not None,
            "backend",
            backend,
            "auto or vmap for this model (folding supports Linear, Conv2d, BatchNorm2d without "
            "running statistics, MaxPool2d, ZeroPad2d, activations and flatten)",
        )
        # Batch norm on batch statistics couples the samples of a batch: only then does scoring
        # each query beside the support set differ from scoring all queries at once.
        self.couples_batch = any(isinstance(m, _BatchNorm) for m in model.modules())
        # Not dynamic=False: that would specialise on Adam's step count, which grows every
        # meta-iteration when the state is carried, and recompile each time. Instead the tensors
        # are marked static (one graph per shape) and only that integer becomes symbolic after
        # its first change: at most two graphs per shape and k.
        self.compiled_adapt = torch.compile(self.adapt_eagerly) if compile else None

    def forward(self, params: Params, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (inputs,))

    def task_loss(
        self, params: Params, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return self.loss(self.forward(params, inputs), targets)

    def task_grad(
        self, params: Params, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[Params, torch.Tensor]:
        """Per-task gradients of the loss and the losses [tasks], for inputs [tasks, batch, ...]."""
        if self.folded is None or in_functorch_transform():
            return self.vmap_grad(params, inputs, targets)
        with torch.enable_grad():
            leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
            outputs = self.folded(leaves, inputs)
            losses = self.loss(outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none")
            losses = losses.view(len(outputs), -1).mean(1)
            # No value mixes two tasks, so the gradient of the sum is each task's own gradient.
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), losses.detach()

    def step(
        self, params: Params, state: State, task: Task, step: int
    ) -> tuple[Params, State, torch.Tensor]:
        """One optimizer step on mini-batch `step` of every task; returns the per-task losses."""
        index = task["batch_index"][:, step]
        inputs = gather(task["support_inputs"], index)
        targets = gather(task["support_targets"], index)
        grads, losses = self.task_grad(params, inputs, targets)
        params, state = self.optimizer.step(params, grads, state)
        return params, state, losses

    def adapt(
        self, params: Params, state: State, task: Task, steps: int
    ) -> tuple[Params, State, torch.Tensor]:
        """`steps` optimizer steps: the adapted parameters, the state, losses [steps, tasks]."""
        if self.compiled_adapt is None:
            return self.adapt_eagerly(params, state, task, steps)
        tree_map_only(torch.Tensor, torch._dynamo.mark_static, (params, state, task))
        return self.compiled_adapt(params, state, task, steps)

    def adapt_eagerly(
        self, params: Params, state: State, task: Task, steps: int
    ) -> tuple[Params, State, torch.Tensor]:
        losses = []
        for step in range(steps):
            params, state, step_losses = self.step(params, state, task, step)
            losses.append(step_losses)
        return params, state, torch.stack(losses)

    def predict(
        self, params: Params, support: torch.Tensor, query: torch.Tensor, transductive: bool
    ) -> torch.Tensor:
        """Predictions for `query` [tasks, queries, ...] from per-task parameters.

        Transductive: all queries of a task in one batch. Otherwise each query is passed together
        with the task's support set and only its own prediction is kept.
        """
        if transductive or not self.couples_batch:
            if self.folded is not None:
                return self.folded(params, query)
            return vmap(self.forward)(params, query)

        def one_query(
            task_params: Params, task_support: torch.Tensor, sample: torch.Tensor
        ) -> torch.Tensor:
            return self.forward(task_params, torch.cat([task_support, sample.unsqueeze(0)]))[-1]

        per_task = vmap(one_query, in_dims=(None, None, 0))
        return vmap(per_task)(params, support, query)
