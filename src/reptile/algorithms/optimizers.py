"""Inner-loop optimizers as pure functions over per-task parameter tensors.

The updates are elementwise, so they apply unchanged to a batch of tasks ([tasks, ...] tensors).
They follow `torch.optim.SGD` and `torch.optim.Adam` exactly, which the tests check. Each update
is a handful of `torch._foreach_*` calls over all parameters at once, as torch.optim's foreach
implementation does: with small per-task tensors the cost is the number of calls, not the math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Params = dict[str, torch.Tensor]
State = dict[str, Any]


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
        stepped = torch._foreach_add(
            [params[n] for n in names], [grads[n] for n in names], alpha=-self.lr
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
        exp_avg = torch._foreach_lerp([state["exp_avg"][n] for n in names], g, 1 - beta1)
        # Out-of-place first, so the carried state is never written; in place on new tensors after.
        exp_avg_sq = torch._foreach_mul([state["exp_avg_sq"][n] for n in names], beta2)
        torch._foreach_addcmul_(exp_avg_sq, g, g, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, self.eps)
        stepped = torch._foreach_addcdiv([params[n] for n in names], exp_avg, denom, -step_size)
        return dict(zip(names, stepped, strict=True)), {
            "step": step,
            "exp_avg": dict(zip(names, exp_avg, strict=True)),
            "exp_avg_sq": dict(zip(names, exp_avg_sq, strict=True)),
        }
