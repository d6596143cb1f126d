"""The project's Lightning callbacks in a real Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
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


def test_a_resumed_runs_bar_counts_meta_iterations_from_the_checkpoint_to_max_steps(
    tmp_path: Path,
) -> None:
    """Lightning shows a resumed run's batches without name or total, and restarts its count when
    the resumed epoch ends early (conf/trainer explains why it does)."""
    bar = MetaIterationBar(log_refresh_rate=1)
    shown: list[tuple[str, int, int]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, *_: Any) -> None:
            tqdm = bar.train_progress_bar
            shown.append((tqdm.desc, tqdm.n, tqdm.total))

    def fit(callbacks: list[pl.Callback], ckpt_path: str | None = None) -> None:
        learner = MetaLearner(MLP(hidden=(8,)), Reptile(inner_steps=1, inner_batch_size=5), "mse")
        data = TaskDataModule(SineWaves(meta_batch_size=2, num_val_tasks=0))
        trainer = quiet_trainer(
            accelerator="cpu",  # on a GPU the bar refreshes every log_every_n_steps only
            max_steps=6,
            callbacks=callbacks,
            enable_progress_bar=True,
            reload_dataloaders_every_n_epochs=1,
        )
        trainer.fit(learner, datamodule=data, ckpt_path=ckpt_path)

    fit([pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)])
    fit([bar, Watch()], ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"))
    assert shown == [("meta-iterations: ", step, 6) for step in (3, 4, 5, 6)]
