"""A job of `train.py`: its config checked into parts before Lightning is imported (a bad value is
reported within about a second), then run by `reptile.train`; a failure becomes one line and an
exit code (the codes: `reptile.cli`)."""

from __future__ import annotations

import copy
import logging
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from reptile.algorithms.base import Algorithm
from reptile.checkpoints import read_checkpoint, require_same_model
from reptile.cli import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_ERROR,
    DivergenceError,
    JobFailed,
    closest_key,
    discard_refused_run_dir,
    emulated_bf16,
    node_keys,
    one_line,
    process_rank,
)
from reptile.config import (
    ConfigValueError,
    is_int,
    require,
    require_bool,
    require_choice,
    require_int,
    require_writable,
)
from reptile.data.distribution import TaskDistribution

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def instantiate_group(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate` of the node at `key` (dotted: `callbacks.model_checkpoint`), turning a bad
    value anywhere inside into one `key.field` error."""
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, _convert_="object", **kwargs)
    except InstantiationException as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ConfigValueError):
            cause = cause.__cause__
        if cause is not None:
            raise cause.under(key) from None
        refused = refused_key(error.__cause__, node, key)
        if refused is None:
            raise
        raise refused.under(key) from None
    except ConfigValueError as error:
        raise error.under(key) from None


def refused_key(error: BaseException | None, node: DictConfig, key: str) -> ConfigValueError | None:
    """The key of `node` (at `key`) that its `_target_` refused with `error`: a key it takes no
    argument for (`+dataset.foo=1`, or a key that only another option of the group has), or a
    value a library's own check names (Lightning's `trainer.strategy=fsdb`). None where the
    error names no key of `node`, or comes from this package's own classes, which check their
    values with `require`: a bug, whose traceback is kept."""
    keys = node_keys(node)
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if isinstance(error, TypeError) and unexpected and unexpected[1] in keys:
        name = unexpected[1]
        others = [other for other in keys if other != name]
        close = closest_key(key, name, others)
        hint = f" (did you mean {close}?)" if close else ""
        accepted = f"one of the keys {node._target_} takes{hint}: {', '.join(others)}"
        return ConfigValueError(name, node.get(name), accepted)
    if str(node._target_).startswith("reptile."):
        return None
    named = [name for name in keys if re.search(rf"\b{re.escape(name)}\b", str(error))]
    if len(named) != 1:
        return None
    accepted = f"what {node._target_} accepts: {one_line(str(error))}"
    return ConfigValueError(named[0], node.get(named[0]), accepted)


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
    require_bool("train", cfg.train)
    require_bool("test", cfg.test)
    if cfg.get("threads") is not None:
        require_int("threads", cfg.threads, 1)
    require_int("trainer.max_steps", cfg.trainer.max_steps, 1 if cfg.train else 0)
    if cfg.trainer.get("val_check_interval") is not None:  # counted in meta-iterations
        require_int("trainer.val_check_interval", cfg.trainer.val_check_interval, 1)
    # The devices this project's code runs on (TPUs would need torch_xla and XLA-aware steps).
    require_choice("trainer.accelerator", cfg.trainer.get("accelerator", "auto"), ACCELERATORS)
    devices = cfg.trainer.get("devices")
    if is_int(devices):
        accepted = "an integer >= 1, -1 (every GPU), auto or a list of GPU indices"
        require(devices >= 1 or devices == -1, "trainer.devices", devices, accepted)
    require(cfg.train or ckpt_path, "ckpt_path", cfg.ckpt_path, "a checkpoint when train=false")
    # φ and the optimizer states stay float32. float16 needs Lightning's loss scaling, whose
    # optimizer step expects gradients of a scaled backward pass: the meta-gradient is none.
    precision = cfg.trainer.get("precision", "32-true")
    require(
        str(precision) in ("32-true", "32", "bf16-mixed"),
        "trainer.precision",
        precision,
        "32-true or bf16-mixed",
    )
    slow = emulated_bf16(precision, cfg.trainer.get("accelerator", "auto"))
    if slow and process_rank() == 0:
        log.warning(slow)


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


def check_world_size(tasks: TaskDistribution, world_size: int | None) -> None:
    """Before the DDP processes start (the datamodule checks it again once they run)."""
    if world_size is None:
        return
    size = tasks.meta_batch_size
    accepted = f"a multiple of the number of devices ({world_size})"
    require(size % world_size == 0, "dataset.meta_batch_size", size, accepted)


def check_resolves(cfg: DictConfig) -> None:
    """Every value is given and every interpolation resolves: a `???` left to the command line
    (`dataset.root`), or a `${dataset.image_size}` that the chosen dataset lacks (a preset's model
    beside `dataset=sine`), is one line."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as error:
        raw: Any = OmegaConf.to_container(cfg, resolve=False)
        for part in str(error.full_key).split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
        accepted = f"a value that resolves ({error.msg.splitlines()[0]})"
        raise ConfigValueError(error.full_key, raw, accepted) from None
    if missing:
        accepted = f"a value, which the config leaves to the command line ({missing[0]}=...)"
        raise ConfigValueError(missing[0], "???", accepted)


def check_model_fits(model: torch.nn.Module, tasks: TaskDistribution) -> None:
    """The model maps the dataset's inputs to its outputs: `dataset=omniglot` beside the default
    MLP is one line now, not a shape error in the first meta-iteration (after loading the data).
    Tried on a copy, on two zero samples: the model's buffers (batch norm's) stay untouched."""
    if tasks.input_shape is None or tasks.num_outputs is None:
        return
    try:
        with torch.no_grad():
            shape = list(copy.deepcopy(model)(torch.zeros(2, *tasks.input_shape)).shape)
        problem = None if shape == [2, tasks.num_outputs] else f"gives outputs of shape {shape[1:]}"
    except RuntimeError as error:
        problem = f"fails on them ({str(error).splitlines()[0]})"
    if problem is None:
        return
    outputs = f"{tasks.num_outputs} output{'s' * (tasks.num_outputs != 1)}"
    expected = (
        f"a model that maps {group_choice('dataset', tasks)}'s samples, {list(tasks.input_shape)}, "
        f"to {outputs}, but {type(model).__name__} {problem} (each preset pairs a dataset with "
        "its model: `python train.py --help` lists them)"
    )
    raise ConfigValueError("model", group_choice("model", model), expected)


def group_choice(group: str, made: object) -> str:
    """The option of config group `group` this run chose (`omniglot`), else the class it made."""
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get(group, type(made).__name__)
    return type(made).__name__


@dataclass
class Parts:
    """A run's checked parts that need no Lightning."""

    ckpt_path: str | None
    checkpoint: dict[str, Any] | None
    algorithm: Algorithm
    tasks: TaskDistribution
    model: torch.nn.Module
    run_config: dict[str, Any]


def check_parts(cfg: DictConfig) -> Parts:
    """The run's settings, algorithm, dataset and model, its checkpoint and its folders, checked
    before any process, logger or file is created (the callbacks' values, Lightning objects, are
    checked next, by `reptile.train.check`, which a multirun runs on every job first)."""
    check_resolves(cfg)
    ckpt_path = resume_path(cfg)
    check_run_settings(cfg, ckpt_path)
    checkpoint = read_checkpoint("ckpt_path", ckpt_path) if ckpt_path else None
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    algorithm = instantiate_group(cfg, "algorithm")
    # The algorithm says how tasks are walked through; the dataset draws them.
    tasks = instantiate_group(
        cfg,
        "dataset",
        train_schedule=algorithm.train_schedule,
        eval_schedule=algorithm.eval_schedule(),
        tail_size=algorithm.tail_shots,
    )
    torch.manual_seed(cfg.seed)  # the initial φ
    model = instantiate_group(cfg, "model")
    check_model_fits(model, tasks)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if checkpoint is not None:
        require_same_model("ckpt_path", ckpt_path, checkpoint, run_config["model"])
    check_folders(cfg)
    check_world_size(tasks, configured_world_size(cfg.trainer))
    return Parts(ckpt_path, checkpoint, algorithm, tasks, model, run_config)


def exit_code(error: BaseException) -> int:
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else EXIT_ERROR
    if isinstance(error, ConfigValueError):
        return EXIT_BAD_INPUT
    if isinstance(error, DivergenceError):
        return EXIT_DIVERGED
    return EXIT_ERROR


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
        parts = check_parts(cfg)
        from reptile.train import run  # Lightning: once the values are known to be good

        return run(cfg, parts)
    except Exception as error:
        code = exit_code(error)
        if code == EXIT_ERROR and not is_multirun():
            raise  # Hydra prints the traceback
        if code == EXIT_ERROR:
            traceback.print_exc()
        message = failure_message(error)
        if process_rank() == 0:  # DDP ranks fail alike: print once
            print(message, file=sys.stderr)
        if not is_multirun():
            if code == EXIT_BAD_INPUT and process_rank() == 0:
                discard_refused_run_dir()
            sys.exit(code)
        raise JobFailed(code, message.removeprefix("error: ")) from None
