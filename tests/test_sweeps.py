"""Hydra sweeps: jobs in parallel (joblib), an Optuna search, the SLURM launcher config."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from train_process import ROOT, TINY, offline_runs, results, train, wandb_run_record

SWEEP = (*TINY, "algorithm.inner_steps=1,2")


def jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


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
