"""Checkpoint and resume: a SIGKILLed and resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import csv
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_process import (
    TINY,
    checkpoint,
    command,
    environment,
    offline_runs,
    results,
    start,
    train,
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


def validations(run_dir: Path) -> dict[int, str]:
    with open(next(run_dir.glob("csv/version_*/metrics.csv"))) as handle:
        rows = csv.DictReader(handle)
        return {int(row["step"]): row["val/mse_after"] for row in rows if row["val/mse_after"]}


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    train(tmp_path, *RUN, "hydra.run.dir=whole")

    killed = tmp_path / "killed"
    process = start(tmp_path, *RUN, "hydra.run.dir=killed", log=tmp_path / "killed.log")
    last = killed / "checkpoints/last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not (killed / "results.json").exists()  # killed before the end
    interrupted_at = checkpoint(last)["global_step"]
    assert 0 < interrupted_at < MAX_STEPS and interrupted_at % 25 != 0  # between validations
    # Every checkpoint file is whole: a kill during a write leaves at most a hidden temporary.
    for path in killed.glob("checkpoints/*.ckpt"):
        checkpoint(path)

    train(tmp_path, *RUN, f"ckpt_path={last}", "hydra.run.dir=resumed")

    whole, resumed = (
        checkpoint(tmp_path / d / "checkpoints/last.ckpt") for d in ("whole", "resumed")
    )
    assert resumed["global_step"] == whole["global_step"] == MAX_STEPS
    # Same tasks in the same order from the same state: bit for bit the same φ and states.
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "inner_state"):
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)
    assert results(tmp_path / "resumed") == results(tmp_path / "whole")
    # Validations after resuming fall on the uninterrupted run's steps, with its values.
    after = validations(tmp_path / "resumed")
    assert after and all(validations(tmp_path / "whole")[step] == v for step, v in after.items())
    # The resumed run continues the killed run's W&B run.
    (killed_run,) = offline_runs(killed)
    (resumed_run,) = offline_runs(tmp_path / "resumed")
    # (The killed run's own log may end before its run record: SIGKILL. Its directory is named
    # offline-run-<time>-<run id>.)
    killed_id = killed_run.name.rsplit("-", 1)[1]
    assert wandb_run_record(resumed_run).run_id == killed_id


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
