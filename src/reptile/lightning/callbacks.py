"""Callbacks: run outputs (results.json, the adaptation plot, the logged config, the progress bar),
crash-safe checkpoints, and stopping on a signal with a checkpoint."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from pytorch_lightning.trainer.connectors.signal_connector import _SignalConnector

from reptile.checkpoints import checkpoint_step
from reptile.cli import STOP_SIGNALS, Interrupted, stop_request
from reptile.data.tasks import collate_tasks
from reptile.files import atomic_file, write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        with atomic_file(Path(path)) as file:
            torch.save(checkpoint, file)


class ResultsWriter(pl.Callback):
    """Writes the final test metrics, under their logged names, to a JSON file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        results = {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith("test/")
        }
        text = json.dumps(results, indent=2) + "\n"
        write_atomically(self.path, text.encode())


class AdaptationPlot(pl.Callback):
    """After testing, plots predictions on a few test tasks before and after adaptation."""

    def __init__(self, path: str, num_tasks: int = 4) -> None:
        self.path = Path(path)
        self.num_tasks = num_tasks

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        tasks = datamodule.eval_tasks("test")
        task = collate_tasks([tasks[i] for i in range(min(self.num_tasks, len(tasks)))])
        task = {key: value.to(pl_module.device) for key, value in task.items()}
        last = pl_module.algorithm.eval_inner_steps
        with torch.no_grad():
            params = pl_module.adapted_params(task, sorted({0, min(1, last), last}))
            predictions = {steps: pl_module.predict(p, task) for steps, p in params.items()}
        if not datamodule.tasks.plot_adaptation(predictions, task, self.path):
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="test/adaptation", images=[str(self.path)])


class LogConfig(pl.Callback):
    """Logs the run's whole config to every logger once the data is ready (Lightning starts the
    W&B run just before): a run whose data cannot be loaded leaves no W&B run behind."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            logger.log_hyperparams(pl_module.run_config)


class MetaIterationBar(TQDMProgressBar):
    """Lightning's progress bar, counting meta-iterations: training is one epoch of `max_steps`,
    and the default's "Epoch 0/-2" (of an unlimited number) says nothing. The logger's version
    number (`v_num`) is left out too. Written to a file or a scheduler's log instead of a
    terminal, it refreshes every `log_refresh_rate` meta-iterations, not at every one; on an
    accelerator at most every `trainer.log_every_n_steps` (reading the bar's metrics is a host
    sync, which stalls the device's queue of kernels)."""

    def __init__(self, log_refresh_rate: int = 100) -> None:
        super().__init__(refresh_rate=1 if sys.stderr.isatty() else log_refresh_rate)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if pl_module.device.type != "cpu":
            self._refresh_rate = max(self._refresh_rate, trainer.log_every_n_steps)
        if trainer.fit_loop.restarted_mid_epoch:
            # Lightning skips on_train_epoch_start then, and every resume is mid-epoch here.
            self._count_meta_iterations(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._count_meta_iterations(trainer)

    def _count_meta_iterations(self, trainer: pl.Trainer) -> None:
        """Counts meta-iterations up to `max_steps` from where this process starts, so that its
        rate and time left are this process's."""
        bar = self.train_progress_bar
        bar.total = trainer.max_steps
        bar.initial = bar.n = trainer.global_step
        bar.set_description("meta-iterations")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, _: int
    ) -> None:
        # Lightning shows the batch's index in its epoch; a resumed run has two epochs (see
        # conf/trainer's reload_dataloaders_every_n_epochs), so the meta-iteration is shown.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_exception(self, trainer: pl.Trainer, *args: Any) -> None:
        """Closes the bars, so that the failure's line comes after them, not under a redrawn bar."""
        # The evaluation bars first: closing one moves the cursor back up to the training bar.
        bars = (self._test_progress_bar, self._val_progress_bar, self._train_progress_bar)
        for bar in bars:
            if bar is not None:
                bar.close()


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    checkpointing = trainer.checkpoint_callback
    if checkpointing is not None and getattr(checkpointing, "dirpath", None):
        return Path(checkpointing.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


class StopOnSignal(pl.Callback):
    """Acts on the SIGTERM or SIGINT that `reptile.cli.stop_request` recorded during a stage.

    At the end of a meta-iteration: writes `last.ckpt` (the state the periodic checkpoints hold,
    from which a resumed run continues exactly) and stops. All DDP ranks get the signal (from the
    scheduler, or forwarded by rank 0) and agree on the step by one all-reduce per meta-iteration.
    During validation or testing: stops after the current batch without a collective (the ranks
    may hold different numbers of evaluation batches), naming the latest checkpoint.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        signum = stop_request.signum or 0
        if trainer.world_size > 1:
            agreed = torch.tensor(signum, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(agreed, reduce_op="max"))
        if signum:
            path = checkpoint_dir(trainer) / "last.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # everything, not φ alone
            raise Interrupted(signum, trainer.global_step, path)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.stop_if_signalled(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.stop_if_signalled(trainer)

    @staticmethod
    def stop_if_signalled(trainer: pl.Trainer) -> None:
        """Stops now if a signal came, naming the latest checkpoint (during evaluation, or
        after a stage that ended before acting on it)."""
        if stop_request.signum is None:
            return
        path = Path(trainer.ckpt_path or checkpoint_dir(trainer) / "last.ckpt")
        step = checkpoint_step(path) if path.is_file() else None
        raise Interrupted(stop_request.signum, step, path if step is not None else None)


class SignalConnector(_SignalConnector):
    """Lightning's signal handling with SIGTERM and SIGINT handed to `reptile.cli.stop_request`.

    Lightning's own SIGTERM handler lets the run end as if it had finished (exit code 0, no
    checkpoint, the W&B run marked finished). Its SLURM requeue signal handling is kept.
    """

    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()
        launcher = self.trainer.strategy.launcher
        forward = launcher.kill if isinstance(launcher, _SubprocessScriptLauncher) else None
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, stop_request.handle)
        stop_request.defer(forward)

    def teardown(self) -> None:
        stop_request.stop_deferring()
        super().teardown()  # restores the handlers from before the stage: stop_request's
