"""Shared fixtures: the repository root, Hydra configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FIRST_DECODES
from train_process import TINY, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def compose(tmp_path: Path):
    """The run's config as `python train.py <overrides>` would compose it, writing to tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return hydra_compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides])

    return _compose


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short default run of `python train.py` (W&B offline), shared by the tests reading it."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    result = run(run_dir, *TINY, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: its controller reports
        session.config.workeroutput["first_decodes"] = session.config.stash.get(FIRST_DECODES, {})


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # pytest-xdist's controller, as a worker ends
    decodes = node.config.stash.setdefault(FIRST_DECODES, {})
    decodes.update(node.workeroutput.get("first_decodes", {}))


def pytest_terminal_summary(terminalreporter) -> None:
    for name, seconds in terminalreporter.config.stash.get(FIRST_DECODES, {}).items():
        terminalreporter.write_line(f"{name}: the session's first decode took {seconds:.1f} s")
