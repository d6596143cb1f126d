"""Shared fixtures: the repository root, the read-only shared data, Hydra configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
