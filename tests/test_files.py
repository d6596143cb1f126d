"""Atomic replacement, and the removal of what killed writers left (reptile.files)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reptile import files
from reptile.files import atomic_file, copy_atomically, remove_orphans, write_atomically


def test_a_write_replaces_the_file_whole_and_a_failed_one_keeps_the_old(tmp_path: Path) -> None:
    path = tmp_path / "new" / "results.json"  # the folder is created
    write_atomically(path, b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(path) as file:
        file.write(b"new, half written")
        assert Path(file.name).parent == path.parent and path.read_bytes() == b"old"
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(path.parent) == ["results.json"]  # no temporary file left
    copy_atomically(path, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"old"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600: others can read it


WRITE_THAT_HANGS = """
import sys, time
from pathlib import Path
from reptile.files import atomic_file
with atomic_file(Path(sys.argv[1])) as file:
    file.write(b"part")
    file.flush()
    time.sleep(600)
"""


def age(path: Path, seconds: float) -> None:
    os.utime(path, (time.time() - seconds,) * 2)


@pytest.mark.skipif(files.fcntl is None, reason="no advisory file locks")
def test_the_next_write_removes_what_a_killed_write_left(tmp_path: Path, caplog) -> None:
    """A SIGKILLed writer cannot remove its temporary file (a checkpoint's size, or the image
    cache's 0.8 GB). The next write of the same file removes it, but never the file of a writer
    that is still running (it holds the file locked) or one just created (a writer locks its file
    only after creating it). The name is matched literally: brackets are not a glob pattern."""
    path = tmp_path / "epoch=0-[step=9].ckpt"
    with subprocess.Popen([sys.executable, "-c", WRITE_THAT_HANGS, str(path)]) as writer:
        try:
            deadline = time.monotonic() + 60
            while not (left := [p for p in tmp_path.iterdir() if p.name.startswith(".")]):
                assert writer.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            (temporary,) = left
            age(temporary, 3600)
            remove_orphans(path)
            assert temporary.exists()  # a live writer's
        finally:
            writer.kill()
    age(temporary, 1)
    remove_orphans(path)
    assert temporary.exists()  # as young as a file its writer has not locked yet
    age(temporary, 3600)
    remove_orphans(tmp_path / "other.ckpt")
    assert temporary.exists()  # another file's writes leave it alone
    with caplog.at_level(logging.INFO, logger="reptile.files"):
        write_atomically(path, b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == b"whole"
    assert f"Removed {temporary}, left by a write that was killed" in caplog.text
