"""Hydra sweeps: jobs in parallel (joblib), an Optuna search, the SLURM launcher config, and sweeps
with a bad job: checked before the first job starts, or failing while the others run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from train_process import (
    ROOT,
    TINY,
    offline_runs,
    results,
    run,
    train,
    wandb_exit_code,
    wandb_run_record,
)

SWEEP = (*TINY, "algorithm.inner_steps=1,2")


def jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_parallel_jobs_give_the_sequential_results_and_share_a_wandb_group(tmp_path: Path) -> None:
    output = train(
        tmp_path,
        "-m",
        *SWEEP,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweep.dir=parallel",
    )
    assert "Joblib.Parallel(n_jobs=2" in output
    train(tmp_path, "-m", *SWEEP, "logger=none", "hydra.sweep.dir=sequential")

    parallel, sequential = jobs(tmp_path / "parallel"), jobs(tmp_path / "sequential")
    assert [p.name for p in parallel] == [p.name for p in sequential] == ["0", "1"]
    for job, reference in zip(parallel, sequential, strict=True):
        assert results(job) == results(reference)
        # Each job its own W&B run (none left open for the next job), grouped by sweep.
        (run,) = offline_runs(job)
        assert wandb_run_record(run).run_group == "train-parallel"


def last_validation(job: Path) -> float:
    with open(next(job.glob("csv/version_*/metrics.csv"))) as handle:
        values = [row["val/mse_after"] for row in csv.DictReader(handle) if row["val/mse_after"]]
    return float(values[-1])


@pytest.mark.slow
def test_optuna_search_minimizes_the_metric_train_py_returns(tmp_path: Path) -> None:
    train(
        tmp_path,
        *TINY,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "logger=csv",
        "hydra.sweep.dir=search",
    )
    trials = jobs(tmp_path / "search")
    assert len(trials) == 3
    best = yaml.safe_load((tmp_path / "search/optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {
        "algorithm.meta_lr",
        "algorithm.inner_steps",
        "algorithm.inner_lr",
    }
    # The objective is each trial's last validation score, as its own log recorded it.
    assert best["best_value"] == min(last_validation(trial) for trial in trials)


def test_slurm_launcher_gives_each_job_one_gpu() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (1, 1, 1)


@pytest.mark.slow
def test_a_bad_value_in_any_job_stops_the_sweep_before_its_first_job(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "-m",
        *TINY,
        "algorithm.inner_steps=2,0,3",
        "dataset.shots=10,-1",
        "hydra.sweep.dir=sweep",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    # Jobs in order: (2, 10), (2, -1), (0, 10), (0, -1), (3, 10), (3, -1); one line per bad job.
    assert result.stderr.strip().splitlines() == [
        "error: job 1 of 6: dataset.shots=-1: expected an integer >= 1",
        "error: job 2 of 6: algorithm.inner_steps=0: expected an integer >= 1",
        "error: job 3 of 6: algorithm.inner_steps=0: expected an integer >= 1",
        "error: job 5 of 6: dataset.shots=-1: expected an integer >= 1",
    ]
    assert not (tmp_path / "sweep").exists()  # no job started


@pytest.mark.slow
def test_a_key_some_jobs_lack_is_one_line_per_job_before_the_first_starts(tmp_path: Path) -> None:
    """Swept, the key is checked in each job's config (sine has grid_points, Omniglot not); not
    swept, in the sweep's own config, whose error names the jobs that lack it."""
    swept = run(
        tmp_path, "-m", *TINY, "dataset=sine,omniglot", "dataset.ways=2,3", "hydra.sweep.dir=sweep"
    )
    assert swept.returncode == 2, swept.stderr[-3000:]
    lines = swept.stderr.strip().splitlines()
    assert [line.partition(": dataset has no key")[0] for line in lines] == [
        "error: job 0 of 4: dataset.ways=2",
        "error: job 1 of 4: dataset.ways=3",
        "error: job 2 of 4: dataset.grid_points=50",
        "error: job 3 of 4: dataset.grid_points=50",
    ]
    fixed = run(tmp_path, "-m", *TINY, "dataset=sine,omniglot", "dataset.ways=2")
    assert fixed.returncode == 2, fixed.stderr[-3000:]
    (line,) = fixed.stderr.strip().splitlines()
    assert line.startswith("error: dataset.ways=2: job 0 of 2 (dataset=sine): dataset has no key")
    assert line.endswith("; the other jobs have it")
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_launcher_setting_its_launcher_refuses_is_one_line_and_no_job_runs(
    tmp_path: Path,
) -> None:
    result = run(
        tmp_path,
        "-m",
        *SWEEP,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=0",
        "hydra.sweep.dir=sweep",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: hydra.launcher.n_jobs=0: expected what "
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher accepts: n_jobs == 0 "
        "in Parallel has no meaning"
    )
    assert not (tmp_path / "sweep").exists()  # the folder it made, holding only multirun.yaml


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_job_failing_at_run_time_leaves_the_others_running(tmp_path: Path, launcher: str) -> None:
    """inner lr 1e30 diverges at the first meta-iteration (exit 3); under joblib it runs beside
    job 0, which must still finish."""
    parallel = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    result = run(
        tmp_path,
        "-m",
        *TINY,
        "algorithm.inner_lr=0.01,1e30,0.02",
        f"hydra/launcher={launcher}",
        *parallel,
        "hydra.sweep.dir=sweep",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    summary = result.stderr.strip().splitlines()[-2:]
    assert summary[0] == "error: 1 of 3 jobs failed:"
    assert summary[1].startswith(
        "  job 1 (algorithm.inner_lr=1e+30): exit 3: training diverged at meta-iteration 0: "
    )
    good, bad = [tmp_path / "sweep" / job for job in ("0", "2")], tmp_path / "sweep/1"
    assert all("test/mse_after" in results(job) for job in good)
    assert not (bad / "results.json").exists()
    # Each job's W&B run carries its own exit code.
    assert [wandb_exit_code(run) for job in (*good, bad) for run in offline_runs(job)] == [0, 0, 3]
