"""The inner loop: k optimizer steps from φ on every task of a batch at once, and scoring.

Per-task "clones" of the model are batched parameter tensors ([tasks, ...]); the per-task gradient
is `vmap(grad(loss))` over them, or, on the "folded" backend, one autograd pass through a forward
that folds the tasks into batched matrix products and grouped convolutions (algorithms/folded.py).
There is no deep copy and no Python loop over tasks. The loop steps only the parameters it is told
to adapt (all of them, or e.g. ANIL's head); the others ride along unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map_only

from reptile.algorithms.folded import folded_forward
from reptile.algorithms.optimizers import InnerOptimizer, in_functorch_transform
from reptile.algorithms.params import Params, State
from reptile.config import require, require_bool, require_choice
from reptile.data.tasks import Task

BACKENDS = ("auto", "folded", "vmap")
T = TypeVar("T")


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task mean squared error, outputs and targets [tasks, queries, ...]."""
    return (outputs - targets).square().flatten(1).mean(1)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task accuracy, logits [tasks, queries, classes] and labels [tasks, queries]."""
    return (outputs.argmax(-1) == targets).float().mean(1)


@dataclass(frozen=True)
class Objective:
    """What the inner loop minimises, how an adapted task is scored, what a prediction is."""

    loss: Callable[..., torch.Tensor]  # (outputs, targets, reduction="mean") → loss
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # → per-task score [tasks]
    prediction: Callable[[torch.Tensor], torch.Tensor]  # outputs → outputs or class indices


# A dataset's `loss` names its objective.
OBJECTIVES = {
    "mse": Objective(F.mse_loss, squared_error, lambda outputs: outputs),
    "cross_entropy": Objective(F.cross_entropy, accuracy, lambda outputs: outputs.argmax(-1)),
}


def gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values [tasks, samples, ...], index [tasks, batch] → [tasks, batch, ...]."""
    tasks = torch.arange(len(index), device=index.device).unsqueeze(-1)
    return values[tasks, index]


class InnerLoop:
    """Adapts batched parameters with `optimizer` on the mini-batches a task's schedule lists.

    `adapted`: the names of the parameters the optimizer steps (None: all of the model's); the
    others keep their values, and `optimizer` state exists for the adapted ones only.

    `backend`: "folded" computes the per-task gradients with the folded forward, "vmap" with
    `vmap(grad)`; "auto" folds whenever the model's layers allow it. Both give the same results to
    float rounding; folding is faster on CPU (benchmarks/). Inside a `torch.func` transform (MAML
    differentiating through the inner loop) it is always vmap, which composes with them.

    `compile`: `compiled(fn)` runs `fn` through `torch.compile` (the algorithm's meta-step: all
    k steps of all tasks and the meta-gradient as one graph, on a GPU replayed as a CUDA graph).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str,
        optimizer: InnerOptimizer,
        backend: str = "auto",
        compile: bool = False,
        adapted: Sequence[str] | None = None,
    ) -> None:
        require_choice("backend", backend, BACKENDS)
        require_bool("compile", compile)
        self.model = model
        self.objective = OBJECTIVES[loss]
        self.optimizer = optimizer
        names = [name for name, _ in model.named_parameters()]
        self.adapted = tuple(names if adapted is None else adapted)
        self.vmap_grad = vmap(self.single_task_grad, in_dims=(0, 0, 0, None))
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
        self.compile = compile
        self.compiled_functions: dict[Callable, Callable] = {}  # built on first use

    def forward(self, params: Params, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (inputs,))

    def task_loss(
        self, params: Params, inputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return self.objective.loss(self.forward(params, inputs), targets)

    def single_task_grad(
        self, params: Params, inputs: torch.Tensor, targets: torch.Tensor, names: Sequence[str]
    ) -> tuple[Params, torch.Tensor]:
        """One task's gradient of its loss with respect to `names`, and the loss (no task dim)."""

        def loss_of(variables: Params) -> torch.Tensor:
            return self.task_loss({**params, **variables}, inputs, targets)

        return grad_and_value(loss_of)({name: params[name] for name in names})

    def task_grad(
        self,
        params: Params,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        names: Sequence[str] | None = None,
    ) -> tuple[Params, torch.Tensor]:
        """Per-task gradients with respect to `names` (default: the adapted parameters) and the
        losses [tasks], for inputs [tasks, batch, ...]."""
        names = self.adapted if names is None else tuple(names)
        if self.folded is None or in_functorch_transform():
            return self.vmap_grad(params, inputs, targets, names)
        with torch.enable_grad():
            leaves = {name: params[name].detach().requires_grad_() for name in names}
            outputs = self.folded({**params, **leaves}, inputs)
            losses = self.objective.loss(
                outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none"
            )
            losses = losses.view(len(outputs), -1).mean(1)
            # No value mixes two tasks, so the gradient of the sum is each task's own gradient.
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), losses.detach()

    def init_state(self, params: Params) -> State:
        """A fresh optimizer state for the adapted parameters among `params`."""
        return self.optimizer.init({name: params[name] for name in self.adapted})

    def optimizer_step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        """One optimizer step on the adapted parameters; the others are returned unchanged."""
        stepped, state = self.optimizer.step({name: params[name] for name in grads}, grads, state)
        return {**params, **stepped}, state

    def step(
        self, params: Params, state: State, task: Task, step: int
    ) -> tuple[Params, State, torch.Tensor]:
        """One optimizer step on mini-batch `step` of every task; returns the per-task losses."""
        index = task["batch_index"][:, step]
        inputs = gather(task["support_inputs"], index)
        targets = gather(task["support_targets"], index)
        grads, losses = self.task_grad(params, inputs, targets)
        params, state = self.optimizer_step(params, grads, state)
        return params, state, losses

    def adapt(
        self, params: Params, state: State, task: Task, steps: int
    ) -> tuple[Params, State, torch.Tensor]:
        """`steps` optimizer steps: the adapted parameters, the state, losses [steps, tasks]."""
        losses = []
        for step in range(steps):
            params, state, step_losses = self.step(params, state, task, step)
            losses.append(step_losses)
        return params, state, torch.stack(losses)

    def compiled(self, function: Callable[..., T]) -> Callable[..., T]:
        """`function` itself, or with `compile` its compiled form: the tensors of its arguments
        are marked static, and on a GPU the graph is captured as a CUDA graph and replayed (at
        these sizes a meta-iteration is bound by launching kernels, not by running them)."""
        if not self.compile:
            return function
        key = getattr(function, "__func__", function)
        if key not in self.compiled_functions:
            cuda = next(self.model.parameters()).device.type == "cuda"
            self.compiled_functions[key] = torch.compile(
                key, mode="reduce-overhead" if cuda else None
            )
        compiled, owner = self.compiled_functions[key], getattr(function, "__self__", None)

        def run(*args: Any) -> T:
            tree_map_only(torch.Tensor, torch._dynamo.mark_static, args)
            return compiled(*args) if owner is None else compiled(owner, *args)

        return run

    def predict(
        self, params: Params, support: torch.Tensor, query: torch.Tensor, transductive: bool
    ) -> torch.Tensor:
        """Outputs for `query` [tasks, queries, ...] from per-task parameters.

        Transductive: all queries of a task in one batch. Otherwise each query is passed together
        with the task's support set and only its own output is kept.
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

    def activation_bytes(self, inputs: torch.Tensor) -> tuple[int, int]:
        """Bytes of the outputs of the model's layers per sample of `inputs`' shape: all layers
        together (what a backward pass keeps) and the largest one."""
        sizes: list[int] = []

        def record(module: nn.Module, args: object, output: torch.Tensor) -> None:
            sizes.append(output.numel() * output.element_size() // 2)

        leaves = [m for m in self.model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(record) for m in leaves]
        try:
            with torch.no_grad():  # two samples: batch norm needs more than one value
                self.model(inputs[:1].expand(2, *inputs.shape[1:]))
        finally:
            for hook in hooks:
                hook.remove()
        return sum(sizes), max(sizes)

    def evaluation_bytes(self, task: Task, batch_size: int, non_transductive: bool) -> int:
        """Memory one task takes to adapt (activations kept for the backward and their gradients,
        for a mini-batch of `batch_size`) or to be scored (queries alone, or each query with the
        whole support set), whichever is more."""
        total, largest = self.activation_bytes(task["support_inputs"][0])
        support, queries = task["support_inputs"].shape[1], task["query_inputs"].shape[1]
        adapting = 3 * min(batch_size, support) * total
        scored = queries * (support + 1 if non_transductive and self.couples_batch else 1)
        # Without autograd only a few layers' outputs are alive at once, but vmap's batched
        # convolutions keep copies of their own: 4 layers' worth is what the benchmark's
        # evaluation-memory table measured (Omniglot 20-way: 2.1× the budget with 2).
        return max(adapting, 4 * scored * largest)

    def score(self, params: Params, task: Task, transductive: bool) -> torch.Tensor:
        """Per-task scores [tasks] of the adapted `params` on the task's queries."""
        outputs = self.predict(params, task["support_inputs"], task["query_inputs"], transductive)
        return self.objective.score(outputs, task["query_targets"])
