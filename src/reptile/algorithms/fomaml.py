"""First-order MAML: the last inner step, taken on the tail, is the meta-gradient."""

from __future__ import annotations

from dataclasses import dataclass

from reptile.algorithms.base import MetaStep
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.params import MetaParams, State
from reptile.algorithms.tail import TailAlgorithm
from reptile.data.tasks import Task


@dataclass(frozen=True)
class FOMAML(TailAlgorithm):
    """Meta-gradient mean_i(W_i,k−1 − W_i,k): the k-th inner step, on the tail, from W_i,k−1.

    With SGD that is inner_lr · ∇L_tail(W_k−1), MAML's gradient without the Jacobian of the inner
    loop. It is measured, like Reptile's φ − W = inner_lr · (g_1 + … + g_k), as a displacement
    of the weights: the two differ only in which inner gradients they sum (the paper's g_k
    against g_1 + … + g_k), so they compare under the same outer step size ε. With Adam the step
    is Adam's, from the carried moments, as in the reference implementation.
    """

    def meta_gradient(
        self, inner: InnerLoop, meta: MetaParams, state: State, task: Task
    ) -> MetaStep:
        return self.first_order_gradient(inner, meta, state, task)
