"""Session fixtures: the real datasets (../shared/data), each decoded once into a tmp cache."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from reptile.data import images as image_cache
from reptile.data.miniimagenet import MiniImageNet
from reptile.data.omniglot import Omniglot

from .real_data import MINIIMAGENET, OMNIGLOT

first_decodes: dict[str, float] = {}  # dataset → seconds its session cache took to build


def decoded_once(tmp_path_factory: pytest.TempPathFactory, name: str, make) -> Path:
    directory = tmp_path_factory.mktemp(f"{name}-cache")
    started = time.perf_counter()
    make(str(directory)).prepare()
    first_decodes[name] = time.perf_counter() - started
    return directory


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory) -> Path:
    """A cache of both Omniglot archives, built once for the session (32,460 PNGs)."""
    return decoded_once(
        tmp_path_factory, "Omniglot", lambda cache: Omniglot(root=OMNIGLOT, cache_dir=cache)
    )


@pytest.fixture(scope="session")
def miniimagenet_cache(tmp_path_factory) -> Path:
    """A cache of the real mini-imagenet.zip, built once for the session (60,000 JPEGs, 1.3 GB)."""
    return decoded_once(
        tmp_path_factory,
        "Mini-ImageNet",
        lambda cache: MiniImageNet(root=MINIIMAGENET, cache_dir=cache),
    )


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image is decoded (a valid cache must be used as it is)."""

    def decode(*args, **kwargs):
        raise AssertionError("decoded images although a valid cache was there")

    monkeypatch.setattr(image_cache, "decode_into", decode)


def pytest_terminal_summary(terminalreporter) -> None:
    for name, seconds in first_decodes.items():
        terminalreporter.write_line(f"{name}: the session's first decode took {seconds:.1f} s")
