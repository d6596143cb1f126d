"""Hydra's basic sweeper for sweeps where a job can fail (`hydra/sweeper=checked`, the default).

Hydra's BasicSweeper runs a batch of jobs and then raises the first failed job's exception, and a
job that exits (`sys.exit`) takes the whole sweep down with it, under joblib its neighbours too.
This one checks every job's config before the first starts (one line per bad job, exit 2), lets
every job run whatever the others do (a failed job reports itself and raises
`reptile.cli.JobFailed`, which the launcher records), and at the end lists the failed jobs and
exits with the largest of their exit codes.
"""

from __future__ import annotations

import copy
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from reptile.cli import EXIT_BAD_INPUT, EXIT_ERROR, JobFailed, composition_error
from reptile.config import ConfigValueError


class CheckedSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        jobs = [job for batch in self.overrides for job in batch]
        self.check_jobs(jobs)

        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        new = [path for path in (sweep_dir, *sweep_dir.parents) if not path.exists()]
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, failures, first = [], [], 0
        while not self.is_done():
            batch = self.get_job_batch()
            # Refused before its first job, the sweep leaves no folder behind.
            results = self.launch(batch, first, new[-1] if new and not first else None)
            failures += [(first + i, result) for i, result in enumerate(results) if failed(result)]
            first += len(batch)
            returns.append(results)
        if failures:
            sys.exit(report_failures(failures, jobs))
        return returns

    def launch(
        self, batch: Sequence[Sequence[str]], first: int, created: Path | None
    ) -> Sequence[JobReturn]:
        """The launcher's run of `batch`. A job's failure comes back as its result; what the
        launcher raises itself is about its settings, one line where it names one of them
        (`hydra.launcher.n_jobs=0`: joblib refuses it before any job starts), after removing
        `created`, the folder this sweep made."""
        from reptile.job import refused_key

        assert self.config is not None and self.launcher is not None
        try:
            return self.launcher.launch(batch, initial_job_idx=first)
        except Exception as error:
            refused = refused_key(error, self.config.hydra.launcher, "hydra.launcher")
            if refused is None:
                raise
            if created is not None:
                shutil.rmtree(created)
            print(f"error: {refused.under('hydra.launcher')}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    def check_jobs(self, jobs: Sequence[Sequence[str]]) -> None:
        """Every job's config, checked as its run will check it, before any job starts. A key
        that only some jobs' configs lack is one line per such job; a key that none has (a
        typo), or an option a group lacks, is left to train.py: one line naming the override as
        typed."""
        from reptile.train import check  # torch and Lightning: imported for sweeps only

        problems, uncomposed = [], []
        for number, overrides in enumerate(jobs):
            try:
                with self.job_config(number, overrides) as cfg:
                    check(cfg)
            except ConfigValueError as error:
                problems.append(f"error: job {number} of {len(jobs)}: {error}")
            except ConfigCompositionException as error:
                if isinstance(error, MissingConfigException):  # the same for every job
                    raise
                uncomposed.append(error)
                line = composition_error(error, list(overrides), self.task_config)
                problems.append(f"error: job {number} of {len(jobs)}: {line}")
        keys = {getattr(error.__cause__, "full_key", None) for error in uncomposed}
        if len(uncomposed) == len(jobs) and len(keys) == 1:  # a key no job's config has
            raise uncomposed[0]
        if problems:
            print("\n".join(problems), file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)

    def task_config(self, overrides: list[str]) -> DictConfig:
        """The task config (no `hydra` node) of a job of `overrides`."""
        assert self.config is not None and self.hydra_context is not None
        return task_part(self.hydra_context.config_loader.load_sweep_config(self.config, overrides))

    @contextmanager
    def job_config(self, number: int, overrides: Sequence[str]) -> Iterator[DictConfig]:
        """Job `number`'s task config, with the Hydra config (its output folder: `${hydra:...}`)
        set up as the launcher and `hydra.core.utils.run_job` will set it up."""
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = number
        output_dir = Path(config.hydra.sweep.dir) / str(config.hydra.sweep.subdir)
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(output_dir.absolute())
        previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)
        try:
            yield task_part(config)
        finally:
            HydraConfig.instance().cfg = previous


def task_part(config: DictConfig) -> DictConfig:
    """A copy of a job's config without its `hydra` node: what the task function receives."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def failed(result: JobReturn) -> bool:
    return result.status == JobStatus.FAILED


def report_failures(failures: list[tuple[int, JobReturn]], jobs: list[list[str]]) -> int:
    """One line per failed job, with the overrides that set it apart; returns the sweep's exit
    code, the largest of the failed jobs'."""
    shared = set.intersection(*(set(job) for job in jobs))
    lines, codes = [f"error: {len(failures)} of {len(jobs)} jobs failed:"], []
    for number, result in failures:
        error = result._return_value  # the exception (`return_value` would log and raise it)
        code = error.exit_code if isinstance(error, JobFailed) else EXIT_ERROR
        own = " ".join(o for o in result.overrides if o not in shared)
        lines.append(f"  job {number} ({own}): exit {code}: {error}")
        codes.append(code)
    print("\n".join(lines), file=sys.stderr)
    return max(codes)
