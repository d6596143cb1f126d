"""Meta-SGD (Li et al., 2017): the inner learning rates are meta-parameters too, one per weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from reptile.algorithms.base import MetaStep
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.optimizers import each
from reptile.algorithms.params import MetaParams, Params, State
from reptile.algorithms.tail import SecondOrderTail
from reptile.config import require, require_bool
from reptile.data.tasks import Task


@dataclass(frozen=True)
class LearnedRateSGD:
    """SGD at one learning rate per weight, `state["lr"]` (Meta-SGD's meta-parameters). It also
    sums the gradients it steps with, `state["grad_sum"]`: the first-order gradient of the
    learning rates needs them."""

    def init(self, params: Params) -> State:
        return {"grad_sum": {name: torch.zeros_like(p) for name, p in params.items()}}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        names = list(params)
        g = [grads[n] for n in names]
        lr = [state["lr"][n] for n in names]
        stepped = each("addcmul", [[params[n] for n in names], lr, g], value=-1)
        grad_sum = each("add", [[state["grad_sum"][n] for n in names], g])
        return dict(zip(names, stepped, strict=True)), {
            "lr": state["lr"],
            "grad_sum": dict(zip(names, grad_sum, strict=True)),
        }


@dataclass(frozen=True)
class MetaSGD(SecondOrderTail):
    """φ and α, a learning rate per adapted weight (starting at inner_lr), learned together.

    Inner step W ← W − α ⊙ ∇L; meta-gradient inner_lr · ∇_(φ, α) mean_i L_tail,i(U_i(φ, α)),
    U_i = k − 1 such steps, in the units of MAML's (with α = inner_lr everywhere, φ's part is
    MAML's). `first_order=false` differentiates through the k − 1 steps (torch.func, as MAML);
    `first_order` (default, the cheap variant) holds the inner gradients g_j constant:
    ∇_φ ≈ ∇L_tail(W_k−1) and ∇_α ≈ −∇L_tail(W_k−1) ⊙ Σ_j g_j (any backend, compile).
    """

    inner_optimizer: str = "sgd"  # at the learned rates: the only one Meta-SGD accepts
    first_order: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.inner_optimizer == "sgd",
            "inner_optimizer",
            self.inner_optimizer,
            "sgd (Meta-SGD steps with SGD at its learned learning rates)",
        )
        require(
            self.inner_state != "sequential",
            "inner_state",
            self.inner_state,
            "carry or reset (Meta-SGD's SGD has no moments to chain from task to task)",
        )
        require_bool("first_order", self.first_order)
        if not self.first_order:
            self.check_second_order()

    def init_meta_parameters(self, model: nn.Module, adapted: tuple[str, ...]) -> MetaParams:
        rates = {
            name: torch.full_like(p.detach(), self.inner_lr) for name, p in model.named_parameters()
        }
        return {"inner_lr": {name: rates[name] for name in adapted}}

    def learned_state(self, meta: MetaParams) -> State:
        return {"lr": meta["inner_lr"]}

    def inner_loop(self, model: nn.Module, loss: str) -> InnerLoop:
        adapted = self.adapted_names(model)
        return InnerLoop(model, loss, LearnedRateSGD(), self.backend, self.compile, adapted)

    def carried_state(self, state: State) -> State | None:
        return None  # no moments: the state is the meta-learned rates and a gradient sum

    def meta_gradient(
        self, inner: InnerLoop, meta: MetaParams, state: State, task: Task
    ) -> MetaStep:
        if not self.first_order:
            return self.second_order_gradient(inner, meta, state, task)
        reached = self.to_tail(inner, meta["phi"], state, task)
        tail, grad_sum = reached.tail_grads, reached.state["grad_sum"]
        gradient = {
            "phi": {name: self.inner_lr * g.mean(0) for name, g in tail.items()},
            "inner_lr": {
                name: -self.inner_lr * (tail[name] * grad_sum[name]).mean(0) for name in grad_sum
            },
        }
        return MetaStep(gradient, reached.state, reached.all_losses())
