"""The Reptile update through the real LightningModule and Trainer, against cases worked by hand."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from reptile.algorithms import Reptile
from reptile.lightning.module import MetaLearner


def hand_worked_tasks() -> dict[str, torch.Tensor]:
    """Two tasks for y = w·x: slopes 2 and −1, points x = 1, 2, both points in every batch."""
    x = torch.tensor([[1.0], [2.0]])
    return {
        "support_inputs": torch.stack([x, x]),
        "support_targets": torch.stack([2 * x, -1 * x]),
        "query_inputs": torch.zeros(2, 0, 1),
        "query_targets": torch.zeros(2, 0, 1),
        "batch_index": torch.tensor([[[0, 1], [0, 1]], [[0, 1], [0, 1]]]),
    }


def train_one_meta_iteration(algorithm: Reptile, tasks: dict[str, torch.Tensor]) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    module = MetaLearner(model, algorithm, loss="mse", score_after="mse_after")
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([tasks], batch_size=None))
    return model


def test_reptile_update_equals_hand_computation() -> None:
    """Inner SGD, lr 0.1, k = 2, from w = 0, loss mean((w·x − y)²):
    slope 2:  grad −10 → w = 1;    grad −5  → w = 1.5
    slope −1: grad  5  → w = −0.5; grad 2.5 → w = −0.75
    mean W = 0.375; φ ← 0 + ε·(0.375 − 0) = 0.1875 with ε = 0.5."""
    algorithm = Reptile(
        inner_optimizer="sgd",
        inner_lr=0.1,
        inner_steps=2,
        inner_batch_size=2,
        meta_lr=0.5,
        meta_lr_final=0.5,
    )
    model = train_one_meta_iteration(algorithm, hand_worked_tasks())
    assert model.weight.item() == pytest.approx(0.1875, abs=1e-7)


def test_serial_reptile_moves_toward_the_single_task_solution() -> None:
    """n = 1, ε = 1: φ becomes W itself, 1.5 for the slope-2 task above."""
    tasks = {key: value[:1] for key, value in hand_worked_tasks().items()}
    algorithm = Reptile(
        inner_optimizer="sgd",
        inner_lr=0.1,
        inner_steps=2,
        inner_batch_size=2,
        meta_lr=1.0,
        meta_lr_final=1.0,
    )
    model = train_one_meta_iteration(algorithm, tasks)
    assert model.weight.item() == pytest.approx(1.5, abs=1e-7)


def test_meta_lr_is_annealed_linearly() -> None:
    algorithm = Reptile(meta_lr=1.0, meta_lr_final=0.2)
    assert [algorithm.meta_lr_at(f) for f in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.6, 0.2])
