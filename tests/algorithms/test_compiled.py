"""The compiled meta-step (`algorithm.compile=true`) against the plain per-task loop."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
import torch._dynamo
from helpers import (
    GPU,
    adapt_copy,
    assert_trees_close,
    meta_gradients,
    quiet_trainer,
    sine_tasks,
    weights,
)
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader
from train_process import TINY

from reptile.algorithms import ANIL, MAML, MetaSGD, Reptile
from reptile.config import ConfigValueError
from reptile.job import run_job
from reptile.lightning.module import MetaLearner
from reptile.models.mlp import MLP

pytestmark = pytest.mark.skipif(
    shutil.which(torch._inductor.config.cpp.cxx[0] or "g++") is None,
    reason="torch.compile's CPU backend (inductor) needs a C++ compiler, and none is installed",
)
STEPS = 2


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_compiled_meta_step_equals_per_task_loop_and_compiles_at_most_twice(
    name: str,
) -> None:
    """k = 2 on a tiny MLP, four meta-iterations with the inner state carried between them (Adam's
    step count grows), φ moved by ε = 0.5 after each: the meta-gradient and the carried moments
    of the deep-copy loop; one graph, and for Adam one more in which its step count is
    symbolic; never more."""
    torch.manual_seed(0)
    model = MLP(hidden=(8,))
    algorithm = Reptile(inner_optimizer=name, inner_lr=0.01, inner_steps=STEPS, compile=True)
    inner = algorithm.inner_loop(model, "mse")
    tasks = 3

    torch._dynamo.reset()
    counters.clear()
    carried, loop_state = None, None
    for meta_iteration in range(4):
        task = sine_tasks(tasks, STEPS, 4, first=tasks * meta_iteration)
        phi = {n: p.detach().clone() for n, p in model.named_parameters()}
        step = algorithm.meta_step(inner, {"phi": phi}, carried, task)
        carried = step.state
        adapted, optimizers = [], []
        for index in range(tasks):
            weights, optimizer = adapt_copy(model, task, index, STEPS, name, state=loop_state)
            adapted.append(weights)
            optimizers.append(optimizer)
        expected = {n: p - torch.stack([w[n] for w in adapted]).mean(0) for n, p in phi.items()}
        assert_trees_close(step.gradient["phi"], expected, rtol=1e-5, atol=1e-6)
        if name == "adam":  # carry the tasks' mean moments, as the project does
            loop_state = optimizers[0].state_dict()
            for slot, moments in loop_state["state"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    moments[key] = torch.stack(
                        [o.state_dict()["state"][slot][key] for o in optimizers]
                    ).mean(0)
            for slot, parameter in enumerate(phi):
                torch.testing.assert_close(
                    carried["exp_avg_sq"][parameter], loop_state["state"][slot]["exp_avg_sq"]
                )
        with torch.no_grad():
            for n, p in model.named_parameters():
                p -= 0.5 * step.gradient["phi"][n]
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


@pytest.mark.parametrize("accelerator", ["cpu", GPU])
@pytest.mark.parametrize(("inner", "outer"), [("adam", "sgd"), ("sgd", "adam")])
def test_compiled_training_reaches_the_eager_phi(accelerator: str, inner: str, outer: str) -> None:
    """Four meta-iterations through the real Trainer, ε annealed, the inner state carried: with
    the meta-step compiled (on a GPU replayed as a CUDA graph), φ, the outer optimizer's state and
    the carried inner state are the eager run's."""
    meta_batches = [sine_tasks(3, STEPS, 4, first=3 * step) for step in range(4)]
    runs = {}
    for compile in (False, True):
        torch.manual_seed(0)
        algorithm = Reptile(
            inner_optimizer=inner,
            inner_lr=0.01,
            inner_steps=STEPS,
            inner_batch_size=4,
            outer_optimizer=outer,
            meta_lr=0.5 if outer == "sgd" else 0.01,
            compile=compile,
        )
        learner = MetaLearner(MLP(hidden=(8,)), algorithm, loss="mse")
        trainer = quiet_trainer(max_steps=len(meta_batches), accelerator=accelerator, devices=1)
        counters.clear()
        trainer.fit(learner, train_dataloaders=DataLoader(meta_batches, batch_size=None))
        assert bool(counters["stats"]["unique_graphs"]) == compile
        outer_state = trainer.optimizers[0].state_dict()["state"]
        runs[compile] = (weights(learner.model), outer_state, learner.inner_state)
    (phi, outer_state, inner_state), expected = runs[True], runs[False]
    tolerance = {"rtol": 1e-5, "atol": 1e-6}
    assert_trees_close(phi, expected[0], **tolerance)
    for slot, moments in expected[1].items():
        assert_trees_close(outer_state[slot], moments, **tolerance)
    torch.testing.assert_close(inner_state, expected[2], **tolerance)


def test_each_job_of_a_multirun_in_one_process_compiles_its_own_meta_step(compose) -> None:
    """The basic and joblib launchers run a sweep's jobs in one process. Dynamo keeps at most
    `recompile_limit` graphs per function (8; here 1, to see it at the second job) and then runs
    it eager, silently: each job starts from empty caches instead."""
    graphs = []
    with torch._dynamo.config.patch(recompile_limit=1):  # monkeypatch's undo breaks the config
        for inner_steps in (1, 2):
            counters.clear()
            overrides = ("algorithm.compile=true", f"algorithm.inner_steps={inner_steps}")
            run_job(compose(*TINY, "logger=none", *overrides))
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1]
