"""Session fixtures: the real datasets (../shared/data), each decoded once into a tmp cache that
the session's processes share (pytest-xdist's workers: the first to take the lock builds it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import FIRST_DECODES

from reptile.data import images as image_cache
from reptile.data.miniimagenet import MiniImageNet
from reptile.data.omniglot import Omniglot
from reptile.files import fcntl

from .real_data import MINIIMAGENET, OMNIGLOT


def decoded_once(
    tmp_path_factory: pytest.TempPathFactory, config: pytest.Config, name: str, make
) -> Path:
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ and fcntl is not None:
        base = base.parent  # the run's folder, above each worker's own
    directory = base / f"{name}-cache"
    directory.mkdir(exist_ok=True)
    with open(base / f"{name}-cache.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        decodes = not any(directory.iterdir())  # rather than check another worker's cache
        started = time.perf_counter()
        make(str(directory)).prepare()
    if decodes:
        config.stash.setdefault(FIRST_DECODES, {})[name] = time.perf_counter() - started
    return directory


@pytest.fixture(scope="session")
def omniglot_cache(tmp_path_factory, pytestconfig) -> Path:
    """A cache of both Omniglot archives, built once for the session (32,460 PNGs)."""
    return decoded_once(
        tmp_path_factory,
        pytestconfig,
        "Omniglot",
        lambda cache: Omniglot(root=OMNIGLOT, cache_dir=cache),
    )


@pytest.fixture(scope="session")
def miniimagenet_cache(tmp_path_factory, pytestconfig) -> Path:
    """A cache of the real mini-imagenet.zip, built once for the session (60,000 JPEGs, 1.3 GB)."""
    return decoded_once(
        tmp_path_factory,
        pytestconfig,
        "Mini-ImageNet",
        lambda cache: MiniImageNet(root=MINIIMAGENET, cache_dir=cache),
    )


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image is decoded (a valid cache must be used as it is)."""

    def decode(*args, **kwargs):
        raise AssertionError("decoded images although a valid cache was there")

    monkeypatch.setattr(image_cache, "decode_into", decode)
