"""FOMAML and MAML end to end through `train.py -m`, and the report command on that multirun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_process import ROOT, TINY, run

from reptile.report import main


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny sine jobs: FOMAML and MAML, each with a shared and a separate tail."""
    directory = tmp_path_factory.mktemp("sweep")
    result = run(
        directory,
        "-m",
        *TINY,
        "logger=none",
        "algorithm=fomaml,maml",
        "algorithm.tail_shots=0,3",
        f"hydra.sweep.dir={directory}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


def test_fomaml_and_maml_train_and_test_through_hydra(sweep: Path) -> None:
    for job in range(4):
        results = json.loads((sweep / str(job) / "results.json").read_text())
        assert 0 < results["test/mse_after"] < float("inf")


def test_report_tables_every_job_by_its_overrides(sweep: Path, capsys) -> None:
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert printed == (sweep / "report.md").read_text()
    assert (sweep / "report.png").stat().st_size > 5_000
    # Defaults: x and hue are the two swept overrides, y the adapted score.
    lines = printed.splitlines()
    assert lines[0] == "test/mse_after (mean ± 95% CI)"
    assert lines[2] == "| algorithm \\ algorithm.tail_shots | 0 | 3 |"
    for job, (algorithm, tail) in enumerate(
        [("fomaml", 0), ("fomaml", 3), ("maml", 0), ("maml", 3)]
    ):
        results = json.loads((sweep / str(job) / "results.json").read_text())
        expected = f"{results['test/mse_after']:.4g} ± {results['test/mse_after_ci95']:.2g}"
        row = next(line for line in lines if line.startswith(f"| {algorithm} |"))
        assert row.split(" | ")[1 + (tail > 0)].rstrip(" |") == expected


def test_report_averages_jobs_that_agree_on_x_and_hue(sweep: Path, capsys) -> None:
    assert main([str(sweep), "--x", "algorithm", "--hue", "none", "--y", "test/mse_before"]) == 0
    printed = capsys.readouterr().out
    for algorithm, jobs in (("fomaml", (0, 1)), ("maml", (2, 3))):
        values = [
            json.loads((sweep / str(job) / "results.json").read_text())["test/mse_before"]
            for job in jobs
        ]
        row = next(line for line in printed.splitlines() if line.startswith(f"| {algorithm} |"))
        assert row.split(" | ")[1].startswith(f"{sum(values) / 2:.4g} ± ")
        assert row.endswith("(n=2) |")


def test_report_labels_rows_by_job_directory(sweep: Path, capsys) -> None:
    assert main([str(sweep), "--x", "job", "--hue", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| job | test/mse_after |"
    for job in range(4):
        results = json.loads((sweep / str(job) / "results.json").read_text())
        expected = f"{results['test/mse_after']:.4g} ± {results['test/mse_after_ci95']:.2g}"
        assert lines[4 + job] == f"| {job} | {expected} |"


def test_report_names_an_unknown_key_in_one_line(sweep: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reptile.report", str(sweep), "--hue", "algorithm.nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --x/--hue key 'algorithm.nope': not in the config of any job"
    ]
