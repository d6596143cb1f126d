"""What a checkpoint holds beyond Lightning's state and the module's (task sampler, RNG, W&B run),
and reading one that a user names, with a one-line error for a missing, damaged or foreign file.

Lightning restores φ, the outer optimizer, the LR schedule (ε's position) and the global step; the
module adds the inner-optimizer state. Training step s draws tasks s·n ... s·n+n-1 (n the global
meta-batch size) of the dataset's seed, so the task sampler's state is the global step plus these
two settings, which a resumed run must share. Tasks need no global RNG, but the global generators
are restored anyway for anything that draws from them (dropout, user code).
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from reptile.config import ConfigValueError, require

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
        settings = {key: getattr(trainer.datamodule, key) for key in TASK_SAMPLER_SETTINGS}
        checkpoint["task_sampler"] = settings
        checkpoint["rng_states"] = rng_states()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["wandb_run_id"] = logger.version

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for key, saved in checkpoint.get("task_sampler", {}).items():
            value = getattr(trainer.datamodule, key)
            accepted = f"{saved!r}, the checkpoint's (a resumed run must draw the same tasks)"
            require(value == saved, key, value, accepted)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])


def load(path: Path) -> Any:
    """A checkpoint's contents, memory-mapped (tensors are read when used). Only tensors and plain
    containers are unpickled (`weights_only`): a checkpoint never runs code."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def read_checkpoint(key: str, path: str | Path) -> dict[str, Any]:
    """The checkpoint that `key` names, written by train.py; otherwise one line naming the file,
    what is wrong with it and what to use instead."""
    path = Path(path)
    accepted = "a checkpoint written by train.py, but"
    try:
        checkpoint = load(path)
    except Exception as error:  # each kind of damage has its own message below
        raise ConfigValueError(
            key, str(path), f"{accepted} {load_problem(path, error)}{intact_neighbour(path)}"
        ) from None
    require(
        isinstance(checkpoint, dict) and "run_config" in checkpoint,
        key,
        str(path),
        f"{accepted} it holds no run config (not written by train.py){intact_neighbour(path)}",
    )
    return checkpoint


def load_problem(path: Path, error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "there is no such file"
    if isinstance(error, IsADirectoryError):
        return "it is a folder"
    if isinstance(error, PermissionError):
        return "it cannot be read (permission denied)"
    if zipfile.is_zipfile(path):  # a whole torch.save archive that does not load
        if isinstance(error, pickle.UnpicklingError):
            return "it holds Python objects that safe loading (weights_only) refuses to run"
        return f"it cannot be loaded ({str(error).splitlines()[0]})"
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start:
        return "the file is empty (a copy or a write that did not finish)"
    if start == b"PK\x03\x04":  # the start of torch.save's zip archive, without its end
        return "the file is truncated (a copy or a write that did not finish)"
    return "the file is not a PyTorch checkpoint (damaged, or another kind of file)"


def intact_neighbour(path: Path) -> str:
    """A pointer to the latest readable checkpoint in the same folder, if there is one."""
    if not path.parent.is_dir():
        return ""
    readable = [
        (step, other)
        for other in path.parent.glob("*.ckpt")
        if other != path
        if (step := checkpoint_step(other)) is not None
    ]
    if not readable:
        return ""
    step, latest = max(readable)
    return f"; the intact {latest.name} beside it holds meta-iteration {step}: ckpt_path={latest}"


def checkpoint_step(path: Path) -> int | None:
    try:
        checkpoint = load(path)
    except Exception:  # an unreadable file is simply not offered
        return None
    if not isinstance(checkpoint, dict) or "run_config" not in checkpoint:
        return None
    return checkpoint.get("global_step")


def require_same_model(key: str, path: str | Path, checkpoint: dict[str, Any], model: Any) -> None:
    """The checkpoint's φ fits this run's model: the model settings both configs have agree.
    (Settings only one side has, added or removed since, are not compared.)"""
    difference = first_difference(checkpoint["run_config"].get("model", {}), model, "model")
    require(
        difference is None,
        key,
        str(path),
        f"a checkpoint of this run's model, but {difference}: pass the settings it was trained "
        "with (its run's .hydra/overrides.yaml) or another checkpoint",
    )


def first_difference(trained: Any, current: Any, key: str) -> str | None:
    if isinstance(trained, dict) and isinstance(current, dict):
        for name in sorted(trained.keys() & current.keys()):
            difference = first_difference(trained[name], current[name], f"{key}.{name}")
            if difference is not None:
                return difference
        return None
    if trained != current:
        return f"it was trained with {key}={trained!r} (this run: {current!r})"
    return None
