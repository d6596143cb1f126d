"""ANIL against its definition: a per-task loop that steps the head alone (first order), and
finite differences of the post-adaptation loss (second order)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LOSSES,
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

from reptile.algorithms import ANIL
from reptile.config import ConfigValueError
from reptile.models.conv4 import Conv4

TASKS, SHOTS, BATCH, TAIL, LR = 3, 8, 4, 5, 0.05
HEAD = {"mlp": "4.", "conv4": "classifier."}  # the last layer's parameters


def small_conv4() -> Conv4:
    return Conv4(num_classes=3, hidden=4, layers=2, image_size=8).to(torch.float64)


def problem(model: str, steps: int, tail: int) -> tuple[torch.nn.Module, dict, str]:
    if model == "mlp":
        return (
            tiny_mlp(torch.float64),
            sine_tasks(TASKS, steps, BATCH, SHOTS, tail, dtype=torch.float64),
            "mse",
        )
    return small_conv4(), classification_tasks(TASKS, steps, BATCH, tail), "cross_entropy"


def textbook_first_order(
    model: torch.nn.Module, task: dict, steps: int, tail: int, optimizer: str, loss: str, head: str
) -> dict:
    """Per task: a deep copy whose head alone a torch optimizer steps k − 1 times; then the
    head's k-th step on the tail (its displacement) and the body's tail gradient × inner lr."""
    meta_gradients_per_task = []
    for i in range(TASKS):
        clone = copy.deepcopy(model)
        head_params = [p for n, p in clone.named_parameters() if n.startswith(head)]
        opt = torch_optimizer(optimizer, head_params, LR)
        for step in range(steps - 1):
            sgd_step(clone, opt, *support_batch(task, i, step), LOSSES[loss])
        before = weights(clone)
        clone.zero_grad()
        sgd_step(clone, opt, *tail_batch(task, i, steps, tail), LOSSES[loss])
        after = weights(clone)
        meta_gradients_per_task.append(
            {
                n: before[n] - after[n] if n.startswith(head) else LR * p.grad
                for n, p in clone.named_parameters()
            }
        )
    return {n: torch.stack([g[n] for g in meta_gradients_per_task]).mean(0) for n in before}


@pytest.mark.parametrize("backend", ["folded", "vmap"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("tail", [0, 2], ids=["shared_tail", "separate_tail"])
@pytest.mark.parametrize("model_name", ["mlp", "conv4"])
def test_first_order_anil_follows_a_per_task_loop(
    model_name: str, tail: int, optimizer: str, backend: str
) -> None:
    steps = 3
    model, task, loss = problem(model_name, steps, tail)
    algorithm = ANIL(
        inner_steps=steps,
        inner_batch_size=BATCH,
        inner_lr=LR,
        inner_optimizer=optimizer,
        tail_shots=tail,
        backend=backend,
    )
    gradient = meta_gradients(algorithm, model, task, loss)
    expected = textbook_first_order(model, task, steps, tail, optimizer, loss, HEAD[model_name])
    assert gradient.keys() == {"phi"}
    assert_trees_close(gradient["phi"], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("model_name", ["mlp", "conv4"])
def test_second_order_anil_matches_finite_differences(model_name: str) -> None:
    """Directional derivatives (float64 central differences) of the loss after k − 1 SGD steps
    of the head alone, against <meta-gradient / inner_lr, direction>, for head and body."""
    steps, tail = 3, 2
    model, task, loss = problem(model_name, steps, tail)
    algorithm = ANIL(
        inner_steps=steps,
        inner_batch_size=BATCH,
        inner_lr=LR,
        inner_optimizer="sgd",
        tail_shots=tail,
        first_order=False,
    )
    gradient = meta_gradients(algorithm, model, task, loss)["phi"]
    first_order = meta_gradients(
        ANIL(
            inner_steps=steps,
            inner_batch_size=BATCH,
            inner_lr=LR,
            inner_optimizer="sgd",
            tail_shots=tail,
        ),
        model,
        task,
        loss,
    )["phi"]
    phi = weights(model)
    rates = {n: LR for n in phi if n.startswith(HEAD[model_name])}

    def loss_at(point: dict) -> float:
        return post_adaptation_loss(with_weights(model, point), task, steps, tail, loss, rates)

    for seed in range(3):
        direction = random_direction(phi, seed)
        # h = 1e-6: at 1e-5 a step already crosses ReLU kinks of the Conv4 (checked: the
        # difference then converges to the analytic value as h shrinks).
        finite_difference = central_difference(loss_at, phi, direction, h=1e-6)
        analytic = sum((gradient[n] * direction[n]).sum() for n in phi).item() / LR
        # The head's k-th SGD step is inner_lr · its tail gradient: first order, in these units.
        approximate = sum((first_order[n] * direction[n]).sum() for n in phi).item() / LR
        assert analytic == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)
        assert abs(approximate - finite_difference) > 1e2 * abs(analytic - finite_difference)


def test_the_head_is_the_last_layer_unless_named() -> None:
    inner = ANIL().inner_loop(small_conv4(), "cross_entropy")
    assert inner.adapted == ("classifier.weight", "classifier.bias")
    named = ANIL(head=["classifier.bias", "features.1"]).inner_loop(small_conv4(), "cross_entropy")
    assert named.adapted == (
        "features.1.1.weight",
        "features.1.2.weight",
        "features.1.2.bias",
        "classifier.bias",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"head": ["decoder"]}, "head=['decoder']: expected prefixes of some but not all"),
        (
            {"head": ["features", "classifier"]},
            "head=['features', 'classifier']: expected prefixes",
        ),
        (
            {"first_order": False, "inner_optimizer": "adam"},
            "inner_optimizer='adam': expected sgd (ANIL",
        ),
        (
            {"first_order": False, "inner_optimizer": "sgd", "compile": True},
            "compile=True: expected false (ANIL",
        ),
        ({"first_order": "no"}, "first_order='no': expected true or false"),
    ],
)
def test_bad_settings_are_named(options: dict, message: str) -> None:
    with pytest.raises(
        ConfigValueError, match="^" + message.replace("(", r"\(").replace("[", r"\[")
    ):
        ANIL(**options).inner_loop(small_conv4(), "cross_entropy")


def test_k1_first_order_anil_steps_the_head_and_moves_the_body_by_its_gradient() -> None:
    """k = 1: the tail is at φ; head: one inner SGD step = LR · ∇head; body: LR · ∇body."""
    model, task = tiny_mlp(), sine_tasks(TASKS, 1, BATCH, SHOTS)
    gradient = meta_gradients(
        ANIL(inner_steps=1, inner_batch_size=BATCH, inner_lr=LR, inner_optimizer="sgd"), model, task
    )["phi"]
    total = sum(
        F.mse_loss(model(x), y) for x, y in (support_batch(task, i, 0) for i in range(TASKS))
    )
    model.zero_grad()
    (total / TASKS).backward()
    assert_trees_close(
        gradient, {n: LR * p.grad for n, p in model.named_parameters()}, rtol=1e-5, atol=1e-8
    )
