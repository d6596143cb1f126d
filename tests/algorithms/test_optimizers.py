"""The functional inner optimizers against torch.optim, step for step, per task and batched."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from reptile.algorithms.optimizers import INNER_OPTIMIZERS, SGD, Adam
from reptile.algorithms.params import broadcast

STEPS = 4
BETAS = [(0.0, 0.999), (0.9, 0.99)]


def torch_counterpart(name: str, params: list[torch.Tensor], betas: tuple[float, float]):
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01, betas=betas)
    return torch.optim.SGD(params, lr=0.01)


def random_gradients(
    shapes: dict[str, tuple[int, ...]], seed: int
) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {n: torch.randn(s, generator=generator) for n, s in shapes.items()} for _ in range(STEPS)
    ]


@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("name", list(INNER_OPTIMIZERS))
def test_steps_equal_torch_optim(name: str, betas: tuple[float, float]) -> None:
    shapes = {"weight": (3, 2), "bias": (3,)}
    generator = torch.Generator().manual_seed(1)
    params = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    reference = {n: p.clone().requires_grad_() for n, p in params.items()}
    torch_optimizer = torch_counterpart(name, list(reference.values()), betas)
    optimizer = INNER_OPTIMIZERS[name](0.01, betas)
    state = optimizer.init(params)
    for grads in random_gradients(shapes, seed=2):
        params, state = optimizer.step(params, grads, state)
        for n, p in reference.items():
            p.grad = grads[n].clone()
        torch_optimizer.step()
        for n, p in reference.items():
            torch.testing.assert_close(params[n], p.detach(), rtol=1e-6, atol=1e-7)
    if name == "adam":
        for n, p in reference.items():
            torch.testing.assert_close(
                state["exp_avg_sq"][n], torch_optimizer.state[p]["exp_avg_sq"]
            )


@pytest.mark.parametrize("optimizer", [SGD(0.01), Adam(0.01)], ids=["sgd", "adam"])
def test_batched_tasks_step_independently(optimizer) -> None:
    """A shared state broadcast over tasks: each task's slice steps as if it were alone, with
    `torch._foreach_*` calls and inside `vmap` (the path torch.func transforms take)."""
    generator = torch.Generator().manual_seed(3)
    tasks = {"w": torch.randn(4, 5, generator=generator)}
    grads = {"w": torch.randn(4, 5, generator=generator)}
    one = optimizer.init({"w": tasks["w"][0]})
    batched, _ = optimizer.step(tasks, grads, broadcast(one, 4))

    def step_one(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return optimizer.step({"w": w}, {"w": g}, one)[0]["w"]

    mapped = vmap(step_one)(tasks["w"], grads["w"])
    for i in range(4):
        alone, _ = optimizer.step({"w": tasks["w"][i]}, {"w": grads["w"][i]}, one)
        torch.testing.assert_close(batched["w"][i], alone["w"])
        torch.testing.assert_close(mapped[i], alone["w"])
