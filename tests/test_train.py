"""`train.py` end to end through Hydra: outputs, sweeps, bad input, divergence, reproducibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_process import TINY, run

from reptile.config import ConfigValueError
from reptile.train import build


def test_single_run_writes_results_plot_checkpoint_and_offline_wandb(tiny_run: Path) -> None:
    results = json.loads((tiny_run / "results.json").read_text())
    assert set(results) == {
        "test/mse_before",
        "test/mse_before_ci95",
        "test/mse_after",
        "test/mse_after_ci95",
    }
    assert all(value > 0 for value in results.values())
    assert (tiny_run / "adaptation.png").stat().st_size > 10_000
    assert (tiny_run / "checkpoints" / "last.ckpt").is_file()
    assert (tiny_run / ".hydra" / "config.yaml").is_file()
    offline_runs = list((tiny_run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb")), "W&B wrote no run file"


def test_same_seed_gives_same_results(tiny_run: Path, tmp_path: Path) -> None:
    result = run(tmp_path, *TINY, "logger=none", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results.json").read_text() == (tiny_run / "results.json").read_text()


def test_evaluating_the_checkpoint_reproduces_the_test_metrics(
    tiny_run: Path, tmp_path: Path
) -> None:
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    result = run(
        tmp_path,
        *TINY,
        "logger=none",
        "train=false",
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results.json").read_text() == (tiny_run / "results.json").read_text()


def test_multirun_gives_each_job_its_directory_and_results(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "-m",
        *TINY,
        "logger=csv",
        "algorithm.inner_steps=1,2",
        "dataset.meta_batch_size=1,2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert "test/mse_after" in json.loads((job / "results.json").read_text())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.inner_steps=0", "algorithm.inner_steps=0: expected an integer >= 1"),
        ("algorithm.meta_lr=0", "algorithm.meta_lr=0: expected a finite number > 0"),
        ("algorithm.meta_lr=-1.5", "algorithm.meta_lr=-1.5: expected a finite number > 0"),
        ("algorithm.inner_lr=-0.1", "algorithm.inner_lr=-0.1: expected a finite number > 0"),
        ("dataset.meta_batch_size=0", "dataset.meta_batch_size=0: expected an integer >= 1"),
        ("dataset.shots=-3", "dataset.shots=-3: expected an integer >= 1"),
        ("dataset.num_test_tasks=-1", "dataset.num_test_tasks=-1: expected an integer >= 1"),
        (
            "algorithm.eval_inner_steps=-2",
            "algorithm.eval_inner_steps=-2: expected an integer >= 0",
        ),
        (
            "algorithm.inner_optimizer=rmsprop",
            "algorithm.inner_optimizer='rmsprop': expected one of sgd, adam",
        ),
        (
            "algorithm.outer_optimizer=lbfgs",
            "algorithm.outer_optimizer='lbfgs': expected one of sgd, adam",
        ),
        (
            "algorithm.inner_state=shared",
            "algorithm.inner_state='shared': expected one of carry, sequential, reset",
        ),
        (
            "algorithm.eval_inner_state=carry",
            "algorithm.eval_inner_state='carry': expected one of trained, fresh",
        ),
        ("model.activation=gelu", "model.activation='gelu': expected one of relu, tanh"),
        ("trainer.max_steps=0", "trainer.max_steps=0: expected an integer >= 1"),
        ("seed=-1", "seed=-1: expected an integer >= 0"),
    ],
)
def test_bad_input_is_one_line_naming_key_value_and_accepted(
    compose, override: str, message: str
) -> None:
    with pytest.raises(ConfigValueError) as error:
        build(compose(override, "logger=none"))
    assert str(error.value) == message


def test_bad_input_exits_nonzero_before_training_with_one_line(tmp_path: Path) -> None:
    result = run(tmp_path, "algorithm.inner_steps=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: algorithm.inner_steps=0: expected an integer >= 1"
    ]
    assert not (tmp_path / "checkpoints").exists()


def test_divergence_stops_with_the_meta_iteration(tmp_path: Path) -> None:
    result = run(
        tmp_path, *TINY, "logger=none", "algorithm.inner_lr=1e30", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 3
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged at meta-iteration ")
    assert "train/loss" in last_line
