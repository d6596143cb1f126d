"""Each algorithm's meta-gradient against its definition, computed independently.

The references below use a plain loop over tasks with deep-copied modules and `torch.optim`, or a
finite difference of the post-adaptation loss, never the vectorised inner loop under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reptile.algorithms import FOMAML, MAML, InnerLoop, Reptile
from reptile.algorithms.base import Algorithm
from reptile.config import ConfigValueError
from reptile.data.sine import SineWaves
from reptile.data.tasks import InnerSchedule, collate_tasks, inner_batch_index, task_generator
from reptile.models.conv4 import Conv4
from reptile.models.mlp import MLP

TASKS, SHOTS, BATCH, TAIL, LR = 3, 8, 4, 5, 0.05


def make_tasks(steps: int, tail: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    waves = SineWaves(shots=SHOTS)
    batch = []
    for index in range(TASKS):
        generator = task_generator(0, "train", index)
        task = waves.sample_train_task(generator, tail_size=tail)
        task["batch_index"] = inner_batch_index(SHOTS, InnerSchedule(steps, BATCH), generator)
        batch.append(task)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in collate_tasks(batch).items()}


def tiny_model(dtype: torch.dtype = torch.float32) -> MLP:
    # tanh: smooth, so the finite difference is accurate.
    return MLP(hidden=(8, 8), activation="tanh").to(dtype)


def phi_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def classification_tasks(steps: int, tail: int) -> dict:
    """Random 3-way image tasks (4 shots per class) for a tiny batch-norm Conv4, in float64."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(3).repeat_interleave(4).expand(TASKS, 12)
    batches = [inner_batch_index(12, InnerSchedule(steps, BATCH), generator) for _ in range(TASKS)]
    return {
        "support_inputs": torch.rand(TASKS, 12, 1, 8, 8, generator=generator, dtype=torch.float64),
        "support_targets": labels,
        "query_inputs": torch.rand(
            TASKS, 3 * tail, 1, 8, 8, generator=generator, dtype=torch.float64
        ),
        "query_targets": torch.arange(3).repeat_interleave(tail).expand(TASKS, 3 * tail),
        "batch_index": torch.stack(batches),
    }


LOSS_FUNCTIONS = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


def meta_gradient(
    algorithm: Algorithm, model: torch.nn.Module, task: dict, loss: str = "mse"
) -> dict:
    inner = InnerLoop(model, loss, algorithm.make_inner_optimizer())
    phi = phi_of(model)
    return algorithm.meta_gradient(inner, phi, inner.optimizer.init(phi), task).gradient


def batch_of(task: dict, i: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = task["batch_index"][i, step]
    return task["support_inputs"][i][index], task["support_targets"][i][index]


def tail_of(task: dict, i: int, steps: int, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
    if tail:
        return task["query_inputs"][i], task["query_targets"][i]
    return batch_of(task, i, steps - 1)


def sgd_step(
    clone: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs, targets, loss=F.mse_loss
) -> None:
    optimizer.zero_grad()
    loss(clone(inputs), targets).backward()
    optimizer.step()


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=LR, betas=(0.0, 0.999))
    return torch.optim.SGD(params, lr=LR)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_trees_close(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tolerance)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_is_phi_minus_mean_adapted_weights(optimizer: str) -> None:
    steps, model, task = 3, tiny_model(), make_tasks(3)
    algorithm = Reptile(
        inner_steps=steps, inner_batch_size=BATCH, inner_lr=LR, inner_optimizer=optimizer
    )
    adapted = []
    for i in range(TASKS):
        clone = copy.deepcopy(model)
        torch_optimizer = make_optimizer(optimizer, clone.parameters())
        for step in range(steps):
            sgd_step(clone, torch_optimizer, *batch_of(task, i, step))
        adapted.append(weights(clone))
    expected = {
        name: p - torch.stack([w[name] for w in adapted]).mean(0)
        for name, p in phi_of(model).items()
    }
    assert_trees_close(meta_gradient(algorithm, model, task), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("tail", [0, TAIL], ids=["shared_tail", "separate_tail"])
def test_fomaml_is_the_last_inner_step_on_the_tail(optimizer: str, tail: int) -> None:
    """k − 1 steps on the schedule's batches, then the k-th step on the tail batch: the
    meta-gradient is mean_i(W_i,k−1 − W_i,k) (= inner_lr · ∇L_tail(W_k−1) with SGD)."""
    steps, model, task = 3, tiny_model(), make_tasks(3, tail)
    algorithm = FOMAML(
        inner_steps=steps,
        inner_batch_size=BATCH,
        inner_lr=LR,
        inner_optimizer=optimizer,
        tail_shots=tail,
    )
    last_steps = []
    for i in range(TASKS):
        clone = copy.deepcopy(model)
        torch_optimizer = make_optimizer(optimizer, clone.parameters())
        for step in range(steps - 1):
            sgd_step(clone, torch_optimizer, *batch_of(task, i, step))
        before = weights(clone)
        sgd_step(clone, torch_optimizer, *tail_of(task, i, steps, tail))
        last_steps.append({name: before[name] - w for name, w in weights(clone).items()})
    expected = {name: torch.stack([d[name] for d in last_steps]).mean(0) for name in last_steps[0]}
    assert_trees_close(meta_gradient(algorithm, model, task), expected, rtol=1e-4, atol=1e-7)


def post_adaptation_loss(
    model: torch.nn.Module, task: dict, steps: int, tail: int, loss: str
) -> float:
    """mean_i L_tail,i after k − 1 plain SGD steps on task i, by a per-task loop."""
    total = 0.0
    for i in range(TASKS):
        clone = copy.deepcopy(model)
        optimizer = torch.optim.SGD(clone.parameters(), lr=LR)
        for step in range(steps - 1):
            sgd_step(clone, optimizer, *batch_of(task, i, step), LOSS_FUNCTIONS[loss])
        inputs, targets = tail_of(task, i, steps, tail)
        with torch.no_grad():
            total += LOSS_FUNCTIONS[loss](clone(inputs), targets).item()
    return total / TASKS


@pytest.mark.parametrize(
    ("loss", "tail"),
    [("mse", 0), ("mse", TAIL), ("cross_entropy", 0), ("cross_entropy", 2)],
    ids=["sine_shared_tail", "sine_separate_tail", "conv4_shared_tail", "conv4_separate_tail"],
)
def test_maml_meta_gradient_matches_finite_differences(loss: str, tail: int) -> None:
    """Directional derivatives of the post-adaptation loss, by central differences in float64,
    equal <MAML meta-gradient / inner_lr, direction>: the second-order terms are all there,
    through an MLP on sine tasks and through a batch-norm Conv4 on classification tasks."""
    steps = 3
    if loss == "mse":
        model, task = tiny_model(torch.float64), make_tasks(steps, tail, torch.float64)
    else:
        model = Conv4(num_classes=3, hidden=4, layers=2, image_size=8).to(torch.float64)
        task = classification_tasks(steps, tail)
    algorithm = MAML(
        inner_steps=steps,
        inner_batch_size=BATCH,
        inner_lr=LR,
        inner_optimizer="sgd",
        tail_shots=tail,
    )
    gradient = meta_gradient(algorithm, model, task, loss)
    first_order = meta_gradient(
        FOMAML(
            inner_steps=steps,
            inner_batch_size=BATCH,
            inner_lr=LR,
            inner_optimizer="sgd",
            tail_shots=tail,
        ),
        model,
        task,
        loss,
    )
    h = 1e-5
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = {
            name: torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for name, p in model.named_parameters()
        }
        shifted = []
        for sign in (1, -1):
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for name, p in moved.named_parameters():
                    p += sign * h * direction[name]
            shifted.append(post_adaptation_loss(moved, task, steps, tail, loss))
        finite_difference = (shifted[0] - shifted[1]) / (2 * h)
        analytic = sum((gradient[n] * direction[n]).sum() for n in direction).item() / LR
        approximate = sum((first_order[n] * direction[n]).sum() for n in direction).item() / LR
        assert analytic == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)
        # The check can tell: dropping the inner loop's Jacobian (FOMAML) is visibly off.
        assert abs(approximate - finite_difference) > 1e3 * abs(analytic - finite_difference)


def test_maml_chunks_sum_to_the_whole_meta_batch() -> None:
    model, task = tiny_model(), make_tasks(3)
    options = dict(inner_steps=3, inner_batch_size=BATCH, inner_lr=LR, inner_optimizer="sgd")
    whole = meta_gradient(MAML(**options), model, task)
    chunked = meta_gradient(MAML(**options, task_chunk_size=2), model, task)
    assert_trees_close(chunked, whole, rtol=1e-5, atol=1e-7)


def test_k1_fomaml_and_maml_agree() -> None:
    """With k = 1 there is no inner step to differentiate through: MAML = FOMAML = lr · ∇L(φ)."""
    model, task = tiny_model(), make_tasks(1)
    options = dict(inner_steps=1, inner_batch_size=BATCH, inner_lr=LR, inner_optimizer="sgd")
    assert_trees_close(
        meta_gradient(MAML(**options), model, task),
        meta_gradient(FOMAML(**options), model, task),
        rtol=1e-5,
        atol=1e-8,
    )


def test_k1_reptile_is_sgd_on_the_expected_loss() -> None:
    """The paper's equation E_τ[SGD(L_τ, φ, 1)] = SGD(E_τ[L_τ], φ, 1): with k = 1 and ε = 1,
    the Reptile update φ − ε·(φ − mean_i W_i) equals one plain SGD step on the meta-batch mean
    loss (mean_i L_i(φ)), i.e. Reptile degenerates to joint training and learns no adaptation."""
    model, task = tiny_model(), make_tasks(1)
    algorithm = Reptile(inner_steps=1, inner_batch_size=BATCH, inner_lr=LR, inner_optimizer="sgd")
    gradient = meta_gradient(algorithm, model, task)
    reptile_update = {name: p - 1.0 * gradient[name] for name, p in phi_of(model).items()}

    joint = copy.deepcopy(model)
    optimizer = torch.optim.SGD(joint.parameters(), lr=LR)
    expected_loss = sum(
        F.mse_loss(joint(x), y) for x, y in (batch_of(task, i, 0) for i in range(TASKS))
    )
    optimizer.zero_grad()
    (expected_loss / TASKS).backward()
    optimizer.step()
    assert_trees_close(reptile_update, weights(joint), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("algorithm", "options", "message"),
    [
        (MAML, {"inner_optimizer": "adam"}, "inner_optimizer='adam': expected sgd"),
        (MAML, {"inner_optimizer": "sgd", "task_chunk_size": -1}, "task_chunk_size=-1"),
        (Reptile, {"tail_shots": 2}, "tail_shots=2: expected 0 (Reptile uses no tail)"),
    ],
)
def test_bad_settings_are_named(algorithm: type, options: dict, message: str) -> None:
    with pytest.raises(ConfigValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        algorithm(**options)
