"""The vectorised inner loop against a plain per-task loop on deep-copied modules."""

from __future__ import annotations

import pytest
import torch
from helpers import adapt_copy, sine_tasks

from reptile.algorithms import Reptile
from reptile.algorithms.inner_loop import gather
from reptile.algorithms.params import broadcast
from reptile.models.mlp import MLP

STEPS, BATCH, TASKS = 4, 4, 3


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_vectorised_inner_loop_equals_per_task_loop(name: str) -> None:
    model = MLP()
    task = sine_tasks(TASKS, STEPS, BATCH)
    algorithm = Reptile(
        inner_optimizer=name, inner_lr=0.01, inner_steps=STEPS, inner_batch_size=BATCH
    )
    inner = algorithm.inner_loop(model, "mse")
    phi = {n: p.detach() for n, p in model.named_parameters()}
    params = broadcast(phi, TASKS)
    adapted, _, losses = inner.adapt(params, inner.init_state(params), task, STEPS)

    for index in range(TASKS):
        expected, _ = adapt_copy(model, task, index, STEPS, name)
        for key, value in expected.items():
            torch.testing.assert_close(adapted[key][index], value, rtol=1e-5, atol=1e-6)
    assert losses.shape == (STEPS, TASKS)


def test_gather_picks_each_tasks_own_samples() -> None:
    values = torch.arange(12.0).view(2, 6)
    index = torch.tensor([[5, 0], [1, 2]])
    assert gather(values, index).tolist() == [[5.0, 0.0], [7.0, 8.0]]
