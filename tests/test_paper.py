"""The paper's runs (`python -m reptile.paper`): a run continued on another machine from its
committed checkpoint ends where an uninterrupted run ends, a changed setting is refused in one
line, and the table shows the committed results."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from data.real_data import SHARED_DATA
from train_process import TINY, checkpoint, environment, group_ended, results, train, wait_for

from reptile import paper
from reptile.train import build

# A sine run of 6 meta-iterations whose ε does not depend on its length (outer Adam at a constant
# rate), so that 3 steps trained elsewhere are the first half of the 6-step run.
TRAIN = [*TINY, "algorithm.meta_lr_final=0.001"]
ROWS = {
    "tiny": {
        "train": TRAIN,
        "evaluations": {"two_steps": [], "one_step": ["algorithm.eval_inner_steps=1"]},
        "rows": [
            {
                "table": "Sine",
                "column": "10 shots",
                "method": "Reptile",
                "evaluation": "two_steps",
                "metric": "test/mse_after",
                "paper": [50.0, 1.0],
            }
        ],
    }
}


def checked(run: paper.Run, *overrides: str) -> dict:
    """The run's decisive config with these machine overrides, checked as `continue` checks it."""
    return paper.check_config(run, paper.compose([*run.train, *overrides]))


@pytest.mark.parametrize("name", list(paper.load_runs()))
def test_every_committed_run_builds_and_keeps_its_committed_config(compose, name: str) -> None:
    """A key of rows.yaml that does not exist or a value the config checks refuse, or a changed
    default that a run's committed config.yaml no longer matches, fails here, not when a lent GPU
    starts the run. (Task sizes are checked against the images, which this does not load.)"""
    run, data = paper.load_runs()[name], f"paths.data_dir={SHARED_DATA}"
    for overrides in run.evaluations.values():
        cfg = compose(*run.train, *overrides, data, "logger=none")
        if not Path(cfg.dataset.root).is_dir():
            pytest.skip(f"{cfg.dataset.root} is missing (shared/ beside the repository)")
        build(cfg)
    checked(run, data)


def make_paper(tmp_path: Path) -> Path:
    folder = tmp_path / "paper"
    folder.mkdir()
    (folder / "rows.yaml").write_text(json.dumps(ROWS))  # JSON is YAML
    return folder


def paper_command(tmp_path: Path, *arguments: str) -> list[str]:
    command = [sys.executable, "-m", "reptile.paper", "--paper", str(tmp_path / "paper")]
    return [*command, "--work", str(tmp_path / "work"), *arguments]


def reptile_paper(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        paper_command(tmp_path, *arguments),
        cwd=tmp_path,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_run_continues_from_its_committed_checkpoint_to_the_uninterrupted_result(
    tmp_path: Path,
) -> None:
    folder = make_paper(tmp_path)
    # Trained elsewhere: the first 3 of the 6 meta-iterations, committed as the run's checkpoint.
    train(tmp_path, *TRAIN, "trainer.max_steps=3", "logger=none", "hydra.run.dir=elsewhere")
    (folder / "tiny").mkdir()
    shutil.copy(tmp_path / "elsewhere/checkpoints/last.ckpt", folder / "tiny/checkpoint.ckpt")
    # The same 6 meta-iterations, uninterrupted.
    train(tmp_path, *TRAIN, "logger=none", "hydra.run.dir=whole")

    finished = reptile_paper(tmp_path, "continue", "tiny", "threads=1")
    assert finished.returncode == 0, finished.stderr[-3000:]
    record = json.loads((folder / "tiny/run.json").read_text())
    assert [(p["from_step"], p["to_step"]) for p in record["training"]] == [(3, 6)]
    assert set(record["evaluation"]) == {"two_steps", "one_step"}
    scored = json.loads((folder / "tiny/results/two_steps.json").read_text())
    assert scored == results(tmp_path / "whole")
    one_step = json.loads((folder / "tiny/results/one_step.json").read_text())
    assert one_step["test/mse_after"] != scored["test/mse_after"]
    assert (folder / "tiny/curve.csv").read_text().splitlines()[1].startswith("6,")

    refused = reptile_paper(tmp_path, "continue", "tiny", "algorithm.inner_lr=0.5")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"error: run tiny: algorithm.inner_lr=0.5 differs from the run's 0.01 "
        f"({folder / 'tiny' / 'config.yaml'}); a run continues only with its own config: "
        "start a new run in rows.yaml instead"
    ]

    shown = reptile_paper(tmp_path, "table")
    assert shown.returncode == 0, shown.stderr[-3000:]
    row = next(line for line in shown.stdout.splitlines() if "Reptile" in line)
    mean, ci = scored["test/mse_after"], scored["test/mse_after_ci95"]
    assert f"| 10 shots | Reptile | 50.00 ± 1.00 | {100 * mean:.2f} ± {100 * ci:.2f} |" in row
    assert "| 6 of 6 (" in row


def test_machine_settings_are_not_a_different_run(tmp_path: Path) -> None:
    run = paper.load_runs(make_paper(tmp_path), tmp_path / "work")["tiny"]
    base = checked(run)
    machine = [
        "threads=2",
        "paths.data_dir=/elsewhere",
        "dataset.num_workers=3",
        "algorithm.backend=vmap",
        "trainer.val_check_interval=2",
        "logger=csv",
    ]
    assert checked(run, *machine) == base
    assert checked(run, "seed=1")["seed"] == 1


def test_a_run_pinned_to_bf16_warns_before_training_on_a_cpu_without_bfloat16_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torch

    folder = make_paper(tmp_path)
    rows = {"tiny": {**ROWS["tiny"], "train": [*TRAIN, "trainer.precision=bf16-mixed"]}}
    (folder / "rows.yaml").write_text(json.dumps(rows))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    trained = []
    monkeypatch.setattr(paper, "continue_training", lambda *args: trained.append(args) or False)
    command = ["--paper", str(folder), "--work", str(tmp_path / "work"), "continue", "tiny"]
    assert paper.main(command) == 0 and trained
    assert capsys.readouterr().err.splitlines() == [
        "warning: run tiny: trainer.precision=bf16-mixed on a CPU without bfloat16 matrix units "
        "(AMX): bfloat16 is emulated there, several times slower than 32-true; continue it on a "
        "machine that has them"
    ]


def long_run(tmp_path: Path, *arguments: str) -> subprocess.Popen:
    """The runner started on a sine run far longer than a test, checkpointed every 10 steps."""
    folder = make_paper(tmp_path)
    long = {
        **ROWS["tiny"],
        "train": [
            *TRAIN,
            "trainer.max_steps=100000",
            "trainer.val_check_interval=1000",
            "callbacks.model_checkpoint.every_n_train_steps=10",
        ],
    }
    (folder / "rows.yaml").write_text(json.dumps({"long": long}))
    return subprocess.Popen(
        paper_command(tmp_path, "continue", "long", "threads=1", *arguments),
        cwd=tmp_path,
        env=environment(tmp_path),
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def recorded_piece(tmp_path: Path) -> dict:
    """The one piece of training recorded, checked against the committed checkpoint."""
    (piece,) = json.loads((tmp_path / "paper/long/run.json").read_text())["training"]
    step = checkpoint(tmp_path / "paper/long/checkpoint.ckpt")["global_step"]
    assert piece["from_step"] == 0 and piece["to_step"] == step >= 10
    return piece


@pytest.mark.slow
def test_a_signal_to_the_runner_stops_the_run_with_a_checkpoint_and_records_it(
    tmp_path: Path,
) -> None:
    """A scheduler's SIGTERM to `python -m reptile.paper` reaches train.py, which stops at a
    checkpoint; the piece is recorded as one stopped by --hours is, and the runner exits 143."""
    with long_run(tmp_path) as runner:
        wait_for(tmp_path / "work/long/checkpoints/step10.ckpt", runner)
        runner.send_signal(signal.SIGTERM)  # to the runner alone
        _, error = runner.communicate(timeout=120)
    assert runner.returncode == 143, error[-3000:]
    assert group_ended(runner)  # train.py and its workers too
    piece = recorded_piece(tmp_path)
    assert piece["exit_status"] == 143 and piece["stopped_by"] == "SIGTERM"
    assert error.splitlines()[-1] == (
        f"run long interrupted by SIGTERM at meta-iteration {piece['to_step']:,}, recorded in "
        f"{tmp_path / 'paper/long'}; continue: python -m reptile.paper continue long"
    )


@pytest.mark.slow
def test_hours_stops_the_run_with_a_checkpoint_records_why_and_exits_zero(
    tmp_path: Path,
) -> None:
    """--hours ends training by the same SIGTERM (train.py's exit status 143), which the record
    tells apart from a scheduler's; the runner itself succeeds, ready for the next piece."""
    with long_run(tmp_path, "--hours", "0.006") as runner:  # 21.6 s, startup included
        _, error = runner.communicate(timeout=120)
    assert runner.returncode == 0, error[-3000:]
    assert group_ended(runner)
    piece = recorded_piece(tmp_path)
    assert piece["exit_status"] == 143 and piece["stopped_by"] == "--hours"
    assert 21 <= piece["seconds"] < 60
    assert not (tmp_path / "paper/long/results").exists()  # not trained to its end: no test
