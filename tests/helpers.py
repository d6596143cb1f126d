"""Shared test builders: seeded sine tasks, and the textbook per-task loop the project is checked
against (a deep-copied module stepped by a `torch.optim` optimizer, one task at a time)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reptile.data.sine import SineWaves
from reptile.data.tasks import InnerSchedule, collate_tasks, inner_batch_index, task_generator

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Seconds each dataset's session cache took to decode, in the process that decoded it.
FIRST_DECODES = pytest.StashKey[dict[str, float]]()

# The accelerator "gpu" as a parameter beside "cpu", skipped without CUDA.
GPU = pytest.param(
    "gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
)


def sine_tasks(
    tasks: int,
    steps: int,
    batch: int,
    shots: int = 10,
    tail: int = 0,
    first: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Training tasks `first` … `first + tasks − 1` of seed 0, as one meta-batch."""
    waves, schedule = SineWaves(shots=shots), InnerSchedule(steps, batch)
    batch_of_tasks = []
    for index in range(first, first + tasks):
        generator = task_generator(0, "train", index)
        task = waves.sample_train_task(generator, tail_size=tail)
        task["batch_index"] = inner_batch_index(shots, schedule, generator)
        batch_of_tasks.append(task)
    collated = collate_tasks(batch_of_tasks)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in collated.items()}


def torch_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    """The torch.optim counterpart of `algorithm.inner_optimizer` (Adam with beta1 = 0)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999))
    return torch.optim.SGD(params, lr=lr)


def support_batch(task: dict, index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task `index`'s mini-batch of inner step `step`."""
    batch = task["batch_index"][index, step]
    return task["support_inputs"][index][batch], task["support_targets"][index][batch]


def sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: Loss = F.mse_loss,
) -> None:
    optimizer.zero_grad()
    loss(model(inputs), targets).backward()
    optimizer.step()


def take_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: dict,
    index: int,
    steps: int,
    loss: Loss = F.mse_loss,
) -> None:
    """`steps` steps of `optimizer` on task `index`'s mini-batches, the textbook way."""
    for step in range(steps):
        sgd_step(model, optimizer, *support_batch(task, index, step), loss)


def adapt_copy(
    model: nn.Module,
    task: dict,
    index: int,
    steps: int,
    optimizer: str = "sgd",
    lr: float = 0.01,
    loss: Loss = F.mse_loss,
    state: dict | None = None,
) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """A deep copy of `model` adapted to task `index` (from optimizer `state` if given): its
    weights and the optimizer it ended with."""
    clone = copy.deepcopy(model)
    torch_opt = torch_optimizer(optimizer, clone.parameters(), lr)
    if state is not None:
        torch_opt.load_state_dict(copy.deepcopy(state))  # loading aliases tensors
    take_steps(clone, torch_opt, task, index, steps, loss)
    return weights(clone), torch_opt


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_trees_close(actual: dict, expected: dict, **tolerance: Any) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tolerance)


LOSSES: dict[str, Loss] = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def tiny_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tanh MLP 1-8-8-1: smooth, so that finite differences are accurate."""
    from reptile.models.mlp import MLP

    return MLP(hidden=(8, 8), activation="tanh").to(dtype)


def classification_tasks(tasks: int, steps: int, batch: int, tail: int) -> dict:
    """Random 3-way 8×8 image tasks (4 shots per class, `tail` held out) in float64."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(3).repeat_interleave(4).expand(tasks, 12)
    index = [inner_batch_index(12, InnerSchedule(steps, batch), generator) for _ in range(tasks)]
    return {
        "support_inputs": torch.rand(tasks, 12, 1, 8, 8, generator=generator, dtype=torch.float64),
        "support_targets": labels,
        "query_inputs": torch.rand(
            tasks, 3 * tail, 1, 8, 8, generator=generator, dtype=torch.float64
        ),
        "query_targets": torch.arange(3).repeat_interleave(tail).expand(tasks, 3 * tail),
        "batch_index": torch.stack(index),
    }


def tail_batch(task: dict, index: int, steps: int, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task `index`'s final mini-batch: its held-out samples, or mini-batch `steps` − 1."""
    if tail:
        return task["query_inputs"][index], task["query_targets"][index]
    return support_batch(task, index, steps - 1)


def post_adaptation_loss(
    model: nn.Module, task: dict, steps: int, tail: int, loss: str, rates: dict[str, Any]
) -> float:
    """mean_i L_tail,i after k − 1 plain SGD steps on task i, by hand on a deep copy: parameter
    `name` steps by −rates[name] · its gradient (a number, or a tensor of per-weight rates);
    parameters without a rate stay fixed."""
    total, tasks = 0.0, len(task["support_targets"])
    for i in range(tasks):
        clone = copy.deepcopy(model)
        parameters = dict(clone.named_parameters())
        for step in range(steps - 1):
            clone.zero_grad()
            LOSSES[loss](
                clone(support_batch(task, i, step)[0]), support_batch(task, i, step)[1]
            ).backward()
            with torch.no_grad():
                for name, rate in rates.items():
                    parameters[name] -= rate * parameters[name].grad
        inputs, targets = tail_batch(task, i, steps, tail)
        with torch.no_grad():
            total += LOSSES[loss](clone(inputs), targets).item()
    return total / tasks


def with_weights(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of `model` with the parameters in `values` replaced."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in values:
                p.copy_(values[name])
    return moved


def central_difference(
    loss_at: Callable[[dict], float], point: dict, direction: dict, h: float = 1e-5
) -> float:
    """d/dt loss_at(point + t · direction) at t = 0, by a central difference."""
    plus = {key: value + h * direction[key] for key, value in point.items()}
    minus = {key: value - h * direction[key] for key, value in point.items()}
    return (loss_at(plus) - loss_at(minus)) / (2 * h)


def random_direction(point: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(value.shape, generator=generator, dtype=value.dtype)
        for key, value in point.items()
    }


def meta_gradients(algorithm: Any, model: nn.Module, task: dict, loss: str = "mse") -> dict:
    """The project's meta-gradient of one meta-batch from φ = `model`'s weights and a fresh inner
    state, for every meta-parameter group ("phi" and the algorithm's own, at their initial
    values)."""
    inner = algorithm.inner_loop(model, loss)
    meta = {"phi": weights(model), **algorithm.init_meta_parameters(model, inner.adapted)}
    return algorithm.meta_step(inner, meta, None, task).gradient


def quiet_trainer(**options: Any) -> Any:
    """A real Lightning Trainer without logger, bar, summary or validation (`options` override;
    checkpointing only by a ModelCheckpoint among the callbacks)."""
    import pytorch_lightning as pl

    checkpointing = any(
        isinstance(c, pl.callbacks.ModelCheckpoint) for c in options.get("callbacks", [])
    )
    settings = dict(
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        inference_mode=False,  # evaluation adapts with autograd, as conf/trainer says
    )
    return pl.Trainer(**(settings | options))
