"""The compiled inner loop (`algorithm.compile=true`) against the plain per-task loop."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch._dynamo
from helpers import adapt_copy, assert_trees_close, meta_gradients, sine_tasks
from torch._dynamo.utils import counters

from reptile.algorithms import ANIL, MAML, MetaSGD, Reptile
from reptile.algorithms.params import broadcast, task_mean
from reptile.config import ConfigValueError
from reptile.models.mlp import MLP

pytestmark = pytest.mark.skipif(
    shutil.which(torch._inductor.config.cpp.cxx[0] or "g++") is None,
    reason="torch.compile's CPU backend (inductor) needs a C++ compiler, and none is installed",
)
STEPS = 2


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_compiled_inner_loop_equals_per_task_loop_and_compiles_once(name: str) -> None:
    """k = 2 on a tiny MLP, three meta-iterations with Adam's state carried between them (its
    step count grows): the same weights as the deep-copy loop, and one graph per shape."""
    torch.manual_seed(0)
    model = MLP(hidden=(8,))
    algorithm = Reptile(inner_optimizer=name, inner_lr=0.01, inner_steps=STEPS, compile=True)
    inner = algorithm.inner_loop(model, "mse")
    tasks = 3
    task = sine_tasks(tasks, STEPS, 4)
    phi = {n: p.detach() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    counters.clear()
    state, loop_state = inner.init_state(phi), None
    for _ in range(3):
        adapted, tasks_state, _ = inner.adapt(
            broadcast(phi, tasks), broadcast(state, tasks), task, STEPS
        )
        state = task_mean(tasks_state)
        optimizers = []
        for index in range(tasks):
            expected, optimizer = adapt_copy(model, task, index, STEPS, name, state=loop_state)
            optimizers.append(optimizer)
            for key, value in expected.items():
                torch.testing.assert_close(adapted[key][index], value, rtol=1e-5, atol=1e-6)
        if name == "adam":  # carry the tasks' mean moments, as the project does
            loop_state = optimizers[0].state_dict()
            for slot, moments in loop_state["state"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    moments[key] = torch.stack(
                        [o.state_dict()["state"][slot][key] for o in optimizers]
                    ).mean(0)
    # Adam's growing step count: one graph, then one in which it is symbolic; never more.
    assert counters["stats"]["unique_graphs"] == (2 if name == "adam" else 1)


def test_compile_is_a_checked_boolean_that_maml_refuses() -> None:
    with pytest.raises(ConfigValueError, match=r"^compile='yes': expected true or false"):
        Reptile(compile="yes")
    with pytest.raises(ConfigValueError, match=r"^compile=True: expected false \(MAML"):
        MAML(inner_optimizer="sgd", compile=True)


@pytest.mark.parametrize(
    "algorithm",
    [ANIL(inner_optimizer="adam"), MetaSGD()],
    ids=["anil", "meta_sgd"],
)
def test_compiled_partial_and_learned_rate_inner_loops_equal_eager(algorithm) -> None:
    """ANIL's inner loop steps the head alone, Meta-SGD's at learned per-weight rates carried in
    its state: compiled, both give the eager meta-gradient, for every meta-parameter."""
    torch.manual_seed(0)
    model, task = MLP(hidden=(8,)), sine_tasks(3, 3, 4)
    options = dict(inner_steps=3, inner_batch_size=4, inner_lr=0.01)
    eager = dataclasses.replace(algorithm, **options)
    compiled = dataclasses.replace(eager, compile=True)
    torch._dynamo.reset()
    expected = meta_gradients(eager, model, task)
    actual = meta_gradients(compiled, model, task)
    assert actual.keys() == expected.keys()
    for group in expected:
        assert_trees_close(actual[group], expected[group], rtol=1e-5, atol=1e-7)
