"""On a GPU (skipped without one): the project's step there equals the CPU's, a training step
queues device work without a host sync, and evaluation sizes its chunks from the device's free
memory. (The meta-step replayed as a CUDA graph: tests/algorithms/test_compiled.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_trees_close, meta_gradients

from reptile.algorithms import ANIL, FOMAML, MetaSGD, Reptile
from reptile.lightning.module import MetaLearner
from reptile.models.conv4 import Conv4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def on(device: torch.device, tree: dict) -> dict:
    return {k: v.to(device) for k, v in tree.items()}


def image_tasks(tasks: int, steps: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randperm(10, generator=generator)[:5] for _ in range(tasks * steps)])
    return {
        "support_inputs": torch.rand(tasks, 10, 1, 28, 28, generator=generator, dtype=dtype),
        "support_targets": torch.arange(5).repeat(2).expand(tasks, 10).clone(),
        "batch_index": index.view(tasks, steps, 5),
    }


@pytest.mark.parametrize(
    "algorithm",
    [Reptile(), FOMAML(), ANIL(), MetaSGD(inner_lr=0.1)],
    ids=["reptile", "fomaml", "anil", "meta_sgd"],
)
def test_meta_gradients_on_the_gpu_equal_the_cpus(algorithm) -> None:
    """float64, folded backend: the same meta-gradient on both devices to rounding."""
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=8).double()
    task = image_tasks(3, algorithm.inner_steps, torch.float64)
    cpu = meta_gradients(algorithm, model, task, "cross_entropy")
    gpu = meta_gradients(algorithm, model.to(CUDA), on(CUDA, task), "cross_entropy")
    for group in cpu:
        assert_trees_close(on(torch.device("cpu"), gpu[group]), cpu[group], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_training_step_needs_no_host_sync(optimizer: str) -> None:
    """The meta-step and the divergence record only queue device work: under CUDA's sync debug
    mode "error", a host sync (`.item()`, a tensor's truth value, a copy to the CPU) raises."""
    torch.manual_seed(0)
    algorithm = Reptile(inner_steps=3, inner_batch_size=5, inner_optimizer=optimizer)
    learner = MetaLearner(Conv4(1, 5, hidden=8), algorithm, loss="cross_entropy").to(CUDA)
    task = on(CUDA, image_tasks(2, 3, torch.float32))
    state = None
    for meta_iteration in range(3):  # from the second on, the inner state is carried
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = algorithm.meta_step(learner.inner, learner.meta_parameters(), state, task)
            losses = torch.stack([step.losses[0].mean(), step.losses[-1].mean()])
            learner.record_divergence(meta_iteration, losses, step.gradient)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        state = step.state
    learner.raise_if_diverged()  # all finite: reading the record raises nothing


def test_evaluation_chunks_fill_a_quarter_of_free_memory() -> None:
    free = torch.cuda.mem_get_info(CUDA)[0]
    assert Reptile().eval_memory_bytes(CUDA) == free // 4
    assert Reptile(eval_memory_mib=100).eval_memory_bytes(CUDA) == 100 * 2**20
