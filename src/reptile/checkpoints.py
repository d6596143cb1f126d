"""Reading a checkpoint that a user names (`ckpt_path`), with a one-line error for a missing,
damaged or foreign file. Lightning-free: checked with the run's other values, before Lightning is
imported."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from reptile.config import ConfigValueError, require


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
