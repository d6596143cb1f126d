"""Meta-SGD against its definition: a textbook autograd loop per task with the learning rates as
leaves (first order: the inner gradients detached), finite differences in φ and in the rates
(second order), and MAML where the rates are MAML's."""

from __future__ import annotations

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
    sine_tasks,
    support_batch,
    tail_batch,
    tiny_mlp,
    weights,
    with_weights,
)
from torch.func import functional_call

from reptile.algorithms import MAML, MetaSGD
from reptile.algorithms.meta_sgd import LearnedRateSGD
from reptile.algorithms.params import broadcast
from reptile.config import ConfigValueError
from reptile.models.conv4 import Conv4

TASKS, SHOTS, BATCH, TAIL, LR = 3, 8, 4, 5, 0.05


def problem(model: str, steps: int, tail: int) -> tuple[torch.nn.Module, dict, str]:
    if model == "mlp":
        tasks = sine_tasks(TASKS, steps, BATCH, SHOTS, tail, dtype=torch.float64)
        return tiny_mlp(torch.float64), tasks, "mse"
    model = Conv4(num_classes=3, hidden=4, layers=2, image_size=8).to(torch.float64)
    return model, classification_tasks(TASKS, steps, BATCH, tail), "cross_entropy"


def random_rates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Per-weight learning rates around LR, all different, as training would leave them."""
    generator = torch.Generator().manual_seed(5)
    return {
        n: LR * (0.5 + torch.rand(p.shape, generator=generator, dtype=p.dtype))
        for n, p in model.named_parameters()
    }


def project_gradient(algorithm: MetaSGD, model: torch.nn.Module, task: dict, loss: str, rates):
    """The project's meta-gradient at the learning rates `rates`."""
    inner = algorithm.inner_loop(model, loss)
    meta = {"phi": weights(model), "inner_lr": rates}
    state = algorithm.start_state(inner, meta, None, TASKS)
    return algorithm.meta_gradient(inner, meta, state, task).gradient


def textbook(model, task: dict, steps: int, tail: int, loss: str, rates, create_graph: bool):
    """Per task, in plain autograd: W ← W − α ⊙ ∇L for k − 1 steps (the gradients detached
    unless `create_graph`), then ∇ of the tail loss with respect to φ and α, × inner_lr."""
    per_task = []
    for i in range(TASKS):
        phi = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        alpha = {n: r.clone().requires_grad_() for n, r in rates.items()}
        params = dict(phi)
        for step in range(steps - 1):
            inputs, targets = support_batch(task, i, step)
            step_loss = LOSSES[loss](functional_call(model, params, (inputs,)), targets)
            grads = torch.autograd.grad(step_loss, list(params.values()), create_graph=create_graph)
            params = {n: params[n] - alpha[n] * g for n, g in zip(params, grads, strict=True)}
        inputs, targets = tail_batch(task, i, steps, tail)
        tail_loss = LOSSES[loss](functional_call(model, params, (inputs,)), targets)
        grads = torch.autograd.grad(tail_loss, [*phi.values(), *alpha.values()])
        per_task.append(grads)
    names = list(rates)
    mean = [LR * torch.stack(g).mean(0) for g in zip(*per_task, strict=True)]
    return {
        "phi": dict(zip(names, mean[: len(names)], strict=True)),
        "inner_lr": dict(zip(names, mean[len(names) :], strict=True)),
    }


@pytest.mark.parametrize("backend", ["folded", "vmap"])
@pytest.mark.parametrize("tail", [0, TAIL], ids=["shared_tail", "separate_tail"])
@pytest.mark.parametrize("model_name", ["mlp", "conv4"])
def test_first_order_meta_sgd_follows_the_textbook_loop(
    model_name: str, tail: int, backend: str
) -> None:
    steps = 3
    tail = min(tail, 1) if model_name == "conv4" else tail  # 4 shots per class
    model, task, loss = problem(model_name, steps, tail)
    algorithm = MetaSGD(
        inner_steps=steps, inner_batch_size=BATCH, inner_lr=LR, tail_shots=tail, backend=backend
    )
    rates = random_rates(model)
    gradient = project_gradient(algorithm, model, task, loss, rates)
    expected = textbook(model, task, steps, tail, loss, rates, create_graph=False)
    for group in ("phi", "inner_lr"):
        assert_trees_close(gradient[group], expected[group], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("model_name", ["mlp", "conv4"])
def test_second_order_meta_sgd_matches_autograd_and_finite_differences(model_name: str) -> None:
    """Exact: equal to the textbook loop with create_graph, and its directional derivatives in
    (φ, α) equal float64 central differences of the loss after k − 1 steps at rates α."""
    steps, tail = 3, 1
    model, task, loss = problem(model_name, steps, tail)
    options = dict(inner_steps=steps, inner_batch_size=BATCH, inner_lr=LR, tail_shots=tail)
    rates = random_rates(model)
    gradient = project_gradient(MetaSGD(**options, first_order=False), model, task, loss, rates)
    first_order = project_gradient(MetaSGD(**options), model, task, loss, rates)
    expected = textbook(model, task, steps, tail, loss, rates, create_graph=True)
    for group in ("phi", "inner_lr"):
        assert_trees_close(gradient[group], expected[group], rtol=1e-7, atol=1e-12)

    point = {("phi", n): p for n, p in weights(model).items()}
    point |= {("inner_lr", n): r for n, r in rates.items()}

    def loss_at(values: dict) -> float:
        moved = with_weights(model, {n: v for (group, n), v in values.items() if group == "phi"})
        moved_rates = {n: v for (group, n), v in values.items() if group == "inner_lr"}
        return post_adaptation_loss(moved, task, steps, tail, loss, moved_rates)

    def along(tree: dict, direction: dict) -> float:
        return sum((tree[g][n] * d).sum() for (g, n), d in direction.items()).item() / LR

    for seed in range(2):
        direction = random_direction(point, seed)
        finite_difference = central_difference(loss_at, point, direction, h=1e-6)
        assert along(gradient, direction) == pytest.approx(finite_difference, rel=1e-6, abs=1e-9)
        error = abs(along(gradient, direction) - finite_difference)
        assert abs(along(first_order, direction) - finite_difference) > 1e2 * error


def test_at_maml_rates_second_order_phi_gradient_is_maml() -> None:
    model, task, loss = problem("mlp", 3, 0)
    options = dict(inner_steps=3, inner_batch_size=BATCH, inner_lr=LR)
    meta_sgd = meta_gradients(MetaSGD(**options, first_order=False), model, task, loss)
    maml = meta_gradients(MAML(**options), model, task, loss)
    assert_trees_close(meta_sgd["phi"], maml["phi"], rtol=1e-10, atol=1e-14)
    assert meta_sgd.keys() == {"phi", "inner_lr"}


def test_learned_rate_sgd_steps_each_weight_at_its_rate_and_sums_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(2, 3, generator=generator)}  # two tasks of a 3-vector
    rates = {"w": torch.rand(3, generator=generator)}
    optimizer = LearnedRateSGD()
    state = {**optimizer.init(params), "lr": broadcast(rates, 2)}
    expected, total = params["w"], torch.zeros(2, 3)
    for _ in range(3):
        grads = {"w": torch.randn(2, 3, generator=generator)}
        params, state = optimizer.step(params, grads, state)
        expected, total = expected - rates["w"] * grads["w"], total + grads["w"]
    torch.testing.assert_close(params["w"], expected)
    torch.testing.assert_close(state["grad_sum"]["w"], total)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inner_optimizer": "adam"}, "inner_optimizer='adam': expected sgd (Meta-SGD"),
        ({"inner_state": "sequential"}, "inner_state='sequential': expected carry or reset"),
        ({"first_order": False, "compile": True}, "compile=True: expected false (MetaSGD"),
    ],
)
def test_bad_settings_are_named(options: dict, message: str) -> None:
    with pytest.raises(ConfigValueError, match="^" + message.replace("(", r"\(")):
        MetaSGD(**options)


def test_rates_start_at_inner_lr_for_the_adapted_weights() -> None:
    model = tiny_mlp()
    rates = MetaSGD(inner_lr=0.3).init_meta_parameters(model, ("4.weight",))
    assert rates.keys() == {"inner_lr"} and rates["inner_lr"].keys() == {"4.weight"}
    assert torch.equal(rates["inner_lr"]["4.weight"], torch.full_like(model[4].weight, 0.3))
    assert F.mse_loss is LOSSES["mse"]
