"""The training pipeline behind `python train.py`: check everything, build it, fit, test; and what
a failure prints and exits with (the codes: `reptile.cli`)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from reptile.cli import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_ERROR, JobFailed
from reptile.config import ConfigValueError, is_int, require, require_int, require_writable
from reptile.lightning.callbacks import (
    AtomicCheckpointIO,
    LogConfig,
    SignalConnector,
    StopOnSignal,
)
from reptile.lightning.launch import distributed_job, launch_ranks_as_jobs
from reptile.lightning.module import DivergenceError, MetaLearner
from reptile.lightning.resume import ResumeState, read_checkpoint, require_same_model

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


def instantiate_group(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(cfg[key])`, turning a bad value anywhere inside into one `key.field` error."""
    try:
        return instantiate(cfg[key], _convert_="object", **kwargs)
    except InstantiationException as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ConfigValueError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause.under(key) from None
    except ConfigValueError as error:
        raise error.under(key) from None


def resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path`; `last` names the last checkpoint of this run's directory, so that
    `hydra.run.dir=<run> ckpt_path=last` continues a run in place (None: no checkpoint yet)."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    checkpointing = (cfg.get("callbacks") or {}).get("model_checkpoint")
    require(
        checkpointing is not None,
        "ckpt_path",
        cfg.ckpt_path,
        "a checkpoint path (`last` needs callbacks.model_checkpoint)",
    )
    path = Path(checkpointing.dirpath) / "last.ckpt"
    if path.exists():
        return str(path)
    log.info("ckpt_path=last: no %s yet, starting from scratch", path)
    return None


def check_run_settings(cfg: DictConfig, ckpt_path: str | None) -> None:
    require_int("seed", cfg.seed, 0)
    if cfg.get("threads") is not None:
        require_int("threads", cfg.threads, 1)
    require_int("trainer.max_steps", cfg.trainer.max_steps, 1 if cfg.train else 0)
    require(cfg.train or ckpt_path, "ckpt_path", cfg.ckpt_path, "a checkpoint when train=false")


def check_folders(cfg: DictConfig) -> None:
    """Every folder the run will write to takes files: found now, not at the first checkpoint."""
    require_writable("paths.output_dir", cfg.paths.output_dir, cfg.paths.output_dir)
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            for field in ("dirpath", "save_dir", "path"):  # `path` names a file
                value = (node or {}).get(field)
                if value:
                    folder = Path(value).parent if field == "path" else value
                    require_writable(f"{group}.{name}.{field}", value, folder)


def configured_world_size(trainer: DictConfig) -> int | None:
    """The number of processes the trainer config asks for; None where it depends on the
    machine (`devices: -1` or `auto`: every GPU)."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    return devices * nodes if is_int(devices) and devices > 0 and is_int(nodes) else None


def check_world_size(datamodule: pl.LightningDataModule, world_size: int | None) -> None:
    """Before the DDP processes start (the datamodule checks it again once they run)."""
    if world_size is None:
        return
    size = datamodule.meta_batch_size
    accepted = f"a multiple of the number of devices ({world_size})"
    require(size % world_size == 0, "dataset.meta_batch_size", size, accepted)


@dataclass
class Job:
    """A run's parts, checked: everything but the trainer and the loggers."""

    ckpt_path: str | None
    checkpoint: dict[str, Any] | None
    datamodule: pl.LightningDataModule
    module: MetaLearner
    callbacks: list[pl.Callback]


def check(cfg: DictConfig) -> Job:
    """Every value, file and folder of a run, checked before any process, logger or file is
    created; a multirun checks each job's config with it before the first job starts."""
    ckpt_path = resume_path(cfg)
    check_run_settings(cfg, ckpt_path)
    checkpoint = read_checkpoint("ckpt_path", ckpt_path) if ckpt_path else None
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    algorithm = instantiate_group(cfg, "algorithm")
    # The algorithm says how tasks are walked through; the dataset draws them.
    datamodule = instantiate_group(
        cfg,
        "dataset",
        train_schedule=algorithm.train_schedule,
        eval_schedule=algorithm.eval_schedule(),
        tail_size=algorithm.tail_shots,
    )
    model = instantiate_group(cfg, "model")
    module = MetaLearner(
        model,
        algorithm,
        loss=datamodule.loss,
        score_before=datamodule.score_before,
        score_after=datamodule.score_after,
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    if checkpoint is not None:
        require_same_model("ckpt_path", ckpt_path, checkpoint, module.run_config["model"])
    callbacks = [instantiate_group(cfg.callbacks, name) for name in cfg.get("callbacks") or {}]
    check_folders(cfg)
    check_world_size(datamodule, configured_world_size(cfg.trainer))
    return Job(ckpt_path, checkpoint, datamodule, module, callbacks)


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
    logger = instantiate_group(cfg.logger, name, **options)
    if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
        # Lightning passes anonymous=None, which wandb warns about on every run.
        del logger._wandb_init["anonymous"]
    return logger


def make_trainer(cfg: DictConfig, job: Job) -> pl.Trainer:
    check_wandb_online(cfg)
    loggers = [instantiate_logger(cfg, name, job) for name in cfg.get("logger") or {}]
    trainer = instantiate_group(
        cfg,
        "trainer",
        logger=loggers or False,
        callbacks=[*job.callbacks, ResumeState(), StopOnSignal(), LogConfig()],
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=min(cfg.trainer.get("log_every_n_steps", 50), cfg.trainer.max_steps) or 1,
    )
    # SIGTERM and SIGINT stop with a checkpoint and their own exit code (Lightning's handler
    # would end the run as if it had finished).
    trainer._signal_connector = SignalConnector(trainer)
    check_world_size(job.datamodule, trainer.world_size)  # `devices: -1` is known by now
    return trainer


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, MetaLearner, pl.Trainer]:
    """Every object of a run, checked before anything trains."""
    job = check(cfg)
    return job.datamodule, job.module, make_trainer(cfg, job)


def exit_code(error: BaseException) -> int:
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else EXIT_ERROR
    if isinstance(error, ConfigValueError):
        return EXIT_BAD_INPUT
    if isinstance(error, DivergenceError):
        return EXIT_DIVERGED
    return EXIT_ERROR


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


def run(cfg: DictConfig) -> float | None:
    """Fit and test as `cfg` says; returns `cfg.optimized_metric` for hyperparameter searches."""
    pl.seed_everything(cfg.seed, workers=True)
    launch_ranks_as_jobs()
    metrics: dict[str, Any] = {}  # testing replaces the trainer's metrics: collect each stage's
    job = check(cfg)
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


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def failure_message(error: BaseException) -> str:
    if isinstance(error, (ConfigValueError, DivergenceError)):
        return f"error: {error}"
    return f"error: {type(error).__name__}: {error}"


def run_job(cfg: DictConfig) -> float | None:
    """`run`, a failure turned into one line and an exit code. A single run exits with the code;
    a multirun job raises JobFailed, and the sweeper runs the other jobs and lists the failures
    at the end. Unexpected errors keep their traceback. (A signal, `Interrupted`, stops a sweep
    as it stops a run: train.py reports it.)"""
    try:
        return run(cfg)
    except Exception as error:
        code = exit_code(error)
        if code == EXIT_ERROR and not is_multirun():
            raise  # Hydra prints the traceback
        if code == EXIT_ERROR:
            traceback.print_exc()
        message = failure_message(error)
        if rank_zero_only.rank == 0:  # DDP ranks fail alike: print once
            print(message, file=sys.stderr)
        if not is_multirun():
            sys.exit(code)
        raise JobFailed(code, message.removeprefix("error: ")) from None
