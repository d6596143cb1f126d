"""Image files decoded once into a uint8 array on disk that every process of a run memory-maps.

A cache entry is two files: `<name>.npy`, the images as a plain uint8 [N, C, H, W] array, and
`<name>.json`, a fingerprint of what they were made from (file names, sizes and modification
times, decoding settings) and the CRC-32 and size of the .npy. Loading checks the fingerprint and
the CRC-32 (reading the file through the page cache, not into the process) and maps the array: the
processes of a run and their DataLoader workers share its pages, and the kernel can drop them
under memory pressure, so a 1.3 GB dataset never has to sit in any one process's private memory.

A cache whose fingerprint differs (stale) or that is unreadable, short or fails its CRC-32
(damaged) is rebuilt, with a warning; it is never used. Each file is written to a temporary file
that replaces it atomically, the array before the metadata, so an interrupted or concurrent build
never leaves a cache that passes the checks with the wrong images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal
import tempfile
import time
import zipfile
import zlib
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from reptile.config import ConfigValueError, is_int, require, require_int
from reptile.data.fewshot import FewShotClassification, Split

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cache's layout or the decoding changes
RESAMPLE = Image.Resampling.LANCZOS
MODES = {1: "L", 3: "RGB"}  # PIL mode per number of channels
PARALLEL_FROM = 2000  # fewer images decode faster in this process than a pool starts
READ_SIZE = 16 * 2**20  # bytes per read when checking a cache's CRC-32
LISTED = 5  # damaged files named in an error message


class DamagedFiles(Exception):
    """Image files (or the archive holding them) that cannot be read; the message names them."""


@dataclass(frozen=True)
class ImageFile:
    """An image on disk: the file `path`, or the member `path` of the zip file `archive`."""

    path: str
    archive: str | None = None

    def __str__(self) -> str:
        return f"{self.archive}:{self.path}" if self.archive else self.path


ClassFiles = dict[str, list[ImageFile]]  # class name → its images, both in a fixed order


class ImageDataset(FewShotClassification):
    """The base of the datasets made of image files: where they are and how they are decoded.

    `root` holds the dataset's files; they are decoded and resized to `image_size` squares with
    `channels` (1: grayscale, 3: RGB) once, into the cache under `cache_dir` (default
    `~/.cache/reptile/<cache_name>`). Subclasses list their files and build the splits with
    `load_images`; files that cannot be read become one line naming them and `repair`.
    """

    cache_name: str  # the cache files' prefix and default folder
    repair: str  # what a user can do about damaged files

    def __init__(
        self,
        root: str | Path,
        cache_dir: str | None = None,
        image_size: int = 84,
        channels: int = 3,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        require_int("image_size", image_size, 1)
        require(
            is_int(channels) and channels in MODES, "channels", channels, "1 (grayscale) or 3 (RGB)"
        )
        self.root = Path(root).expanduser()
        self.cache_dir = cache_dir
        self.image_size = image_size
        self.channels = channels

    @abstractmethod
    def image_splits(self) -> dict[str, Split]:
        """The "train", "val" and "test" splits, built with `load_images`."""

    def load_splits(self) -> dict[str, Split]:
        try:
            return self.image_splits()
        except DamagedFiles as error:  # the one-line error `require` would raise, chained
            accepted = f"intact image files, but {error}: {self.repair}"
            raise ConfigValueError("root", str(self.root), accepted) from error

    def load_images(self, classes: ClassFiles, *part: str) -> Split:
        """The images of `classes` through the cache entry of this root, `part` and settings."""
        settings = (*part, f"{self.image_size}px", f"{self.channels}ch")
        cache = cache_path(self.cache_dir, self.cache_name, self.root, *settings)
        return load_classes(classes, self.image_size, self.channels, cache)


def default_cache_dir(dataset: str) -> Path:
    """`$XDG_CACHE_HOME/reptile/<dataset>`, by default `~/.cache/reptile/<dataset>`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reptile" / dataset


def cache_path(cache_dir: str | None, dataset: str, root: Path, *settings: object) -> Path:
    """The cache entry (`.npy` + `.json`) of the dataset at `root` decoded with `settings`.

    The resolved root is part of the name, so two copies of a dataset never overwrite each
    other's cache; the settings are, so that changing them back finds the old cache.
    """
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(dataset)
    where = hashlib.blake2b(str(root.expanduser().resolve()).encode(), digest_size=4).hexdigest()
    return directory / "-".join([dataset, *map(str, settings), where])


def cache_files(cache: Path) -> tuple[Path, Path]:
    """The array and the metadata file of cache entry `cache`."""
    return cache.with_name(cache.name + ".npy"), cache.with_name(cache.name + ".json")


def load_classes(classes: ClassFiles, image_size: int, channels: int, cache: Path) -> Split:
    """The images of `classes` as uint8 [N, channels, image_size, image_size], via the cache."""
    files = [file for class_files in classes.values() for file in class_files]
    sizes = torch.tensor([len(class_files) for class_files in classes.values()], dtype=torch.long)
    stops = sizes.cumsum(0)
    fingerprint = files_fingerprint(classes, image_size, channels)
    shape = (len(files), channels, image_size, image_size)
    images = read_cache(cache, fingerprint, shape)
    if images is None:
        log.info("Decoding %d images into %s (once: later runs load this cache)", len(files), cache)
        started = time.perf_counter()
        images = build_cache(cache, fingerprint, files, image_size, channels)
        log.info("Decoded %d images in %.1f s", len(files), time.perf_counter() - started)
    return Split(torch.from_numpy(images), torch.stack([stops - sizes, stops], 1), tuple(classes))


def files_fingerprint(classes: ClassFiles, image_size: int, channels: int) -> str:
    """What the decoded images depend on: names, size and time of every file, the settings.

    Paths are made absolute: the same files reached from another working directory are the same.
    """
    digest = hashlib.blake2b(digest_size=16)
    settings = [CACHE_FORMAT, image_size, channels, RESAMPLE.name]
    digest.update(json.dumps(settings).encode())
    archives = set()
    for name, files in classes.items():
        digest.update(f"\0class\0{name}".encode())
        for file in files:
            if file.archive is None:
                stat = os.stat(file.path)
                path = os.path.abspath(file.path)
                digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            else:
                archives.add(os.path.abspath(file.archive))
                digest.update(f"\0{file.path}".encode())
    for archive in sorted(archives):
        stat = os.stat(archive)
        digest.update(f"\0archive\0{archive}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class CacheProblem(Exception):
    """Why a cache entry cannot be used: "stale (…)" or "damaged (…)"."""


def read_cache(cache: Path, fingerprint: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached images, mapped; None (with a warning if a cache was there but is not usable)."""
    if not any(path.exists() for path in cache_files(cache)):
        return None
    try:
        return open_cache(cache, fingerprint, shape)
    except CacheProblem as error:
        problem = str(error)
    except Exception as error:  # whatever makes a file unreadable, it is a damaged cache
        problem = f"damaged ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    log.warning("The image cache %s is %s: rebuilding it", cache, problem)
    return None


def open_cache(cache: Path, fingerprint: str, shape: tuple[int, ...]) -> np.ndarray:
    """Checks the entry and maps its array; raises CacheProblem if it is stale or damaged."""
    data, meta = cache_files(cache)
    metadata = json.loads(meta.read_text())
    if metadata.get("format") != CACHE_FORMAT:
        raise CacheProblem("stale (written by another version of this code)")
    if metadata["fingerprint"] != fingerprint:
        raise CacheProblem("stale (the image files or the decoding settings have changed)")
    # One open file for the checks and the map: a cache replaced meanwhile is not mixed in.
    with open(data, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size != metadata["bytes"]:
            raise CacheProblem(f"damaged ({size} bytes instead of {metadata['bytes']})")
        if file_crc32(file) != metadata["crc32"]:
            raise CacheProblem("damaged (it fails its CRC-32 check)")
        file.seek(0)
        if np.lib.format.read_magic(file) != (1, 0):
            raise CacheProblem("damaged (not a version 1.0 .npy array)")
        stored, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
        if (stored, fortran_order, dtype) != (shape, False, np.dtype(np.uint8)):
            raise CacheProblem(f"damaged (a {dtype} array of shape {stored}, expected {shape})")
        return map_array(file, file.tell(), shape)


def map_array(file: IO[bytes], offset: int, shape: tuple[int, ...]) -> np.ndarray:
    # Copy-on-write: writable (as torch.from_numpy wants) without ever writing to the cache.
    return np.memmap(file, dtype=np.uint8, mode="c", offset=offset, shape=shape)


def file_crc32(file: IO[bytes]) -> int:
    """CRC-32 of the whole file, read in chunks into one reused buffer."""
    file.seek(0)
    crc, buffer = 0, bytearray(READ_SIZE)
    view = memoryview(buffer)
    while count := file.readinto(buffer):
        crc = zlib.crc32(view[:count], crc)
    return crc


def build_cache(
    cache: Path, fingerprint: str, files: list[ImageFile], image_size: int, channels: int
) -> np.ndarray:
    """Decodes `files` into a new cache entry and maps it; in memory if it cannot be written."""
    shape = (len(files), channels, image_size, image_size)
    try:
        with closing(decoded_chunks(files, image_size, channels)) as chunks:
            return write_cache(cache, fingerprint, shape, chunks)
    except OSError as error:  # decoding raises DamagedFiles: this is the cache's folder or disk
        log.warning(
            "Could not write the image cache %s (%s): decoding into memory; the next run decodes "
            "again",
            cache,
            error,
        )
    images = np.empty(shape, dtype=np.uint8)
    start = 0
    with closing(decoded_chunks(files, image_size, channels)) as chunks:
        for chunk in chunks:
            images[start : start + len(chunk)] = chunk
            start += len(chunk)
    return images


def write_cache(
    cache: Path, fingerprint: str, shape: tuple[int, ...], chunks: Iterable[np.ndarray]
) -> np.ndarray:
    """Writes the array (from `chunks`, in order) and then its metadata; maps the array."""
    data, meta = cache_files(cache)
    data.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(data) as file:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "|u1", "fortran_order": False, "shape": shape}
        )
        blocks = chain([header.getvalue()], (memoryview(chunk.reshape(-1)) for chunk in chunks))
        crc = 0
        for block in blocks:
            file.write(block)
            crc = zlib.crc32(block, crc)
        file.flush()  # the map sees the file, not Python's buffer
        metadata = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "shape": list(shape),
            "bytes": file.tell(),
            "crc32": crc,
        }
        images = map_array(file, len(header.getvalue()), shape)
    with atomic_file(meta) as file:
        file.write(json.dumps(metadata, indent=1).encode())
    return images


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A new file that replaces `path` if the block succeeds and is removed if it fails."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w+b") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


@contextmanager
def open_archive(path: str | Path) -> Iterator[zipfile.ZipFile]:
    """The zip file at `path`; DamagedFiles if it, or a member read in the block, is unreadable."""
    try:
        with zipfile.ZipFile(path) as archive:
            yield archive
    except (zipfile.BadZipFile, EOFError) as error:
        raise DamagedFiles(
            f"{path} is not an intact zip archive ({error}; a truncated or partial copy?)"
        ) from error


def damaged_members(archive: str) -> list[str]:
    """The members of `archive` that cannot be read back intact (CRC-32, headers, compression)."""
    damaged = []
    with zipfile.ZipFile(archive) as zip_file:
        for info in zip_file.infolist():
            try:
                with zip_file.open(info) as member:
                    while member.read(READ_SIZE):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError):
                damaged.append(info.filename)
    return damaged


def decoded_chunks(files: list[ImageFile], image_size: int, channels: int) -> Iterator[np.ndarray]:
    """`files` decoded as uint8 [n, channels, image_size, image_size] runs, in order.

    Raises DamagedFiles at the first file that cannot be decoded, naming it or, in an archive,
    every member that fails its CRC-32 check.
    """
    workers = decode_workers(len(files))
    jobs = decode_jobs(files, image_size, channels, chunk=max(64, -(-len(files) // (8 * workers))))
    with ExitStack() as stack:
        stack.callback(close_archives)
        if workers == 1:
            results: Iterable[DecodedChunk] = map(decode_chunk, jobs)
        else:
            # imap keeps the order, so the cache is written as it goes.
            results = stack.enter_context(decode_pool(workers)).imap(decode_chunk, jobs)
        for images, failure in results:
            if failure is not None:
                raise DamagedFiles(describe_failure(*failure))
            yield images


def decode_pool(workers: int) -> multiprocessing.pool.Pool:
    """Processes that decode images; leaving the pool's context terminates them.

    fork: the workers need only PIL and numpy, and start at once (spawn would re-import torch and
    Lightning in each of them). They would inherit the run's SIGTERM handler, which ignores the
    signal outside the main process, and `Pool.terminate` (SIGTERM) would then wait forever for a
    worker blocked on the pool's task queue: they take the default action back. Ctrl-C reaches
    the whole process group; the main process answers it by terminating the pool.
    """
    return multiprocessing.get_context("fork").Pool(workers, initializer=default_stop_signals)


def default_stop_signals() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def describe_failure(file: ImageFile, reason: str) -> str:
    if file.archive is not None:
        damaged = damaged_members(file.archive)
        if damaged:
            listed = ", ".join(damaged[:LISTED]) + (", …" if len(damaged) > LISTED else "")
            return f"{len(damaged)} members of {file.archive} fail their CRC-32 check ({listed})"
    return f"the image {file} cannot be decoded ({reason})"


def decode_workers(count: int) -> int:
    """Processes to decode `count` images with: one where a pool is not worth it or not possible.

    At most torch's thread count, so that `threads=1` keeps the whole run on one core.
    """
    if count < PARALLEL_FROM or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if multiprocessing.current_process().daemon:  # e.g. a DataLoader worker: no children allowed
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, torch.get_num_threads(), 16))


DecodeJob = tuple[str | None, list[str], int, int]  # archive, paths, size, channels
DecodedChunk = tuple[np.ndarray, tuple[ImageFile, str] | None]  # images, first failure if any


def decode_jobs(
    files: list[ImageFile], image_size: int, channels: int, chunk: int
) -> list[DecodeJob]:
    """Runs of at most `chunk` consecutive files from the same archive (or from none)."""
    jobs: list[DecodeJob] = []
    start = 0
    while start < len(files):
        archive = files[start].archive
        stop = start + 1
        while stop < len(files) and stop - start < chunk and files[stop].archive == archive:
            stop += 1
        jobs.append((archive, [f.path for f in files[start:stop]], image_size, channels))
        start = stop
    return jobs


def decode_chunk(job: DecodeJob) -> DecodedChunk:
    """The images of one job, stopping at the first that cannot be read or decoded."""
    archive, paths, image_size, channels = job
    images = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    zip_file = archive_handle(archive) if archive else None
    for i, path in enumerate(paths):
        try:
            source = io.BytesIO(zip_file.read(path)) if zip_file else path
            images[i] = decode(source, image_size, channels)
        except Exception as error:  # any failure is this file's: it is named to the user
            return images, (ImageFile(path, archive), f"{type(error).__name__}: {error}")
    return images, None


_archives: dict[str, zipfile.ZipFile] = {}  # this process's open archives, by path
_archives_pid = os.getpid()


def archive_handle(path: str) -> zipfile.ZipFile:
    """This process's handle on the archive `path`, opened once (reading the directory of
    60,000 members takes a while); a handle inherited across fork would share its file offset
    with the parent's, so a forked process opens its own."""
    global _archives_pid
    if _archives_pid != os.getpid():
        _archives.clear()
        _archives_pid = os.getpid()
    if path not in _archives:
        _archives[path] = zipfile.ZipFile(path)
    return _archives[path]


def close_archives() -> None:
    while _archives:
        _archives.popitem()[1].close()


def decode(source: str | IO[bytes], image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 [channels, image_size, image_size] (the aspect ratio is not kept)."""
    mode = MODES[channels]
    with Image.open(source) as image:
        # JPEG only: decode at the smallest scale that is still at least image_size (much faster).
        image.draft(mode, (image_size, image_size))
        image = image.convert(mode)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), RESAMPLE)
        array = np.asarray(image)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)
