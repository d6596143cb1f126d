"""Evaluation within a memory budget: chunked adaptation and scoring equal one pass over all
tasks, and the activation estimate that sizes the chunks, worked by hand."""

from __future__ import annotations

import torch
from torch import nn

from reptile.algorithms import Reptile
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.optimizers import SGD
from reptile.lightning.module import MetaLearner
from reptile.models.conv4 import Conv4


def image_tasks(tasks: int, steps: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5).expand(tasks, 5).clone()
    index = [torch.randperm(5, generator=generator) for _ in range(tasks * steps)]
    return {
        "support_inputs": torch.rand(tasks, 5, 1, 28, 28, generator=generator),
        "support_targets": labels,
        "query_inputs": torch.rand(tasks, 5, 1, 28, 28, generator=generator),
        "query_targets": labels,
        "batch_index": torch.stack(index).view(tasks, steps, 5),
    }


def test_chunked_evaluation_scores_every_task_as_one_pass_does() -> None:
    torch.manual_seed(0)
    model, task = Conv4(1, 5, hidden=8), image_tasks(tasks=6, steps=5)
    scores = []
    for budget in (10**6, 1):  # everything at once; one task at a time
        algorithm = Reptile(eval_inner_steps=5, eval_memory_mib=budget)
        learner = MetaLearner(model, algorithm, loss="cross_entropy", score_after="acc")
        meta = learner.meta_parameters()
        scores.append(algorithm.evaluate(learner.inner, meta, None, task, learner.score_plan))
    assert scores[0].keys() == {"acc", "acc_transductive"}
    for name in scores[0]:
        assert torch.equal(scores[0][name], scores[1][name])


def test_activation_bytes_of_an_mlp_worked_by_hand() -> None:
    """Linear 3→4, ReLU, Linear 4→2 in float32: per sample 16 + 16 + 8 bytes, largest 16."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    inner = InnerLoop(model, "mse", SGD(0.1))
    assert inner.activation_bytes(torch.zeros(7, 3)) == (40, 16)
