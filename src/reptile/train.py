"""The Lightning side of a job (`reptile.job` checks its config first): the module, the callbacks,
the loggers and the trainer; fit, test."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch._dynamo
from hydra.utils import get_class
from omegaconf import DictConfig
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from reptile.config import ConfigValueError, is_int, require
from reptile.job import Parts, check_parts, check_world_size, exit_code, instantiate_group
from reptile.lightning.callbacks import (
    AtomicCheckpointIO,
    LogConfig,
    SignalConnector,
    StopOnSignal,
)
from reptile.lightning.datamodule import TaskDataModule
from reptile.lightning.launch import distributed_job, launch_ranks_as_jobs
from reptile.lightning.module import MetaLearner
from reptile.lightning.resume import ResumeState

log = logging.getLogger(__name__)

# Lightning's advice for manual optimization does not apply: φ after the outer step, with the
# step counter that goes with it, is exactly the state a resumed run needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# A resumed run draws exactly the tasks of the uninterrupted one (they are addressed by step; a
# test checks it bit for bit): the loader needs no state of its own.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
# Evaluation scores are gathered across DDP ranks by their metrics before they are logged.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")
# Logging follows the global step, so a resumed run's shorter epoch logs as usual; a run shorter
# than the logging interval gets an interval it reaches (`make_trainer`).
warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller")


class NoAdvertisement(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(NoAdvertisement())


@dataclass
class Job:
    """A run's parts, checked: everything but the trainer and the loggers."""

    ckpt_path: str | None
    checkpoint: dict[str, Any] | None
    datamodule: TaskDataModule
    module: MetaLearner
    callbacks: list[pl.Callback]


def check(cfg: DictConfig, parts: Parts | None = None) -> Job:
    """Every part of a run, checked (the Lightning-free ones by `check_parts`, unless given)."""
    parts = parts or check_parts(cfg)
    tasks = parts.tasks
    module = MetaLearner(
        parts.model,
        parts.algorithm,
        loss=tasks.loss,
        score_before=tasks.score_before,
        score_after=tasks.score_after,
    )
    module.run_config = parts.run_config
    callbacks = [instantiate_group(cfg, f"callbacks.{name}") for name in cfg.get("callbacks") or {}]
    return Job(parts.ckpt_path, parts.checkpoint, TaskDataModule(tasks), module, callbacks)


def unreachable(url: str, timeout: float = 10.0) -> str | None:
    """Why `url` cannot be reached (through the proxies the environment names); None: it answers."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # it answered
    except OSError as error:  # URLError, timeouts
        return str(getattr(error, "reason", error))
    return None


def check_wandb_online(cfg: DictConfig) -> None:
    """An online W&B logger needs its server: without one, wandb.init waits 90 s, then fails."""
    if rank_zero_only.rank != 0 or os.environ.get("WANDB_MODE") in (
        "offline",
        "dryrun",
        "disabled",
    ):
        return
    for name, node in (cfg.get("logger") or {}).items():
        if not node or not issubclass(get_class(node._target_), WandbLogger) or node.get("offline"):
            continue
        import wandb

        url = wandb.setup().settings.base_url
        problem = unreachable(url)
        require(
            problem is None,
            f"logger.{name}.offline",
            node.get("offline"),
            "true (log offline, the default, and upload later with `wandb sync`) or a reachable "
            f"W&B server, but {url} cannot be reached ({problem})",
        )


def instantiate_logger(cfg: DictConfig, name: str, job: Job) -> Any:
    """Logger `name`. Resumed training continues the checkpoint's W&B run; an evaluation
    (train=false) gets a run of its own, never writing into the run that trained."""
    run_id = None
    resuming = cfg.train and job.checkpoint is not None
    if resuming and issubclass(get_class(cfg.logger[name]._target_), WandbLogger):
        run_id = job.checkpoint.get("wandb_run_id")
    options = {"id": run_id, "resume": "allow"} if run_id else {}
    logger = instantiate_group(cfg, f"logger.{name}", **options)
    if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
        # Lightning passes anonymous=None, which wandb warns about on every run.
        del logger._wandb_init["anonymous"]
    return logger


def check_devices(trainer: DictConfig) -> None:
    """The GPUs the trainer config asks for are on this machine. Checked in the job's own process
    (not by the sweep's check of every job first): a SLURM sweep is launched from a login node
    without GPUs."""
    if trainer.get("accelerator") not in ("gpu", "cuda"):
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    require(
        gpus > 0,
        "trainer.accelerator",
        trainer.accelerator,
        "cpu or auto: this machine has no CUDA GPU (trainer=ddp_cpu runs DDP in CPU processes)",
    )
    devices = trainer.get("devices")
    if is_int(devices):
        accepted = f"at most {gpus}, the GPUs of this machine, or -1 for all of them"
        require(devices <= gpus, "trainer.devices", devices, accepted)


def make_trainer(cfg: DictConfig, job: Job) -> pl.Trainer:
    check_devices(cfg.trainer)
    check_wandb_online(cfg)
    loggers = [instantiate_logger(cfg, name, job) for name in cfg.get("logger") or {}]
    # No validation tasks: no validation loop either (else Lightning warns of an empty loader).
    no_validation = (
        {"limit_val_batches": 0} if not job.datamodule.tasks.num_eval_tasks["val"] else {}
    )
    trainer = instantiate_group(
        cfg,
        "trainer",
        **no_validation,
        logger=loggers or False,
        callbacks=[*job.callbacks, ResumeState(), StopOnSignal(), LogConfig()],
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=min(cfg.trainer.get("log_every_n_steps", 50), cfg.trainer.max_steps) or 1,
    )
    # SIGTERM and SIGINT stop with a checkpoint and their own exit code (Lightning's handler
    # would end the run as if it had finished).
    trainer._signal_connector = SignalConnector(trainer)
    check_world_size(job.datamodule.tasks, trainer.world_size)  # `devices: -1` is known now
    return trainer


def build(cfg: DictConfig) -> tuple[TaskDataModule, MetaLearner, pl.Trainer]:
    """Every object of a run, checked before anything trains."""
    job = check(cfg)
    return job.datamodule, job.module, make_trainer(cfg, job)


def finish_wandb_runs(loggers: list[Any], code: int) -> None:
    """End this job's W&B run with the process's exit code (W&B marks it failed unless 0).
    WandbLogger leaves it open, and the next job of a multirun in the same process (basic or
    joblib launcher) would otherwise log into it. A run never started (on ranks > 0, or before
    the data loaded) is not started now."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=code)


# Checkpoints are read with torch.load(weights_only=True): tensors and plain containers only.
SAFE_LOAD = {"weights_only": True}


def run(cfg: DictConfig, parts: Parts) -> float | None:
    """Fit and test as `cfg` says; returns `cfg.optimized_metric` for hyperparameter searches."""
    job = check(cfg, parts)
    if job.module.algorithm.compile:
        # The jobs of a multirun can share this process (basic and joblib launchers): past
        # dynamo's 8 graphs per function, later jobs would silently run eager.
        torch._dynamo.reset()
    pl.seed_everything(cfg.seed, workers=True)
    launch_ranks_as_jobs()
    metrics: dict[str, Any] = {}  # testing replaces the trainer's metrics: collect each stage's
    with distributed_job():
        trainer = make_trainer(cfg, job)
        code = 0
        try:
            if cfg.train:
                trainer.fit(
                    job.module, datamodule=job.datamodule, ckpt_path=job.ckpt_path, **SAFE_LOAD
                )
                StopOnSignal.stop_if_signalled(trainer)
                metrics.update(trainer.callback_metrics)
            if cfg.test:
                test_ckpt = None if cfg.train else job.ckpt_path
                trainer.test(
                    job.module, datamodule=job.datamodule, ckpt_path=test_ckpt, **SAFE_LOAD
                )
                StopOnSignal.stop_if_signalled(trainer)
                metrics.update(trainer.callback_metrics)
        except BaseException as error:
            code = exit_code(error)
            if isinstance(error, ConfigValueError):
                # Datasets check sizes (ways, shots, devices) once their data and ranks are known.
                raise error.under("dataset") from None
            raise
        finally:
            finish_wandb_runs(trainer.loggers, code)
    metric = cfg.get("optimized_metric")
    value = metrics.get(metric) if metric else None
    return None if value is None else float(value)
