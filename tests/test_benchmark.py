"""Smoke run of benchmarks/benchmark.py: it runs, and its φ check and memory probe work."""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reptile.data.sine import SineWaves
from reptile.data.tasks import InnerSchedule

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"
spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
benchmark = importlib.util.module_from_spec(spec)
sys.modules["benchmark"] = benchmark  # dataclasses look their module up there
spec.loader.exec_module(benchmark)

CPU = torch.device("cpu")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_both_implementations_reach_the_same_phi(optimizer: str) -> None:
    setting = replace(benchmark.SETTINGS[0], inner_optimizer=optimizer, inner_steps=2)
    result = benchmark.compare(setting, rounds=1, device=CPU, memory=False)
    assert result.max_error < 1e-9
    assert result.project > 0 and result.loop > 0 and result.flops > 0
    assert result.compiled > 0 and result.compiled_error < 1e-4  # sine: also compiled


def test_a_wrong_baseline_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check has teeth: a loop with another inner learning rate ends elsewhere."""
    original = benchmark.loop_step
    monkeypatch.setattr(
        benchmark, "loop_step", lambda model, s: original(model, replace(s, inner_lr=0.05))
    )
    with pytest.raises(AssertionError, match="φ differs from the per-task loop's"):
        benchmark.compare(benchmark.SETTINGS[0], rounds=1, device=CPU, memory=False)


def test_memory_probe_reports_a_size() -> None:
    setting = replace(benchmark.SETTINGS[4], meta_batch=1, inner_steps=1)
    mib = benchmark.peak_memory(setting, CPU)
    assert set(mib) == {"project", "loop"}
    assert all(math.isfinite(value) and value >= 0 for value in mib.values())


def test_data_loading_rates_on_sine() -> None:
    setting = benchmark.SETTINGS[0]
    schedule = InnerSchedule(steps=setting.inner_steps, batch_size=setting.inner_batch)
    data = SineWaves(shots=setting.support, train_schedule=schedule)
    assert all(benchmark.loader_rate(data, workers, batches=3) > 0 for workers in (0, 1))
    alone, fed = benchmark.step_rates(setting, data, rounds=2, device=CPU)
    assert alone > 0 and fed > 0


@pytest.mark.slow
def test_end_to_end_rates_of_two_jobs_at_once() -> None:
    """train.py's own speed metrics, read back from two concurrent runs of the sine job."""
    rates, tests = benchmark.train_py_rates(
        ["experiment=sine", "dataset.grid_points=50"], 60, 4, Path("data"), copies=2
    )
    assert len(rates) == len(tests) == 2
    assert all(math.isfinite(r) and r > 0 for r in rates + tests)


def test_an_extra_path_is_todays_with_its_overrides() -> None:
    paths = benchmark.paths_for(CPU, ["dataset.num_workers=1 seed=3"])
    assert list(paths)[0] == "fp32 (today)" and list(paths)[-1] == "dataset.num_workers=1 seed=3"
    assert paths["dataset.num_workers=1 seed=3"] == [
        *paths["fp32 (today)"],
        "dataset.num_workers=1",
        "seed=3",
    ]


def test_versus_measures_both_checkouts_in_every_round(tmp_path: Path) -> None:
    """benchmarks/versus.py against a copy of this checkout (its src/ and benchmark.py): one
    row per selected setting, both trees measured in each of the 2 rounds."""
    other = tmp_path / "other"
    shutil.copytree(SCRIPT.parents[1] / "src", other / "src")
    (other / "benchmarks").mkdir()
    shutil.copy(SCRIPT, other / "benchmarks")
    command = [sys.executable, str(SCRIPT.parent / "versus.py"), str(other), "--rounds", "2"]
    command += ["--only", "sine, 10 tasks", "--steps", "1"]
    table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [row[0] for row in rows] == [
        f"| sine, 10 tasks × 32 steps ({o})" for o in ("sgd", "adam")
    ]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("×")
        assert row[4].count("→") == 2
