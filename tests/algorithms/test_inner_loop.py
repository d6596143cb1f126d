"""The vectorised inner loop against a plain per-task loop on deep-copied modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reptile.algorithms import Reptile
from reptile.algorithms.inner_loop import InnerLoop, gather
from reptile.algorithms.reptile import clones
from reptile.data.sine import SineWaves
from reptile.data.tasks import InnerSchedule, collate_tasks, inner_batch_index, task_generator
from reptile.models.mlp import MLP

STEPS, BATCH, TASKS = 4, 4, 3


def sine_tasks(tasks: int = TASKS, shots: int = 10) -> dict[str, torch.Tensor]:
    waves = SineWaves(shots=shots)
    schedule = InnerSchedule(STEPS, BATCH)
    batch = []
    for index in range(tasks):
        generator = task_generator(0, "train", index)
        task = waves.sample_train_task(generator, tail_size=0)
        task["batch_index"] = inner_batch_index(shots, schedule, generator)
        batch.append(task)
    return collate_tasks(batch)


def loop_adapt(model, task, index, optimizer_factory, optimizer_state=None, steps=STEPS):
    """The textbook way: deep-copy the model, step a torch optimizer on each mini-batch."""
    clone = copy.deepcopy(model)
    optimizer = optimizer_factory(clone.parameters())
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    for step in range(steps):
        batch = task["batch_index"][index, step]
        inputs = task["support_inputs"][index][batch]
        targets = task["support_targets"][index][batch]
        optimizer.zero_grad()
        F.mse_loss(clone(inputs), targets).backward()
        optimizer.step()
    return dict(clone.named_parameters()), optimizer


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_vectorised_inner_loop_equals_per_task_loop(name: str) -> None:
    model = MLP()
    task = sine_tasks()
    algorithm = Reptile(
        inner_optimizer=name, inner_lr=0.01, inner_steps=STEPS, inner_batch_size=BATCH
    )
    inner = InnerLoop(model, "mse", algorithm.make_inner_optimizer())
    phi = {n: p.detach() for n, p in model.named_parameters()}
    params = clones(phi, TASKS)
    adapted, _, losses = inner.adapt(params, inner.optimizer.init(params), task, STEPS)

    def factory(parameters):
        if name == "adam":
            return torch.optim.Adam(parameters, lr=0.01, betas=(0.0, 0.999))
        return torch.optim.SGD(parameters, lr=0.01)

    for index in range(TASKS):
        expected, _ = loop_adapt(model, task, index, factory)
        for key, value in expected.items():
            torch.testing.assert_close(adapted[key][index], value.detach(), rtol=1e-5, atol=1e-6)
    assert losses.shape == (STEPS, TASKS)


def test_gather_picks_each_tasks_own_samples() -> None:
    values = torch.arange(12.0).view(2, 6)
    index = torch.tensor([[5, 0], [1, 2]])
    assert gather(values, index).tolist() == [[5.0, 0.0], [7.0, 8.0]]
