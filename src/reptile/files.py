"""Files replaced atomically: every file the project keeps (checkpoints, results, the image cache,
downloads, the paper's records) is written to a temporary file beside it and renamed into place,
so a reader, or a process killed mid-write, sees the old file or the new one, never a part.

A writer holds an advisory lock on its temporary file while it writes. The next write of the same
file removes the temporary files of writers that died without cleaning up (SIGKILL, a power cut):
those no live process holds locked.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; temporary files of killed writers stay
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# A temporary file is an orphan once unlocked and this old: a writer locks its file just after
# creating it and holds the lock until the file is renamed or removed.
ORPHAN_SECONDS = 60.0


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A new file, open for writing and reading, that replaces `path` if the block succeeds and is
    removed if it fails; its `name` is the temporary file's path. Temporary files that killed
    writers of `path` left are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        with open(temporary, "w+b") as file:
            if fcntl is not None:  # held while this process (or a child it forks) has it open
                fcntl.flock(file, fcntl.LOCK_EX)
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared file from other users
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    with atomic_file(path) as file:
        file.write(data)


def copy_atomically(source: Path, target: Path) -> None:
    with atomic_file(target) as file, open(source, "rb") as original:
        shutil.copyfileobj(original, file)


def remove_orphans(path: Path) -> None:
    """Removes the temporary files that writers of `path` left behind when they were killed: no
    process holds them locked and they are older than ORPHAN_SECONDS."""
    if fcntl is None:
        return
    for temporary in path.parent.glob(f".{glob.escape(path.name)}.*"):
        with suppress(OSError), open(temporary, "rb") as file:  # OSError: gone, or locked
            if time.time() - os.fstat(file.fileno()).st_mtime < ORPHAN_SECONDS:
                continue  # a writer that has not locked its file yet
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(temporary)
            log.info("Removed %s, left by a write that was killed", temporary)
