"""What `train.py` sets up before torch and Lightning are imported: the config resolvers, the
output-folder check, Hydra's composition errors as one line, stopping on a signal, and the exit
codes of failures.

Exit codes: 0 done; 1 an unexpected error (a traceback); 2 bad input, found before training (a
config value, an override Hydra cannot compose, a file, a folder, W&B settings): one line naming
it; 3 training diverged; 128 + the signal's number when stopped by a signal (130 SIGINT, 143
SIGTERM). A multirun exits with the largest code of its jobs.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from reptile.config import ConfigValueError, require_writable

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def sweep_group() -> str | None:
    """The W&B group of a multirun's jobs: the sweep directory's name; None for a single run."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = HydraConfig.get().sweep
    return f"{HydraConfig.get().job.name}-{Path(sweep.dir).name}"


def has_bf16_units(device: str) -> bool:
    """Whether `device` ("cpu" or "cuda") has bfloat16 matrix units: tensor cores, or AMX."""
    import torch

    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def training_device(accelerator: str = "auto") -> str:
    """The device `trainer.accelerator` trains on: "cuda" (`auto`: the GPU if any) or "cpu"."""
    import torch

    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "cuda" if on_gpu else "cpu"


def fastest_precision(accelerator: str = "auto") -> str:
    """bf16-mixed where the device of `trainer.accelerator` has bfloat16 matrix units, otherwise
    32-true. The few-shot presets train with it: on Omniglot 5-way 1-shot at 6,000
    meta-iterations it scored within the 95 % interval of float32."""
    return "bf16-mixed" if has_bf16_units(training_device(accelerator)) else "32-true"


def emulated_bf16(precision: object, accelerator: str = "auto") -> str | None:
    """A warning where bf16-mixed trains on a device without bfloat16 matrix units: there torch
    emulates bfloat16 arithmetic, several times slower than float32 (README "Mixed precision")."""
    device = training_device(accelerator)
    if str(precision) != "bf16-mixed" or has_bf16_units(device):
        return None
    name, units = ("CPU", "AMX") if device == "cpu" else ("GPU", "bf16 tensor cores")
    return (
        f"trainer.precision=bf16-mixed on a {name} without bfloat16 matrix units ({units}): "
        "bfloat16 is emulated there, several times slower than 32-true"
    )


def gpu_count() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def job_gpu() -> list[int] | int:
    """The GPU of this job: in a multirun, job i runs on GPU i mod G (G = the machine's GPUs), so
    that concurrent jobs (hydra/launcher=gpus) spread over all of them; a single run takes one."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1
    return [int(HydraConfig.get().job.num) % gpu_count()]


# Registered when train.py is imported, so that `--cfg job --resolve` resolves them too.
OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
OmegaConf.register_new_resolver("fastest_precision", fastest_precision, replace=True)
OmegaConf.register_new_resolver("gpu_count", gpu_count, replace=True)
OmegaConf.register_new_resolver("job_gpu", job_gpu, replace=True)


def fail(error: ConfigValueError | str) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


@contextmanager
def reporting_config_errors(config_dir: Path) -> Iterator[None]:
    """Hydra's composition errors (a key the config does not have, a group option that does not
    exist, an override it cannot parse) as one line and exit code 2, like every other bad input;
    Hydra itself prints several lines and exits 1. HYDRA_FULL_ERROR=1 keeps Hydra's reports."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    hydras_reports = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing them
    try:
        yield
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as error:
        if hydras_reports:
            raise
        overrides = [arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")]
        multirun = bool({"-m", "--multirun", "hydra.mode=MULTIRUN"} & set(sys.argv[1:]))
        fail(composition_error(error, overrides, composer(config_dir), multirun))


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


# The paper's symbols (k inner steps, ε, n tasks a meta-iteration; and few-shot's N-way K-shot)
# and openai/supervised-reptile's flags (`--meta-step`), each with the keys it may name here: an
# override written in them is answered with those keys.
KNOWN_AS = {
    "k": ("algorithm.inner_steps", "dataset.shots"),
    "n": ("dataset.meta_batch_size", "dataset.ways"),
    "epsilon": ("algorithm.meta_lr",),
    "inner_iters": ("algorithm.inner_steps",),
    "meta_step": ("algorithm.meta_lr",),
    "meta_step_final": ("algorithm.meta_lr_final",),
    "learning_rate": ("algorithm.inner_lr",),
    "inner_batch": ("algorithm.inner_batch_size",),
    "eval_iters": ("algorithm.eval_inner_steps",),
    "eval_batch": ("algorithm.eval_batch_size",),
    "meta_batch": ("dataset.meta_batch_size",),
    "meta_iters": ("trainer.max_steps",),
    "classes": ("dataset.ways",),
}


Compose = Callable[[list[str]], DictConfig]  # the task config of some overrides


def composition_error(
    error: Exception, overrides: list[str], compose: Compose, multirun: bool = False
) -> str:
    """The line for Hydra's `error` while composing the config of `overrides` (a multirun's:
    its own config, before the jobs')."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    full_key = getattr(error.__cause__, "full_key", None)
    if full_key:  # an override of a key the config does not have
        override = next((o for o in overrides if override_key(o) == full_key), full_key)
        others = [o for o in overrides if o != override]
        line = sweep_key_error(override, full_key, others, compose) if multirun else None
        return line or key_error(override, full_key, others, compose)
    message = str(error)
    missing = re.match(r"In '.*': Could not find '(.+)/([^/']+)'", message)
    options = re.findall(r"^\t(\S+)$", message.partition("Config search path")[0], re.M)
    if missing and options:  # a group option that does not exist
        group, option = missing.groups()
        override = next((o for o in overrides if override_key(o) == group), f"{group}={option}")
        return f"{override}: expected one of {', '.join(options)}"
    if isinstance(error, OverrideParseException):
        parser = OverridesParser.create()
        for override in overrides:
            try:
                parser.parse_override(override)
            except HydraException:
                return f"{override}: expected an override Hydra can parse ({one_line(message)})"
    return one_line(message)


def key_error(
    override: str,
    full_key: str,
    overrides: list[str],
    compose: Compose,
    subject: str | None = None,
    remedy: str | None = None,
) -> str:
    """The line for `override` of `full_key`, a key that the config of `overrides`' group
    choices lacks: the key meant, and the keys there."""
    node, _, name = full_key.rpartition(".")
    config = composed(overrides, compose)
    found = OmegaConf.select(config, node) if node and config is not None else config
    keys = node_keys(found)
    close = meant_keys(node, name, keys, config)
    hint = f" (did you mean {close}?)" if close else ""
    listed_keys = f"; its keys: {', '.join(keys)}" if keys else ""
    owner = node or "the config"
    remedy = remedy or f"+{override} adds it"
    return f"{subject or override}: {owner} has no key {name}{hint}{listed_keys}; {remedy}"


def sweep_key_error(
    override: str, full_key: str, overrides: list[str], compose: Compose
) -> str | None:
    """The line for `override` of `full_key` in a multirun whose own config lacks the key, where
    some or all of its jobs' configs have it (None: none has). Hydra composes a sweep's own
    config without its swept group choices, then each job's with them."""
    having, lacking = sweep_jobs(full_key, overrides, compose)
    if not having:
        return None
    swept = swept_choices(overrides)
    if not lacking:
        return (
            f"{override}: every job of the sweep has {full_key}, but Hydra applies the overrides "
            f"a sweep does not vary before its swept choices ({' '.join(swept)}), to a config "
            f"without it; ++{override} sets it in each job"
        )
    numbers, choices = zip(*lacking, strict=True)
    jobs = f"job {numbers[0]}" if len(numbers) == 1 else f"jobs {listed(numbers)}"
    keys = {override_key(o) for o in swept}
    shown = [" ".join(c for c in job if override_key(c) in keys) for job in choices]
    where = "; ".join(dict.fromkeys(shown))
    subject = f"{override}: {jobs} of {len(having) + len(lacking)} ({where})"
    remedy = "the other jobs have it"
    return key_error(override, full_key, list(choices[0]), compose, subject, remedy)


def one_line(message: str) -> str:
    """Hydra's lines joined, without the config search path it appends to some."""
    lines = message.partition("Config search path")[0].splitlines()
    return "; ".join(line.strip().rstrip(".") for line in lines if line.strip())


def composer(config_dir: Path) -> Compose:
    """Composes the task config of some overrides from `config_dir`, as train.py would."""

    def compose(overrides: list[str]) -> DictConfig:
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return compose("train", overrides=overrides)

    return compose


def group_overrides(overrides: list[str]) -> list[str]:
    """The overrides that choose config group options (`dataset=omniglot`, `dataset=a,b`)."""
    return [o for o in overrides if "." not in override_key(o)]


def group_choices(overrides: list[str]) -> list[str]:
    """The group options `overrides` choose (a sweep's: its first)."""
    return [o.split(",")[0] for o in group_overrides(overrides)]


def composed(overrides: list[str], compose: Compose) -> DictConfig | None:
    """The config of `overrides`' group choices; None where that config cannot be composed
    either."""
    try:
        return compose(group_choices(overrides))
    except Exception:  # the error reported is the one already found
        return None


def sweep_jobs(
    key: str, overrides: list[str], compose: Compose
) -> tuple[list[int], list[tuple[int, tuple[str, ...]]]]:
    """The numbers of the jobs of the sweep of `overrides` whose config has `key`, and those of
    the jobs whose config lacks it, with their group choices. Jobs are numbered as the sweeper
    numbers them; a config is composed once per combination of group choices."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    has: dict[tuple[str, ...], bool] = {}
    having, lacking = [], []
    for number, job in enumerate(jobs):
        choices = tuple(group_choices(job))
        if choices not in has:
            config = composed(list(choices), compose)
            tree = OmegaConf.to_container(config, resolve=False) if config is not None else {}
            has[choices] = key in key_paths(tree)
        if has[choices]:
            having.append(number)
        else:
            lacking.append((number, choices))
    return having, lacking


def swept_choices(overrides: list[str]) -> list[str]:
    """The overrides that sweep over config group options (`dataset=omniglot,sine`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    return [o for o in group_overrides(overrides) if parser.parse_override(o).is_sweep_override()]


def listed(numbers: tuple[int, ...], most: int = 8) -> str:
    shown = ", ".join(str(n) for n in numbers[:most])
    return shown + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


def meant_keys(node: str, name: str, keys: list[str], config: DictConfig | None) -> str | None:
    """The keys an override of `node.name` most likely means: those `name` is known as (the
    paper's k, ε as epsilon), else the keys of that name elsewhere (`dataset.meta_batch_size` for
    `algorithm.meta_batch_size`), else the closest spelling among `node`'s `keys`."""
    if config is None:
        return None
    everywhere = list(key_paths(OmegaConf.to_container(config, resolve=False)))
    known = [key for key in KNOWN_AS.get(name.lower().replace("-", "_"), ()) if key in everywhere]
    elsewhere = known or [key for key in everywhere if key.rpartition(".")[2] == name]
    if elsewhere:  # those in `node` first
        return " or ".join(sorted(elsewhere, key=lambda key: key.rpartition(".")[0] != node))
    return closest_key(node, name, keys)


def closest_key(node: str, name: str, keys: list[str]) -> str | None:
    """The full key of the closest spelling of `name` among `node`'s `keys`; None: none close."""
    close = difflib.get_close_matches(name, keys, n=1)
    if not close:
        return None
    return f"{node}.{close[0]}" if node else close[0]


def node_keys(node: Any) -> list[str]:
    """A config node's keys, sorted, without Hydra's own (`_target_`); none for a leaf."""
    if not isinstance(node, DictConfig):
        return []
    return sorted(str(key) for key in node if not str(key).startswith("_"))


def key_paths(tree: Any, prefix: str = "") -> Iterator[str]:
    """The dotted path of every key in a config's nested dictionaries, nodes and leaves."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            path = f"{prefix}{key}"
            yield path
            yield from key_paths(value, f"{path}.")


class OutputFolderCheck(Callback):
    """Checks the run's (or the sweep's) folder before Hydra creates it and writes its configs
    there: an unwritable folder would otherwise end in Hydra's traceback. Notes which folders a
    single run creates, for `discard_refused_run_dir`."""

    created: tuple[Path, Path] | None = None  # (the run's folder, its topmost new ancestor)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check("hydra.run.dir", config.hydra.run.dir)
        folder = Path(config.hydra.run.dir).absolute()
        new = [path for path in (folder, *folder.parents) if not path.exists()]
        OutputFolderCheck.created = (folder, new[-1]) if new else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check("hydra.sweep.dir", config.hydra.sweep.dir)

    @staticmethod
    def check(key: str, folder: str) -> None:
        try:
            require_writable(key, folder, folder)
        except ConfigValueError as error:
            fail(error)


def discard_refused_run_dir() -> None:
    """Removes the folder of a single run refused for bad input, when this run created it and
    wrote nothing there but Hydra's record (`.hydra/`, `train.log`): a typo on the command line
    leaves no empty run behind. A folder that existed before (a resumed run) is kept."""
    if OutputFolderCheck.created is None or not HydraConfig.initialized():
        return
    folder, topmost = OutputFolderCheck.created
    if Path(HydraConfig.get().runtime.output_dir).absolute() != folder or not folder.is_dir():
        return
    if any(path.name not in (".hydra", "train.log") for path in folder.iterdir()):
        return
    shutil.rmtree(folder)
    for parent in folder.parents:  # the date folder above, when this run made it
        if parent == topmost.parent or any(parent.iterdir()):
            break
        parent.rmdir()


class DivergenceError(RuntimeError):
    """Training produced a NaN or infinite value (exit code 3)."""


class JobFailed(Exception):
    """A multirun job's failure, already reported on its own line; the sweeper lists it at the
    end. Built from plain values: joblib sends it back from its worker processes."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(exit_code, message)
        self.exit_code, self.message = exit_code, message

    def __str__(self) -> str:
        return self.message


class Interrupted(SystemExit):
    """Stopped by a signal, with exit code 128 + its number. `checkpoint` holds the run's state
    at `step` (None: nothing trained yet)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopRequest:
    """SIGTERM (what schedulers send) and SIGINT (Ctrl-C) for this process.

    Outside a Lightning stage a signal stops the process at once. During one (`defer`) it is only
    recorded: `reptile.lightning.callbacks.StopOnSignal` acts on it at the end of the current
    meta-iteration (where the DDP ranks agree to stop and a checkpoint is consistent) or
    evaluation batch. A repeated signal changes nothing, so that a signal sent to every rank and
    also forwarded to them by rank 0 is one request.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self.forward: Callable[[int], None] | None = None
        self.pid: int | None = None

    def install(self) -> None:
        self.signum, self.deferred, self.forward, self.pid = None, False, None, os.getpid()
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            return  # a forked DataLoader worker: the process that owns it stops it
        if self.signum is not None:
            return
        self.signum = signum
        if self.forward is not None:
            self.forward(signum)
        if not self.deferred:
            raise Interrupted(signum)

    def defer(self, forward: Callable[[int], None] | None) -> None:
        """Record signals from now on; pass them on with `forward` (to the DDP ranks started)."""
        self.deferred, self.forward = True, forward

    def stop_deferring(self) -> None:
        self.deferred, self.forward = False, None


stop_request = StopRequest()


def process_rank() -> int:
    """This process's global rank, read as Lightning reads it (`rank_zero_only.rank`), from the
    variables its launcher, torchrun or SLURM set; 0 for a single process."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def resume_command(stop: Interrupted) -> str:
    """The command that continues the interrupted run (or reruns it, if nothing was saved)."""
    overrides = list(HydraConfig.get().overrides.task)
    if stop.checkpoint is not None:
        overrides = [o for o in overrides if not o.startswith("ckpt_path=")]
        overrides.append(f"ckpt_path={stop.checkpoint}")
    return shlex.join(["python", sys.argv[0], *overrides])


@contextmanager
def reporting_interruption() -> Iterator[None]:
    """A signal's `Interrupted`, wherever it stops the run (importing, training, testing), as one
    line: where it stopped, the checkpoint, the command that resumes."""
    try:
        yield
    except Interrupted as stop:
        if process_rank() == 0:  # the other DDP ranks stop alike: print once
            where = "before training" if stop.step is None else f"at meta-iteration {stop.step}"
            saved = "" if stop.checkpoint is None else f", state in {stop.checkpoint}"
            print(
                f"interrupted by {stop.signal_name} {where}{saved}; resume: {resume_command(stop)}",
                file=sys.stderr,
            )
        raise


def init_data_worker(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM and SIGINT, which schedulers and Ctrl-C send to every
    process of a run: a killed worker would crash the run at its next batch, before it can stop
    at a checkpoint. Their loader stops them. Lightning's seeding of workers is kept."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # seed_everything(workers=True)
        from lightning_fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
