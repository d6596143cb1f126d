"""Reptile: move φ toward the weights the inner loop reaches, φ ← φ + ε·mean_i(W_i − φ)."""

from __future__ import annotations

from dataclasses import dataclass

from reptile.algorithms.base import Algorithm, MetaStep
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.params import MetaParams, State, broadcast
from reptile.config import require
from reptile.data.tasks import Task


@dataclass(frozen=True)
class Reptile(Algorithm):
    def __post_init__(self) -> None:
        super().__post_init__()
        # Tail samples would be held out of every task and never used: a separate tail is an
        # option of the algorithms that evaluate one (FOMAML, MAML).
        require(self.tail_shots == 0, "tail_shots", self.tail_shots, "0 (Reptile uses no tail)")

    def meta_gradient(
        self, inner: InnerLoop, meta: MetaParams, state: State, task: Task
    ) -> MetaStep:
        phi, tasks = meta["phi"], len(task["support_targets"])
        adapted, state, losses = inner.adapt(broadcast(phi, tasks), state, task, self.inner_steps)
        # φ − mean W: SGD on it with learning rate ε is exactly the Reptile interpolation.
        gradient = {name: p - adapted[name].mean(0) for name, p in phi.items()}
        return MetaStep({"phi": gradient}, state, losses)
