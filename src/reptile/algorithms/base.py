"""What every algorithm shares: the inner loop's settings, the outer step's, and evaluation's.

An algorithm is the rule that turns inner-loop results into a meta-gradient: a subclass implements
`meta_gradient` and nothing else. The outer optimizer then steps φ with that gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch

from reptile.algorithms.inner_loop import BACKENDS, InnerLoop, broadcast
from reptile.algorithms.optimizers import SGD, Adam, InnerOptimizer, Params, State
from reptile.config import require, require_choice, require_int, require_positive
from reptile.data.tasks import InnerSchedule, Task

INNER_OPTIMIZERS = ("sgd", "adam")
INNER_STATES = ("carry", "sequential", "reset")
EVAL_INNER_STATES = ("trained", "fresh")
OUTER_OPTIMIZERS = ("sgd", "adam")


class MetaStep(NamedTuple):
    gradient: Params  # averaged over this process's tasks
    state: State  # inner-optimizer state after the step, one per task
    losses: torch.Tensor  # inner-loop losses [steps, tasks]


@dataclass(frozen=True)
class Algorithm(ABC):
    """Hyperparameters, under the names users override (`algorithm.inner_steps=10`)."""

    inner_steps: int = 5  # k
    inner_batch_size: int = 10
    inner_lr: float = 1e-3
    inner_optimizer: str = "adam"
    inner_betas: tuple[float, float] = (0.0, 0.999)  # Adam's; the reference uses beta1 = 0
    # "carry": Adam's moments persist across training tasks: the tasks of a meta-batch start
    # from the shared moments, which then become their mean (vectorised across tasks);
    # "sequential": they persist from task to task, as in the reference implementation, which
    # adapts a meta-batch's tasks one after another (each DDP rank chains its share, and the
    # ranks' final moments are averaged); "reset": every task starts from fresh moments.
    inner_state: str = "carry"
    # Where each evaluation task's inner optimizer starts: "trained", from the state training
    # carried (as the reference does: it saves the moments and restores them after every task;
    # fresh when nothing was carried), or "fresh" (zero moments).
    eval_inner_state: str = "trained"
    meta_lr: float = 1.0  # ε at the first meta-iteration
    meta_lr_final: float = 0.0  # ε at the last one, linearly annealed
    outer_optimizer: str = "sgd"  # sgd with lr ε is the plain Reptile interpolation
    outer_betas: tuple[float, float] = (0.9, 0.999)
    eval_inner_steps: int = 50
    eval_batch_size: int = 5
    transductive: bool = False
    tail_shots: int = 0  # held-out samples per class for a separate final mini-batch
    # How the inner loop computes per-task gradients (InnerLoop): auto, folded or vmap.
    backend: str = "auto"
    # torch.compile the k-step inner loop of training (InnerLoop): faster on small models, after
    # a cold compile of a minute or more on the first meta-iteration.
    compile: bool = False

    def __post_init__(self) -> None:
        require_int("inner_steps", self.inner_steps, 1)
        require_int("inner_batch_size", self.inner_batch_size, 1)
        require_positive("inner_lr", self.inner_lr)
        require_choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        require_choice("inner_state", self.inner_state, INNER_STATES)
        require_choice("eval_inner_state", self.eval_inner_state, EVAL_INNER_STATES)
        require_positive("meta_lr", self.meta_lr)
        number = isinstance(self.meta_lr_final, (int, float)) and not isinstance(
            self.meta_lr_final, bool
        )
        require(
            number and 0 <= self.meta_lr_final < float("inf"),
            "meta_lr_final",
            self.meta_lr_final,
            "a finite number >= 0",
        )
        require_choice("outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        for key in ("inner_betas", "outer_betas"):
            betas = getattr(self, key)
            valid = len(betas) == 2 and all(0 <= b < 1 for b in betas)
            require(valid, key, list(betas), "two numbers in [0, 1)")
        require_int("eval_inner_steps", self.eval_inner_steps, 0)
        require_int("eval_batch_size", self.eval_batch_size, 1)
        require(
            isinstance(self.transductive, bool), "transductive", self.transductive, "true or false"
        )
        require_int("tail_shots", self.tail_shots, 0)
        require_choice("backend", self.backend, BACKENDS)
        require(isinstance(self.compile, bool), "compile", self.compile, "true or false")

    @property
    def train_schedule(self) -> InnerSchedule:
        return InnerSchedule(self.inner_steps, self.inner_batch_size)

    @property
    def eval_schedule(self) -> InnerSchedule:
        return InnerSchedule(max(self.eval_inner_steps, 1), self.eval_batch_size)

    def make_inner_optimizer(self) -> InnerOptimizer:
        if self.inner_optimizer == "adam":
            return Adam(self.inner_lr, tuple(self.inner_betas))
        return SGD(self.inner_lr)

    def make_outer_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.outer_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.meta_lr, betas=tuple(self.outer_betas))
        return torch.optim.SGD(params, lr=self.meta_lr)

    def meta_lr_at(self, fraction_done: float) -> float:
        """ε after `fraction_done` of training: linear from `meta_lr` to `meta_lr_final`."""
        return (1 - fraction_done) * self.meta_lr + fraction_done * self.meta_lr_final

    @abstractmethod
    def meta_gradient(self, inner: InnerLoop, phi: Params, state: State, task: Task) -> MetaStep:
        """The direction the outer optimizer descends, from the tasks of `task` (a meta-batch)."""


def clones(phi: Params, tasks: int) -> Params:
    """One copy of φ per task, as batched parameter tensors."""
    return broadcast(phi, tasks)
