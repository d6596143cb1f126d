"""The project's Lightning callbacks in a real Trainer."""

from __future__ import annotations

import pytest
from helpers import GPU, quiet_trainer

from reptile.algorithms import Reptile
from reptile.data.sine import SineWaves
from reptile.lightning.callbacks import MetaIterationBar
from reptile.lightning.datamodule import TaskDataModule
from reptile.lightning.module import MetaLearner
from reptile.models.mlp import MLP


@pytest.mark.parametrize("accelerator", ["cpu", GPU])
def test_the_bar_refreshes_at_most_every_logging_interval_on_an_accelerator(
    accelerator: str,
) -> None:
    bar = MetaIterationBar(log_refresh_rate=1)
    trainer = quiet_trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=2,
        log_every_n_steps=5,
        callbacks=[bar],
        enable_progress_bar=True,
    )
    learner = MetaLearner(MLP(hidden=(8,)), Reptile(inner_steps=2, inner_batch_size=5), "mse")
    trainer.fit(learner, datamodule=TaskDataModule(SineWaves(meta_batch_size=2, num_val_tasks=0)))
    assert bar.refresh_rate == (5 if accelerator == "gpu" else 1)
