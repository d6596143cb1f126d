"""Checkpoint and resume: a SIGKILLed or SIGTERMed run, resumed, ends where an uninterrupted one
does; damaged or foreign checkpoints are refused in one line."""

from __future__ import annotations

import csv
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from data.real_data import SHARED_DATA, needs_omniglot
from train_process import (
    ROOT,
    TINY,
    checkpoint,
    command,
    environment,
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

from reptile.lightning.callbacks import AtomicCheckpointIO

MAX_STEPS = 120
# Checkpoints every 10 meta-iterations, validation every 25: the kill lands between validations.
RUN = (
    *TINY,
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=25",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "algorithm.inner_optimizer=adam",  # its moments are carried: inner state to restore
    "algorithm.inner_lr=0.01",
    "logger=[csv,wandb]",
)


def logged(run_dir: Path, metric: str) -> dict[int, str]:
    with open(next(run_dir.glob("csv/version_*/metrics.csv"))) as handle:
        return {int(row["step"]): row[metric] for row in csv.DictReader(handle) if row[metric]}


# What an interrupted run must not print: Lightning's noise, false on these runs.
NOISE = ("litlogger", "Epoch 0/", "not resumable", "smaller than the logging interval", "v_num")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(run_dir, *RUN, f"hydra.run.dir={run_dir}")
    return run_dir


def assert_resumed_to(resumed: Path, whole: Path) -> None:
    """The resumed run ends bit for bit where the uninterrupted one does."""
    ends = [checkpoint(d / "checkpoints/last.ckpt") for d in (resumed, whole)]
    assert ends[0]["global_step"] == ends[1]["global_step"] == MAX_STEPS
    # Same tasks in the same order from the same state: bit for bit the same φ and states.
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "inner_state"):
        torch.testing.assert_close(ends[0][key], ends[1][key], rtol=0, atol=0)
    assert results(resumed) == results(whole)
    # Validations and logged training losses after resuming fall on the uninterrupted run's
    # steps, with its values (a loss logged after a checkpoint between two logged steps too).
    for metric in ("val/mse_after", "train/loss", "train/loss_adapted"):
        after = logged(resumed, metric)
        assert after and all(logged(whole, metric)[step] == v for step, v in after.items())


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path, uninterrupted) -> None:
    killed = tmp_path / "killed"
    process = start(tmp_path, *RUN, "hydra.run.dir=killed", log=tmp_path / "killed.log")
    last = killed / "checkpoints/last.ckpt"
    wait_for(last, process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (killed / "results.json").exists()  # killed before the end
    interrupted_at = checkpoint(last)["global_step"]
    assert 0 < interrupted_at < MAX_STEPS and interrupted_at % 25 != 0  # between validations
    # Every checkpoint file is whole: a kill during a write leaves at most a hidden temporary.
    for path in killed.glob("checkpoints/*.ckpt"):
        checkpoint(path)

    output = train(tmp_path, *RUN, f"ckpt_path={last}", "hydra.run.dir=resumed")

    assert_resumed_to(tmp_path / "resumed", uninterrupted)
    assert not [noise for noise in NOISE if noise in output]
    # The resumed run continues the killed run's W&B run.
    (killed_run,) = offline_runs(killed)
    (resumed_run,) = offline_runs(tmp_path / "resumed")
    # (The killed run's own log may end before its run record: SIGKILL. Its directory is named
    # offline-run-<time>-<run id>.)
    killed_id = killed_run.name.rsplit("-", 1)[1]
    assert wandb_run_record(resumed_run).run_id == killed_id


INTERRUPTED = re.compile(
    r"interrupted by (SIGTERM|SIGINT) at meta-iteration (\d+), state in (\S+); resume: (.+)"
)


def interrupt(tmp_path: Path, signum: int, *overrides: str) -> tuple[int, Path, list[str]]:
    """Starts train.py, sends `signum` to all its processes (as a scheduler or Ctrl-C does) once
    it has trained a while, and checks it exits with 128 + signum and one line; returns that
    line's meta-iteration, checkpoint and resume command (its overrides)."""
    log = tmp_path / "interrupted.log"
    process = start(tmp_path, *overrides, "hydra.run.dir=interrupted", log=log)
    wait_for(tmp_path / "interrupted/checkpoints/step10.ckpt", process)
    signal_group(process, signum)
    assert process.wait(timeout=120) == 128 + signum, log.read_text()[-3000:]
    last_line = log.read_text().strip().splitlines()[-1]
    match = INTERRUPTED.fullmatch(last_line)
    assert match and match[1] == signal.Signals(signum).name, last_line
    python, script, *resume = shlex.split(match[4])
    assert (python, Path(script)) == ("python", ROOT / "train.py")
    return int(match[2]), Path(match[3]), resume


@pytest.mark.slow
def test_sigterm_saves_the_meta_iteration_and_its_command_resumes_exactly(
    tmp_path: Path, uninterrupted: Path
) -> None:
    # One DataLoader worker: it gets the signal too, and must not crash the run.
    step, saved, resume = interrupt(tmp_path, signal.SIGTERM, *RUN, "dataset.num_workers=1")

    interrupted = tmp_path / "interrupted"
    assert saved == interrupted / "checkpoints/last.ckpt"
    assert checkpoint(saved)["global_step"] == step < MAX_STEPS
    periodic = [checkpoint(p)["global_step"] for p in interrupted.glob("checkpoints/step*.ckpt")]
    assert max(periodic) <= step  # the signal's checkpoint is the newest, at its meta-iteration
    assert not (interrupted / "results.json").exists()
    (run,) = offline_runs(interrupted)
    assert wandb_exit_code(run) == 143  # W&B marks the run failed, with the process's code

    train(tmp_path, *resume, "hydra.run.dir=resumed")  # the printed command, as it is
    assert_resumed_to(tmp_path / "resumed", uninterrupted)


@pytest.mark.slow
def test_sigint_stops_at_the_meta_iteration_with_exit_130(tmp_path: Path) -> None:
    step, saved, resume = interrupt(
        tmp_path,
        signal.SIGINT,
        *TINY,
        "trainer.max_steps=100000",
        "callbacks.model_checkpoint.every_n_train_steps=10",
        "logger=none",
    )
    assert checkpoint(saved)["global_step"] == step >= 10
    assert f"ckpt_path={saved}" in resume


@pytest.mark.slow
def test_resuming_with_other_tasks_is_refused(tmp_path: Path) -> None:
    """A different seed or meta-batch size would silently change the tasks of the resumed run."""
    train(tmp_path, *TINY, "logger=none", "hydra.run.dir=first")
    result = subprocess.run(
        command(
            *TINY,
            "logger=none",
            "dataset.meta_batch_size=4",
            "ckpt_path=first/checkpoints/last.ckpt",
        ),
        cwd=tmp_path,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: dataset.meta_batch_size=4: expected 5, the checkpoint's "
        "(a resumed run must draw the same tasks)"
    )


class Foreign:
    """An object of a class: pickled by reference, it would run code when unpickled."""


def truncated(path: Path, source: Path) -> str:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "the file is truncated (a copy or a write that did not finish)"


def random_bytes(path: Path, source: Path) -> str:
    path.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    return "the file is not a PyTorch checkpoint (damaged, or another kind of file)"


def unsafe_objects(path: Path, source: Path) -> str:
    torch.save({"state_dict": {}, "hook": Foreign()}, path)
    return "it holds Python objects that safe loading (weights_only) refuses to run"


def foreign_checkpoint(path: Path, source: Path) -> str:
    torch.save({"state_dict": {"weight": torch.ones(2)}}, path)  # tensors, no run config
    return "it holds no run config (not written by train.py)"


def missing(path: Path, source: Path) -> str:
    return "there is no such file"


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", [truncated, random_bytes, unsafe_objects, foreign_checkpoint, missing]
)
def test_a_damaged_checkpoint_is_one_line_naming_it_and_the_intact_one(
    tmp_path: Path, uninterrupted: Path, damage
) -> None:
    folder = tmp_path / "checkpoints"
    shutil.copytree(uninterrupted / "checkpoints", folder)
    last = folder / "last.ckpt"
    last.unlink()
    problem = damage(last, uninterrupted / "checkpoints/last.ckpt")
    result = run(tmp_path, *RUN, f"ckpt_path={last}", "hydra.run.dir=resumed")
    assert result.returncode == 2, result.stderr[-3000:]
    intact = folder / f"step{MAX_STEPS}.ckpt"  # the newest readable one beside it
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path='{last}': expected a checkpoint written by train.py, but {problem}; "
        f"the intact {intact.name} beside it holds meta-iteration {MAX_STEPS}: ckpt_path={intact}"
    ]
    assert not offline_runs(tmp_path)  # refused before any W&B run started


@pytest.mark.slow
@needs_omniglot
def test_another_experiments_checkpoint_is_refused_and_its_wandb_run_untouched(
    tmp_path: Path, uninterrupted: Path
) -> None:
    sine = uninterrupted / "checkpoints/last.ckpt"
    (sine_run,) = offline_runs(uninterrupted)
    before = sorted(p.stat().st_mtime_ns for p in sine_run.rglob("*"))
    result = run(
        tmp_path,
        "experiment=omniglot_5w1s",
        "train=false",
        f"ckpt_path={sine}",
        f"paths.data_dir={SHARED_DATA}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path='{sine}': expected a checkpoint of this run's model, but it was trained "
        "with model._target_='reptile.models.mlp.MLP' (this run: 'reptile.models.conv4.Conv4'): "
        "pass the settings it was trained with (its run's .hydra/overrides.yaml) or another "
        "checkpoint"
    ]
    assert not offline_runs(tmp_path)
    assert offline_runs(uninterrupted) == [sine_run]
    assert sorted(p.stat().st_mtime_ns for p in sine_run.rglob("*")) == before


class Unpicklable:
    def __reduce__(self) -> tuple:
        raise RuntimeError("disk full")


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)
    # The write fails midway: the big tensor is already written when pickling hits the object.
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(1000), "z": Unpicklable()}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left
    assert torch.load(path)["step"] == 1
