"""DDP under a Hydra multirun: each job starts its own ranks, as single runs of that job.

Lightning's DDP launcher starts ranks 1.. by re-running the script with the original command line.
Inside a multirun that command line is the whole sweep (`-m ... inner_steps=1,2`): every extra
rank would run the sweep again, and with the default timestamped sweep directory write its outputs
to another one. This module makes the extra ranks of a multirun job run that job alone, as a single
run with the job's own overrides, in the job's output directory; and it tears a job's process group
down afterwards, so that the next job of the sweep, in the same process, launches fresh ranks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, to_absolute_path
from pytorch_lightning.strategies.launchers import subprocess_script

# Lightning's command for the extra ranks of a single run: the original command line, pinned to
# the run's directory. It is right for single runs and kept for them.
lightning_rank_command = subprocess_script._hydra_subprocess_cmd


def script_command() -> list[str]:
    """The interpreter and the script (or `-m module`) this process was started with."""
    import __main__

    if __main__.__spec__ is None:
        return [sys.executable, to_absolute_path(sys.argv[0])]
    return [sys.executable, "-m", __main__.__spec__.name]


def job_rank_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and working directory of DDP rank `local_rank` of the current Hydra job."""
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return lightning_rank_command(local_rank)
    command = script_command() + list(hydra.overrides.task)
    command += [
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        f"hydra.job.name={hydra.job.name}_ddp_rank{local_rank}",  # its own log file
        "hydra.output_subdir=null",  # rank 0 alone writes the job's .hydra/ configs
    ]
    return command, get_original_cwd()


def launch_ranks_as_jobs() -> None:
    """Make Lightning's subprocess DDP launcher start ranks with `job_rank_command`."""
    subprocess_script._hydra_subprocess_cmd = job_rank_command


# What Lightning's launcher exports for the ranks it starts. Left set, they would make the next
# job believe an external launcher (torchrun, SLURM) had started it as one rank of a running group.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def distributed_job() -> Iterator[None]:
    """Runs one job; afterwards its process group and the launcher's variables are gone."""
    launcher_environment = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in launcher_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
