"""Every inner-loop backend against a plain per-task loop on deep-copied modules; selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import adapt_copy
from torch import nn
from torch.func import grad

from reptile.algorithms.folded import folded_forward
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.optimizers import SGD, Adam
from reptile.algorithms.params import broadcast
from reptile.config import ConfigValueError
from reptile.models.conv4 import Conv4
from reptile.models.mlp import MLP

TASKS, SAMPLES, BATCH, STEPS = 3, 6, 4, 3

# name: (model, input shape, classes; 0 = regression)
MODELS = {
    "mlp": (lambda: MLP(hidden=(8, 8)), (1,), 0),
    "conv4-omniglot": (lambda: Conv4(1, 3, hidden=4, image_size=8), (1, 8, 8), 3),
    "conv4-pool": (
        lambda: Conv4(3, 3, hidden=4, stride=1, max_pool=True, image_size=9),
        (3, 9, 9),
        3,
    ),
}


def make_task(shape: tuple[int, ...], classes: int) -> dict[str, torch.Tensor]:
    inputs = torch.randn(TASKS, SAMPLES, *shape)
    if classes:
        targets = torch.randint(0, classes, (TASKS, SAMPLES))
    else:
        targets = torch.randn(TASKS, SAMPLES, 1)
    index = torch.stack([torch.randperm(SAMPLES)[:BATCH] for _ in range(TASKS * STEPS)])
    return {
        "support_inputs": inputs,
        "support_targets": targets,
        "batch_index": index.view(TASKS, STEPS, BATCH),
    }


@pytest.mark.parametrize("backend", ["folded", "vmap"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(MODELS))
def test_inner_loop_equals_per_task_loop(name: str, optimizer: str, backend: str) -> None:
    build, shape, classes = MODELS[name]
    model = build()
    loss = "cross_entropy" if classes else "mse"
    inner_optimizer = Adam(0.01) if optimizer == "adam" else SGD(0.01)
    inner = InnerLoop(model, loss, inner_optimizer, backend=backend)
    task = make_task(shape, classes)
    params = broadcast({n: p.detach() for n, p in model.named_parameters()}, TASKS)
    adapted, _, losses = inner.adapt(params, inner_optimizer.init(params), task, STEPS)
    assert losses.shape == (STEPS, TASKS)
    loss_fn = F.cross_entropy if classes else F.mse_loss
    for index in range(TASKS):
        expected, _ = adapt_copy(model, task, index, STEPS, optimizer, 0.01, loss_fn)
        for key, value in expected.items():
            # Batch norm over 4 samples of 1×1 pixels magnifies rounding: vmap differs as much.
            torch.testing.assert_close(adapted[key][index], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_folded_predictions_equal_vmap(name: str) -> None:
    build, shape, classes = MODELS[name]
    model = build()
    loss = "cross_entropy" if classes else "mse"
    folded = InnerLoop(model, loss, SGD(0.1), backend="folded")
    plain = InnerLoop(model, loss, SGD(0.1), backend="vmap")
    params = {
        n: p.detach() + 0.01 * torch.randn(TASKS, *p.shape) for n, p in model.named_parameters()
    }
    query = torch.randn(TASKS, 5, *shape)
    torch.testing.assert_close(
        folded.predict(params, query, query, transductive=True),
        plain.predict(params, query, query, transductive=True),
        rtol=1e-5,
        atol=1e-5,
    )


def test_differentiating_through_the_inner_loop_uses_vmap() -> None:
    """MAML takes `torch.func.grad` of the adapted weights: the folded backend steps aside."""
    build, shape, classes = MODELS["conv4-omniglot"]
    model = build()
    task = make_task(shape, classes)
    phi = {n: p.detach() for n, p in model.named_parameters()}

    def through(inner: InnerLoop):
        def adapted_sum(phi):
            params = broadcast(phi, TASKS)
            adapted, _, _ = inner.adapt(params, {}, task, STEPS)
            return sum(p.square().sum() for p in adapted.values())

        return grad(adapted_sum)(phi)

    folded = through(InnerLoop(model, "cross_entropy", SGD(0.1), backend="folded"))
    plain = through(InnerLoop(model, "cross_entropy", SGD(0.1), backend="vmap"))
    for key, value in plain.items():
        torch.testing.assert_close(folded[key], value, rtol=1e-4, atol=1e-5)


class Unfoldable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.linear(x))


@pytest.mark.parametrize(
    "model",
    [Unfoldable(), nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), nn.LayerNorm(3)],
    ids=["function", "running-stats", "layer-norm"],
)
def test_models_that_cannot_fold_keep_vmap(model: nn.Module) -> None:
    assert folded_forward(model) is None
    assert InnerLoop(model, "mse", SGD(0.1)).folded is None  # auto
    with pytest.raises(ConfigValueError, match=r"^backend='folded': expected auto or vmap"):
        InnerLoop(model, "mse", SGD(0.1), backend="folded")


def test_auto_folds_the_reference_models_and_rejects_unknown_backends() -> None:
    for build, _, _ in MODELS.values():
        assert InnerLoop(build(), "mse", SGD(0.1)).folded is not None
    with pytest.raises(ConfigValueError, match=r"^backend='jit': expected one of auto, folded"):
        InnerLoop(MLP(), "mse", SGD(0.1), backend="jit")
