"""The training pipeline behind `python train.py`: build everything from the config, fit, test."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reptile.config import ConfigValueError, require, require_int
from reptile.lightning.callbacks import AtomicCheckpointIO
from reptile.lightning.module import MetaLearner

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


OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)


def instantiate_group(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(cfg[key])`, turning a bad value anywhere inside into one `key.field` error."""
    try:
        return instantiate(cfg[key], _convert_="all", **kwargs)
    except InstantiationException as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ConfigValueError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause.under(key) from None
    except ConfigValueError as error:
        raise error.under(key) from None


def check_run_settings(cfg: DictConfig) -> None:
    require_int("seed", cfg.seed, 0)
    require_int("trainer.max_steps", cfg.trainer.max_steps, 1 if cfg.train else 0)
    require(cfg.train or cfg.ckpt_path, "ckpt_path", cfg.ckpt_path, "a checkpoint when train=false")


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, MetaLearner, pl.Trainer]:
    """Every object of a run, checked before anything trains."""
    check_run_settings(cfg)
    algorithm = instantiate_group(cfg, "algorithm")
    datamodule = instantiate_group(cfg, "dataset")
    model = instantiate_group(cfg, "model")
    module = MetaLearner(
        model,
        algorithm,
        loss=datamodule.loss,
        score_before=datamodule.score_before,
        score_after=datamodule.score_after,
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    loggers = [instantiate_group(cfg.logger, name) for name in cfg.get("logger") or {}]
    callbacks = [instantiate_group(cfg.callbacks, name) for name in cfg.get("callbacks") or {}]
    trainer = instantiate_group(
        cfg, "trainer", logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return datamodule, module, trainer


def run(cfg: DictConfig) -> float | None:
    """Fit and test as `cfg` says; returns `cfg.optimized_metric` for hyperparameter searches."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if cfg.test:
        trainer.test(module, datamodule=datamodule, ckpt_path=None if cfg.train else cfg.ckpt_path)
    metric = cfg.get("optimized_metric")
    value = trainer.callback_metrics.get(metric) if metric else None
    return None if value is None else float(value)
