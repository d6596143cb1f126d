"""The training pipeline behind `python train.py`: build everything from the config, fit, test."""

from __future__ import annotations

import logging
import warnings
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

from reptile.config import ConfigValueError, require, require_int
from reptile.lightning.callbacks import AtomicCheckpointIO
from reptile.lightning.launch import distributed_job, launch_ranks_as_jobs
from reptile.lightning.module import MetaLearner
from reptile.lightning.resume import ResumeState, wandb_run_id

log = logging.getLogger(__name__)

# Lightning's advice for manual optimization does not apply: φ after the outer step, with the
# step counter that goes with it, is exactly the state a resumed run needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def sweep_group() -> str | None:
    """The W&B group of a multirun's jobs: the sweep directory's name; None for a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = HydraConfig.get().sweep
    return f"{HydraConfig.get().job.name}-{Path(sweep.dir).name}"


def has_bf16_units(device: str) -> bool:
    """Whether `device` ("cpu" or "cuda") has bfloat16 matrix units: tensor cores, or AMX."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def fastest_precision() -> str:
    """bf16-mixed where the device a run gets by default (the GPU if any, else the CPU) has
    bfloat16 matrix units, otherwise 32-true. The few-shot presets train with it: on Omniglot
    5-way 1-shot at 6,000 meta-iterations it scored within the 95 % interval of float32."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16-mixed" if has_bf16_units(device) else "32-true"


OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("fastest_precision", fastest_precision, replace=True)


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


def instantiate_logger(cfg: DictConfig, name: str, ckpt_path: str | None) -> Any:
    """Logger `name`; a W&B run resumed from a checkpoint continues the checkpoint's W&B run."""
    run_id = None
    if ckpt_path and issubclass(get_class(cfg.logger[name]._target_), WandbLogger):
        run_id = wandb_run_id(ckpt_path)
    options = {"id": run_id, "resume": "allow"} if run_id else {}
    return instantiate_group(cfg.logger, name, **options)


def build(
    cfg: DictConfig, ckpt_path: str | None = None
) -> tuple[pl.LightningDataModule, MetaLearner, pl.Trainer]:
    """Every object of a run, checked before anything trains."""
    check_run_settings(cfg, ckpt_path)
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
    loggers = [instantiate_logger(cfg, name, ckpt_path) for name in cfg.get("logger") or {}]
    callbacks = [instantiate_group(cfg.callbacks, name) for name in cfg.get("callbacks") or {}]
    trainer = instantiate_group(
        cfg,
        "trainer",
        logger=loggers or False,
        callbacks=[*callbacks, ResumeState()],
        plugins=[AtomicCheckpointIO()],
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return datamodule, module, trainer


def finish_wandb_runs(loggers: list[Any]) -> None:
    """End this job's W&B run: WandbLogger leaves it open, and the next job of a multirun in the
    same process (basic or joblib launcher) would otherwise log into it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):  # on ranks > 0 a no-op stand-in
            logger.experiment.finish()


def run(cfg: DictConfig) -> float | None:
    """Fit and test as `cfg` says; returns `cfg.optimized_metric` for hyperparameter searches."""
    pl.seed_everything(cfg.seed, workers=True)
    launch_ranks_as_jobs()
    ckpt_path = resume_path(cfg)
    metrics: dict[str, Any] = {}  # testing replaces the trainer's metrics: collect each stage's
    with distributed_job():
        datamodule, module, trainer = build(cfg, ckpt_path)
        try:
            if cfg.train:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
                metrics.update(trainer.callback_metrics)
            if cfg.test:
                test_ckpt = None if cfg.train else ckpt_path
                trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt)
                metrics.update(trainer.callback_metrics)
        except ConfigValueError as error:
            # Datasets check sizes (ways, shots, devices) once their data and ranks are known.
            raise error.under("dataset") from None
        finally:
            finish_wandb_runs(trainer.loggers)
    metric = cfg.get("optimized_metric")
    value = metrics.get(metric) if metric else None
    return None if value is None else float(value)
