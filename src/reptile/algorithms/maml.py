"""MAML: the true meta-gradient, differentiating the tail loss through the k − 1 inner steps."""

from __future__ import annotations

from dataclasses import dataclass

from reptile.algorithms.base import MetaStep
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.params import MetaParams, State
from reptile.algorithms.tail import SecondOrderTail
from reptile.data.tasks import Task


@dataclass(frozen=True)
class MAML(SecondOrderTail):
    """Meta-gradient inner_lr · ∇_φ mean_i L_tail,i(U_i(φ)), U_i = k − 1 SGD steps on task i.

    Scaled by inner_lr so that it is in the units of Reptile's and FOMAML's (a displacement of the
    weights; FOMAML is this with ∂U/∂φ replaced by the identity), and ε means the same for all
    three. The tasks are vectorised as `vmap(grad(one task's tail loss))`; `task_chunk_size` caps
    memory by differentiating that many tasks at a time (0: the whole meta-batch at once).
    """

    inner_optimizer: str = "sgd"  # the only one MAML accepts

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_second_order()

    def meta_gradient(
        self, inner: InnerLoop, meta: MetaParams, state: State, task: Task
    ) -> MetaStep:
        return self.second_order_gradient(inner, meta, state, task)
