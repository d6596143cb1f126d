"""DDP on CPU (gloo, 2 real processes started by Lightning's launcher) against one process; the
README's DDP commands, and a DDP run stopped by SIGTERM and resumed."""

from __future__ import annotations

import re
import shlex
import signal
from pathlib import Path

import pytest
import torch
from pytorch_lightning.strategies import DDPStrategy
from train_process import (
    ROOT,
    TINY,
    checkpoint,
    group_ended,
    offline_runs,
    results,
    run,
    signal_group,
    start,
    train,
    wait_for,
    wandb_exit_code,
    wandb_run_record,
)

from reptile.train import build, check

# Adam in the inner loop, its moments carried from meta-iteration to meta-iteration: the moments
# must be all-reduced too. (The outer optimizer stays SGD: Adam's first steps are ±lr whatever the
# gradient's size, so the float rounding of a near-zero entry would decide an entire step.)
STATEFUL = (
    "dataset.meta_batch_size=4",
    "algorithm.inner_optimizer=adam",
    "algorithm.inner_state=carry",
    "algorithm.inner_lr=0.01",
    "algorithm.outer_optimizer=sgd",
    "algorithm.meta_lr=1.0",
)


def assert_trees_close(actual: object, expected: object, where: str = "") -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_trees_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_trees_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=where)
    else:
        assert actual == expected, where


@pytest.mark.slow
def test_two_ranks_with_m_tasks_each_match_one_process_with_2m(tmp_path: Path) -> None:
    train(tmp_path, *TINY, *STATEFUL, "logger=csv", "hydra.run.dir=one")
    train(tmp_path, *TINY, *STATEFUL, "trainer=ddp_cpu", "logger=wandb", "hydra.run.dir=ddp")
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").exists()  # rank 1 really ran

    one = checkpoint(tmp_path / "one/checkpoints/last.ckpt")
    ddp = checkpoint(tmp_path / "ddp/checkpoints/last.ckpt")
    assert ddp["global_step"] == one["global_step"] == 6
    # φ, the outer optimizer and the carried inner Adam moments (all-reduced every step).
    for key in ("state_dict", "optimizer_states", "inner_state", "lr_schedulers"):
        assert_trees_close(ddp[key], one[key], key)
    # Test tasks are sharded over the ranks and the scores gathered: the same 6 tasks are scored.
    assert results(tmp_path / "ddp") == pytest.approx(results(tmp_path / "one"), rel=1e-5)

    # Rank 0 alone logs: one W&B run, though both ranks built the logger.
    (run,) = offline_runs(tmp_path)
    assert run.parent == tmp_path / "ddp/wandb"


@pytest.mark.slow
def test_multirun_with_ddp_runs_each_job_once_in_its_own_directory(tmp_path: Path) -> None:
    """Hydra + DDP pitfall: the launcher re-runs the command line, which is the whole sweep."""
    sweep = ("trainer=ddp_cpu", "dataset.meta_batch_size=4", "algorithm.inner_steps=1,2")
    output = train(tmp_path, "-m", *TINY, *sweep)

    (sweep,) = (tmp_path / "outputs/multiruns").iterdir()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["outputs"]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["multiruns"]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert output.count("Launching 2 jobs locally") == 1
    for job, inner_steps in (("0", 1), ("1", 2)):
        assert (sweep / job / "train_ddp_rank1.log").exists()  # each job had its own rank 1
        assert set(results(sweep / job)) >= {"test/mse_after", "test/mse_before"}
        step = checkpoint(sweep / job / "checkpoints/last.ckpt")["global_step"]
        assert step == 6
        # One W&B run per job, from rank 0, in the sweep's group.
        (run,) = offline_runs(sweep / job)
        record = wandb_run_record(run)
        assert record.run_group == f"train-{sweep.name}"
        assert (
            f"algorithm.inner_steps={inner_steps}"
            in (sweep / job / ".hydra/overrides.yaml").read_text()
        )


def readme_ddp_commands() -> list[list[str]]:
    """The overrides of the README's `trainer=ddp_cpu` commands, as written there."""
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].split() for line in lines if "python train.py" in line]
    return [c[2:] for c in commands if "trainer=ddp_cpu" in c]


def test_the_readme_ddp_commands_pass_every_check(compose) -> None:
    commands = readme_ddp_commands()
    assert len(commands) == 2  # the single run and the multirun
    for overrides in commands:
        single_values = [o.split(",")[0] for o in overrides if o != "-m"]  # the first job
        check(compose(*single_values, "logger=none"))


def test_the_ddp_strategy_can_be_overridden(compose) -> None:
    _, _, trainer = build(compose("trainer.strategy=ddp", "logger=none"))
    assert isinstance(trainer.strategy, DDPStrategy)


@pytest.mark.slow
def test_a_meta_batch_the_ranks_cannot_share_is_one_line_before_the_ranks_start(
    tmp_path: Path,
) -> None:
    result = run(tmp_path, *TINY, "trainer=ddp_cpu", "hydra.run.dir=run")  # sine: 5 tasks
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: dataset.meta_batch_size=5: expected a multiple of the number of devices (2)"
    ]
    assert not list((tmp_path / "run").glob("*ddp*"))  # rank 1 never started


INTERRUPTED = re.compile(r"interrupted by SIGTERM at meta-iteration (\d+), .*; resume: (.+)")


@pytest.mark.slow
def test_sigterm_to_every_rank_saves_one_checkpoint_and_resumes(tmp_path: Path) -> None:
    """The README's DDP command, stopped as a scheduler stops a job (SIGTERM to every process)
    and resumed with the command it prints, ends bit for bit as the uninterrupted DDP run."""
    (command,) = [c for c in readme_ddp_commands() if "-m" not in c]
    steps = ("trainer.max_steps=60", "callbacks.model_checkpoint.every_n_train_steps=10")
    log = tmp_path / "interrupted.log"
    process = start(tmp_path, *TINY, *command, *steps, "hydra.run.dir=ddp", log=log)
    wait_for(tmp_path / "ddp/checkpoints/step10.ckpt", process)
    signal_group(process, signal.SIGTERM)
    assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert group_ended(process)  # rank 1 stopped too
    lines = [line for line in log.read_text().splitlines() if "interrupted by" in line]
    assert len(lines) == 1  # printed once, by rank 0
    match = INTERRUPTED.search(lines[0])
    assert checkpoint(tmp_path / "ddp/checkpoints/last.ckpt")["global_step"] == int(match[1])
    (wandb_run,) = offline_runs(tmp_path / "ddp")
    assert wandb_exit_code(wandb_run) == 143

    train(tmp_path, *shlex.split(match[2])[2:], "hydra.run.dir=resumed")
    train(tmp_path, *TINY, *command, *steps, "logger=none", "hydra.run.dir=whole")
    resumed = checkpoint(tmp_path / "resumed/checkpoints/last.ckpt")
    whole = checkpoint(tmp_path / "whole/checkpoints/last.ckpt")
    assert resumed["global_step"] == whole["global_step"] == 60
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)
    assert results(tmp_path / "resumed") == results(tmp_path / "whole")
