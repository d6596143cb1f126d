"""Each algorithm's meta-gradient against its definition, computed independently.

The references below use a plain loop over tasks with deep-copied modules and `torch.optim`, or a
finite difference of the post-adaptation loss, never the vectorised inner loop under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_trees_close,
    central_difference,
    classification_tasks,
    meta_gradients,
    post_adaptation_loss,
    random_direction,
    sgd_step,
    sine_tasks,
    support_batch,
    tail_batch,
    tiny_mlp,
    torch_optimizer,
    weights,
    with_weights,
)

from reptile.algorithms import FOMAML, MAML, Reptile
from reptile.algorithms.base import Algorithm
from reptile.config import ConfigValueError
from reptile.models.conv4 import Conv4

TASKS, SHOTS, BATCH, TAIL, LR = 3, 8, 4, 5, 0.05


def make_tasks(steps: int, tail: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    return sine_tasks(TASKS, steps, BATCH, SHOTS, tail, dtype=dtype)


def meta_gradient(
    algorithm: Algorithm, model: torch.nn.Module, task: dict, loss: str = "mse"
) -> dict:
    return meta_gradients(algorithm, model, task, loss)["phi"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_is_phi_minus_mean_adapted_weights(optimizer: str) -> None:
    steps, model, task = 3, tiny_mlp(), make_tasks(3)
    algorithm = Reptile(
        inner_steps=steps, inner_batch_size=BATCH, inner_lr=LR, inner_optimizer=optimizer
    )
    adapted = []
    for i in range(TASKS):
        clone = copy.deepcopy(model)
        opt = torch_optimizer(optimizer, clone.parameters(), LR)
        for step in range(steps):
            sgd_step(clone, opt, *support_batch(task, i, step))
        adapted.append(weights(clone))
    expected = {
        name: p - torch.stack([w[name] for w in adapted]).mean(0)
        for name, p in weights(model).items()
    }
    assert_trees_close(meta_gradient(algorithm, model, task), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("tail", [0, TAIL], ids=["shared_tail", "separate_tail"])
def test_fomaml_is_the_last_inner_step_on_the_tail(optimizer: str, tail: int) -> None:
    """k − 1 steps on the schedule's batches, then the k-th step on the tail batch: the
    meta-gradient is mean_i(W_i,k−1 − W_i,k) (= inner_lr · ∇L_tail(W_k−1) with SGD)."""
    steps, model, task = 3, tiny_mlp(), make_tasks(3, tail)
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
        opt = torch_optimizer(optimizer, clone.parameters(), LR)
        for step in range(steps - 1):
            sgd_step(clone, opt, *support_batch(task, i, step))
        before = weights(clone)
        sgd_step(clone, opt, *tail_batch(task, i, steps, tail))
        last_steps.append({name: before[name] - w for name, w in weights(clone).items()})
    expected = {name: torch.stack([d[name] for d in last_steps]).mean(0) for name in last_steps[0]}
    assert_trees_close(meta_gradient(algorithm, model, task), expected, rtol=1e-4, atol=1e-7)


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
        model, task = tiny_mlp(torch.float64), make_tasks(steps, tail, torch.float64)
    else:
        model = Conv4(num_classes=3, hidden=4, layers=2, image_size=8).to(torch.float64)
        task = classification_tasks(TASKS, steps, BATCH, tail)
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
    phi = weights(model)
    rates = dict.fromkeys(phi, LR)

    def loss_at(point: dict) -> float:
        return post_adaptation_loss(with_weights(model, point), task, steps, tail, loss, rates)

    for seed in range(3):
        direction = random_direction(phi, seed)
        finite_difference = central_difference(loss_at, phi, direction)
        analytic = sum((gradient[n] * direction[n]).sum() for n in direction).item() / LR
        approximate = sum((first_order[n] * direction[n]).sum() for n in direction).item() / LR
        assert analytic == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)
        # The check can tell: dropping the inner loop's Jacobian (FOMAML) is visibly off.
        assert abs(approximate - finite_difference) > 1e3 * abs(analytic - finite_difference)


def test_maml_chunks_sum_to_the_whole_meta_batch() -> None:
    model, task = tiny_mlp(), make_tasks(3)
    options = dict(inner_steps=3, inner_batch_size=BATCH, inner_lr=LR, inner_optimizer="sgd")
    whole = meta_gradient(MAML(**options), model, task)
    chunked = meta_gradient(MAML(**options, task_chunk_size=2), model, task)
    assert_trees_close(chunked, whole, rtol=1e-5, atol=1e-7)


def test_k1_fomaml_and_maml_agree() -> None:
    """With k = 1 there is no inner step to differentiate through: MAML = FOMAML = lr · ∇L(φ)."""
    model, task = tiny_mlp(), make_tasks(1)
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
    model, task = tiny_mlp(), make_tasks(1)
    algorithm = Reptile(inner_steps=1, inner_batch_size=BATCH, inner_lr=LR, inner_optimizer="sgd")
    gradient = meta_gradient(algorithm, model, task)
    reptile_update = {name: p - 1.0 * gradient[name] for name, p in weights(model).items()}

    joint = copy.deepcopy(model)
    optimizer = torch.optim.SGD(joint.parameters(), lr=LR)
    expected_loss = sum(
        F.mse_loss(joint(x), y) for x, y in (support_batch(task, i, 0) for i in range(TASKS))
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
