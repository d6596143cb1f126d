"""Image files decoded once into a uint8 array on disk that every process of a run memory-maps.

A cache entry is two files: `<name>.npy`, the images as a plain uint8 [N, C, H, W] array, and
`<name>.json`, a fingerprint of what they were made from (file names, sizes and modification
times, decoding settings) and the CRC-32 and size of the .npy. Loading checks the fingerprint and
the CRC-32 (reading the file through the page cache, not into the process) and maps the array: the
processes of a run and their DataLoader workers share its pages, and the kernel can drop them
under memory pressure, so a 1.3 GB dataset never has to sit in any one process's private memory.

A cache whose fingerprint differs (stale) or that is unreadable, short or fails its CRC-32
(damaged) is rebuilt, with a warning; it is never used. Each file is replaced atomically
(reptile.files), the array before the metadata, so an interrupted or concurrent build never leaves
a cache that passes the checks with the wrong images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import mmap
import multiprocessing
import multiprocessing.pool
import os
import signal
import time
import zipfile
import zlib
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from reptile.config import ConfigValueError, is_int, require, require_int
from reptile.data.fewshot import FewShotClassification, Split
from reptile.files import atomic_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cache's layout or the decoding changes
RESAMPLE = Image.Resampling.LANCZOS
MODES = {1: "L", 3: "RGB"}  # PIL mode per number of channels
PARALLEL_FROM = 2000  # fewer images decode faster in this process than a pool starts
READ_SIZE = 16 * 2**20  # bytes per block when a cache's file is read or written whole
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
        self.input_shape = (channels, image_size, image_size)

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
        return write_cache(cache, fingerprint, shape, lambda images: decode_into(images, files))
    except OSError as error:  # decoding raises DamagedFiles: this is the cache's folder or disk
        log.warning(
            "Could not write the image cache %s (%s): decoding into memory; the next run decodes "
            "again",
            cache,
            error,
        )
    images = shared_array(shape)
    decode_into(images, files)
    return images


def write_cache(
    cache: Path, fingerprint: str, shape: tuple[int, ...], fill: Callable[[np.ndarray], None]
) -> np.ndarray:
    """Writes the array (`fill` writes its images in place) and then its metadata; maps it."""
    data, meta = cache_files(cache)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    offset = len(header.getvalue())
    with atomic_file(data) as file:
        file.write(header.getvalue())
        reserve(file, offset + math.prod(shape))
        filled = np.memmap(file, dtype=np.uint8, mode="r+", offset=offset, shape=shape)
        fill(filled)
        filled.flush()
        metadata = {
            "format": CACHE_FORMAT,
            "fingerprint": fingerprint,
            "shape": list(shape),
            "bytes": os.fstat(file.fileno()).st_size,
            "crc32": file_crc32(file),
        }
        images = map_array(file, offset, shape)
    with atomic_file(meta) as file:
        file.write(json.dumps(metadata, indent=1).encode())
    return images


def reserve(file: IO[bytes], size: int) -> None:
    """Allocates the file's `size` bytes on disk, so that a full disk is an OSError here rather
    than a SIGBUS when the mapped array is written."""
    file.flush()
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(file.fileno(), 0, size)
        return
    zeros = bytes(READ_SIZE)
    end = file.seek(0, os.SEEK_END)
    while end < size:
        end += file.write(zeros[: size - end])
    file.flush()


def shared_array(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed uint8 array in memory that forked processes write into (a shared mapping)."""
    buffer = mmap.mmap(-1, max(1, math.prod(shape)))
    return np.frombuffer(buffer, dtype=np.uint8, count=math.prod(shape)).reshape(shape)


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


def decode_into(images: np.ndarray, files: list[ImageFile]) -> None:
    """Decodes `files` into `images` (uint8 [n, channels, size, size], shared with forked
    processes: a mapped file or `shared_array`).

    Raises DamagedFiles at the first file that cannot be decoded, naming it or, in an archive,
    every member that fails its CRC-32 check.
    """
    workers = decode_workers(len(files))
    jobs = decode_jobs(files, chunk=max(64, -(-len(files) // (8 * workers))))
    with ExitStack() as stack:
        stack.callback(close_archives)
        if workers == 1:
            failures: Iterable[Failure | None] = (decode_chunk(job, images) for job in jobs)
        else:
            # The workers write the images into the shared array and send back only failures.
            # Sending the images (megabytes per job) could hang Pool.terminate: after an error,
            # a worker blocked writing a result that nobody reads any more holds the lock that
            # terminate needs. imap keeps the order, so the first failure is the first file's.
            pool = stack.enter_context(decode_pool(workers, images))
            failures = pool.imap(decode_in_worker, jobs)
        for failure in failures:
            if failure is not None:
                raise DamagedFiles(describe_failure(*failure))


def decode_pool(workers: int, images: np.ndarray) -> multiprocessing.pool.Pool:
    """Processes that decode images into `images`; leaving the pool's context terminates them.

    fork: the workers need only PIL and numpy, and start at once (spawn would re-import torch and
    Lightning in each of them). They would inherit the run's SIGTERM handler, which ignores the
    signal outside the main process, and `Pool.terminate` (SIGTERM) would then wait forever for a
    worker blocked on the pool's task queue: they take the default action back. Ctrl-C reaches
    the whole process group; the main process answers it by terminating the pool.
    """
    context = multiprocessing.get_context("fork")
    return context.Pool(workers, initializer=start_worker, initargs=(images,))


_worker_images: np.ndarray | None = None  # in a pool's worker: the array it decodes into


def start_worker(images: np.ndarray) -> None:
    """A forked worker's start: the default stop signals, and the (inherited, shared) array."""
    global _worker_images
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_images = images


def decode_in_worker(job: DecodeJob) -> Failure | None:
    assert _worker_images is not None, "runs in a decode_pool worker"
    return decode_chunk(job, _worker_images)


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


DecodeJob = tuple[str | None, list[str], int]  # archive, paths, index of the first image
Failure = tuple[ImageFile, str]  # a file that cannot be decoded, and why


def decode_jobs(files: list[ImageFile], chunk: int) -> list[DecodeJob]:
    """Runs of at most `chunk` consecutive files from the same archive (or from none)."""
    jobs: list[DecodeJob] = []
    start = 0
    while start < len(files):
        archive = files[start].archive
        stop = start + 1
        while stop < len(files) and stop - start < chunk and files[stop].archive == archive:
            stop += 1
        jobs.append((archive, [f.path for f in files[start:stop]], start))
        start = stop
    return jobs


def decode_chunk(job: DecodeJob, images: np.ndarray) -> Failure | None:
    """Decodes the files of one job into their rows of `images`, stopping at the first that
    cannot be read or decoded."""
    archive, paths, start = job
    _, channels, image_size, _ = images.shape
    zip_file = archive_handle(archive) if archive else None
    for index, path in enumerate(paths, start):
        try:
            source = io.BytesIO(zip_file.read(path)) if zip_file else path
            images[index] = decode(source, image_size, channels)
        except Exception as error:  # any failure is this file's: it is named to the user
            return ImageFile(path, archive), f"{type(error).__name__}: {error}"
    return None


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
