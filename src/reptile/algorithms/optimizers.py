"""Inner-loop optimizers as pure functions over per-task parameter tensors.

The updates are elementwise, so they apply unchanged to a batch of tasks ([tasks, ...] tensors).
They follow `torch.optim.SGD` and `torch.optim.Adam` exactly, which the tests check.
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
        return {name: p - self.lr * grads[name] for name, p in params.items()}, state


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
        new_params, exp_avg, exp_avg_sq = {}, {}, {}
        for name, p in params.items():
            g = grads[name]
            exp_avg[name] = torch.lerp(state["exp_avg"][name], g, 1 - beta1)
            exp_avg_sq[name] = beta2 * state["exp_avg_sq"][name] + (1 - beta2) * g * g
            denom = exp_avg_sq[name].sqrt() / bias_correction2_sqrt + self.eps
            new_params[name] = p - step_size * exp_avg[name] / denom
        return new_params, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
