"""Inner-loop optimizers as pure functions over per-task parameter tensors.

The updates are elementwise, so they apply unchanged to a batch of tasks ([tasks, ...] tensors).
They follow `torch.optim.SGD` and `torch.optim.Adam` exactly, which the tests check. Each update
is a handful of `torch._foreach_*` calls over all parameters at once, as torch.optim's foreach
implementation does: with small per-task tensors the cost is the number of calls, not the math.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from reptile.algorithms.params import Params, State


def in_functorch_transform() -> bool:
    """Inside `torch.func.grad`/`vmap` (MAML differentiating through the inner loop)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def each(op: str, tensors: list[list[torch.Tensor]], *scalars: Any, **options: Any) -> list:
    """`torch.<op>` on every tuple of `tensors`: one `torch._foreach_<op>` call, except inside
    torch.func transforms, which have no batching rules for the foreach ops."""
    if in_functorch_transform():
        function = getattr(torch, op)
        return [function(*args, *scalars, **options) for args in zip(*tensors, strict=True)]
    return getattr(torch, f"_foreach_{op}")(*tensors, *scalars, **options)


class InnerOptimizer(Protocol):
    def init(self, params: Params) -> State: ...

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]: ...


@dataclass(frozen=True)
class SGD:
    lr: float

    def init(self, params: Params) -> State:
        return {}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        names = list(params)
        stepped = each(
            "add", [[params[n] for n in names], [grads[n] for n in names]], alpha=-self.lr
        )
        return dict(zip(names, stepped, strict=True)), state


@dataclass(frozen=True)
class Adam:
    """Adam; the reference implementation runs it with beta1 = 0."""

    lr: float
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-8

    def init(self, params: Params) -> State:
        zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        return {"step": 0, "exp_avg": zeros, "exp_avg_sq": dict(zeros)}

    def step(self, params: Params, grads: Params, state: State) -> tuple[Params, State]:
        beta1, beta2 = self.betas
        step = state["step"] + 1
        step_size = self.lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        names = list(params)
        g = [grads[n] for n in names]
        # Out of place throughout: the state may be shared, or broadcast against the per-task
        # gradients (the result then takes the tasks' shape).
        exp_avg = each("lerp", [[state["exp_avg"][n] for n in names], g], 1 - beta1)
        decayed = each("mul", [[state["exp_avg_sq"][n] for n in names]], beta2)
        exp_avg_sq = each("addcmul", [decayed, g, g], value=1 - beta2)
        denom = each(
            "add", [each("div", [each("sqrt", [exp_avg_sq])], bias_correction2_sqrt)], self.eps
        )
        stepped = each("addcdiv", [[params[n] for n in names], exp_avg, denom], value=-step_size)
        return dict(zip(names, stepped, strict=True)), {
            "step": step,
            "exp_avg": dict(zip(names, exp_avg, strict=True)),
            "exp_avg_sq": dict(zip(names, exp_avg_sq, strict=True)),
        }


# `algorithm.inner_optimizer` → the optimizer, from the inner learning rate and Adam's betas.
INNER_OPTIMIZERS: dict[str, Callable[[float, tuple[float, float]], InnerOptimizer]] = {
    "sgd": lambda lr, betas: SGD(lr),
    "adam": lambda lr, betas: Adam(lr, betas),
}
