"""The throughput metrics through the real Trainer: logged every log_every_n_steps meta-iterations
and per evaluation, and never written to results.json."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from helpers import quiet_trainer

from reptile.algorithms import Reptile
from reptile.data.sine import SineWaves
from reptile.lightning.callbacks import ResultsWriter
from reptile.lightning.datamodule import TaskDataModule
from reptile.lightning.module import MetaLearner
from reptile.lightning.speed import Speed
from reptile.models.mlp import MLP


class Recorder(pl.Callback):
    """Every speed metric as logged, in order."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
        self.record(trainer)

    def on_test_end(self, trainer: pl.Trainer, *_: object) -> None:
        self.record(trainer)

    def record(self, trainer: pl.Trainer) -> None:
        for name, value in trainer.callback_metrics.items():
            if name.startswith("speed/") and (name, float(value)) not in self.logged:
                assert torch.isfinite(value) and value > 0
                self.logged.append((name, float(value)))


def test_speed_is_logged_per_interval_and_per_evaluation(tmp_path) -> None:
    torch.manual_seed(0)
    learner = MetaLearner(MLP(hidden=(8,)), Reptile(eval_inner_steps=2), loss="mse")
    recorder = Recorder()
    trainer = quiet_trainer(
        max_steps=9,
        log_every_n_steps=3,
        callbacks=[Speed(), recorder, ResultsWriter(str(tmp_path / "results.json"))],
    )
    tasks = SineWaves(meta_batch_size=2, num_val_tasks=0, num_test_tasks=4, grid_points=20)
    trainer.fit(learner, datamodule=TaskDataModule(tasks))
    trainer.test(learner, datamodule=TaskDataModule(tasks))
    names = [name for name, _ in recorder.logged]
    assert names == ["speed/meta_iterations_per_s"] * 3 + ["speed/test_tasks_per_s"]
    assert not any("speed" in line for line in (tmp_path / "results.json").read_text().split())
