"""The Lightning wrapper of a task distribution: its loaders as the Trainer's device wants them."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from helpers import GPU

from reptile.data.sine import SineWaves
from reptile.lightning.datamodule import TaskDataModule


@pytest.mark.parametrize("accelerator", ["cpu", GPU])
def test_loaders_pin_memory_exactly_when_the_trainer_is_on_a_gpu(accelerator: str) -> None:
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=3, logger=False)
    datamodule = TaskDataModule(SineWaves(meta_batch_size=2, num_val_tasks=2))
    datamodule.trainer = trainer
    on_gpu = accelerator == "gpu"
    assert datamodule.train_dataloader().pin_memory is on_gpu
    assert datamodule.val_dataloader().pin_memory is on_gpu
