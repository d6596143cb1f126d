"""What a checkpoint holds beyond Lightning's state and the module's (task sampler, RNG, W&B run).
(Reading one that a user names: `reptile.checkpoints`.)

Lightning restores φ, the outer optimizer, the LR schedule (ε's position) and the global step; the
module adds the inner-optimizer state. Training step s draws tasks s·n ... s·n+n-1 (n the global
meta-batch size) of the dataset's seed, so the task sampler's state is the global step plus these
two settings, which a resumed run must share. Tasks need no global RNG, but the global generators
are restored anyway for anything that draws from them (dropout, user code).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from reptile.config import require

TASK_SAMPLER_SETTINGS = ("seed", "meta_batch_size")


def rng_states() -> dict[str, Any]:
    """The global generators' states, as types `torch.load(weights_only=True)` accepts."""
    _, key, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (torch.from_numpy(key.astype(np.int64)), position, has_gauss, cached_gaussian),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    key, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state(
        ("MT19937", key.numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    )
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(pl.Callback):
    """Saves the task sampler's settings, the RNG states and the W&B run id with every checkpoint;
    on resuming, checks the settings and restores the RNG states."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        settings = {key: getattr(trainer.datamodule.tasks, key) for key in TASK_SAMPLER_SETTINGS}
        checkpoint["task_sampler"] = settings
        checkpoint["rng_states"] = rng_states()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["wandb_run_id"] = logger.version

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for key, saved in checkpoint.get("task_sampler", {}).items():
            value = getattr(trainer.datamodule.tasks, key)
            accepted = f"{saved!r}, the checkpoint's (a resumed run must draw the same tasks)"
            require(value == saved, key, value, accepted)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
