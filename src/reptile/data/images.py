"""Image files decoded once into one uint8 tensor, cached on disk so later runs skip decoding.

The cache file stores the images with a fingerprint of what they were made from (file names,
sizes and modification times, decoding settings) and a checksum of their bytes. A cache whose
fingerprint differs (stale) or that cannot be read or fails its checksum (damaged) is rebuilt, with
a warning; it is never used. Writes go to a temporary file that replaces the cache atomically, so
an interrupted or concurrent build never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import tempfile
import time
import zipfile
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from reptile.data.fewshot import Split

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cache's layout or the decoding changes
RESAMPLE = Image.Resampling.LANCZOS
MODES = {1: "L", 3: "RGB"}  # PIL mode per number of channels
PARALLEL_FROM = 2000  # fewer images decode faster in this process than a pool starts


@dataclass(frozen=True)
class ImageFile:
    """An image on disk: the file `path`, or the member `path` of the zip file `archive`."""

    path: str
    archive: str | None = None

    def __str__(self) -> str:
        return f"{self.archive}:{self.path}" if self.archive else self.path


ClassFiles = dict[str, list[ImageFile]]  # class name → its images, both in a fixed order


def default_cache_dir(dataset: str) -> Path:
    """`$XDG_CACHE_HOME/reptile/<dataset>`, by default `~/.cache/reptile/<dataset>`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reptile" / dataset


def cache_path(cache_dir: str | None, dataset: str, root: Path, *settings: object) -> Path:
    """The cache file of the dataset at `root` decoded with `settings`.

    The resolved root is part of the name, so two copies of a dataset never overwrite each
    other's cache; the settings are, so that changing them back finds the old cache.
    """
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(dataset)
    where = hashlib.blake2b(str(root.expanduser().resolve()).encode(), digest_size=4).hexdigest()
    return directory / "-".join([dataset, *map(str, settings), where + ".pt"])


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
        images = decode_images(files, image_size, channels)
        log.info("Decoded %d images in %.1f s", len(files), time.perf_counter() - started)
        write_cache(cache, fingerprint, images)
    return Split(images, torch.stack([stops - sizes, stops], 1), tuple(classes))


def files_fingerprint(classes: ClassFiles, image_size: int, channels: int) -> str:
    """What the decoded images depend on: names, size and time of every file, the settings."""
    digest = hashlib.blake2b(digest_size=16)
    settings = [CACHE_FORMAT, image_size, channels, RESAMPLE.name]
    digest.update(json.dumps(settings).encode())
    archives = set()
    for name, files in classes.items():
        digest.update(f"\0class\0{name}".encode())
        for file in files:
            if file.archive is None:
                stat = os.stat(file.path)
                digest.update(f"\0{file.path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            else:
                archives.add(file.archive)
                digest.update(f"\0{file.path}".encode())
    for archive in sorted(archives):
        stat = os.stat(archive)
        digest.update(f"\0archive\0{archive}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def checksum(images: torch.Tensor) -> str:
    return hashlib.blake2b(images.contiguous().numpy(), digest_size=16).hexdigest()


def read_cache(path: Path, fingerprint: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached images, or None (with a warning if a cache was there but stale or damaged)."""
    if not path.exists():
        return None
    try:
        # mmap: the pages are shared by every process of the run that loads the same cache.
        cached = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        problem = cache_problem(cached, fingerprint, shape)
    except Exception as error:  # whatever makes a file unreadable, it is a damaged cache
        problem = f"damaged ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    if problem:
        log.warning("The image cache %s is %s: rebuilding it", path, problem)
        return None
    return cached["images"]


def cache_problem(cached: Any, fingerprint: str, shape: tuple[int, ...]) -> str | None:
    if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT:
        return "stale (written by another version of this code)"
    if cached.get("fingerprint") != fingerprint:
        return "stale (the image files or the decoding settings have changed)"
    images = cached.get("images")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return "damaged (no uint8 images in it)"
    if tuple(images.shape) != shape:
        return f"damaged (images of shape {tuple(images.shape)}, expected {shape})"
    if cached.get("checksum") != checksum(images):
        return "damaged (its images fail their checksum)"
    return None


def write_cache(path: Path, fingerprint: str, images: torch.Tensor) -> None:
    """Atomically replaces `path`; a cache that cannot be written only costs a later decode."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            cached = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "images": images}
            torch.save({**cached, "checksum": checksum(images)}, file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(temporary, path)
    except OSError as error:
        log.warning(
            "Could not write the image cache %s (%s): the next run decodes again", path, error
        )
        if temporary is not None:
            with suppress(OSError):
                os.unlink(temporary)


def decode_images(files: list[ImageFile], image_size: int, channels: int) -> torch.Tensor:
    """Decodes and resizes `files` into uint8 [len(files), channels, image_size, image_size]."""
    images = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    workers = decode_workers(len(files))
    jobs = decode_jobs(files, image_size, channels, chunk=max(64, -(-len(files) // (8 * workers))))
    if workers == 1:
        for start, chunk in map(decode_chunk, jobs):
            images[start : start + len(chunk)] = chunk
    else:
        # fork: the workers need only PIL and numpy, and start at once (spawn would re-import
        # torch and Lightning in each of them).
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for start, chunk in pool.imap_unordered(decode_chunk, jobs):
                images[start : start + len(chunk)] = chunk
    return torch.from_numpy(images)


def decode_workers(count: int) -> int:
    """Processes to decode `count` images with: one where a pool is not worth it or not possible."""
    if count < PARALLEL_FROM or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if multiprocessing.current_process().daemon:  # e.g. a DataLoader worker: no children allowed
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 16))


DecodeJob = tuple[int, str | None, list[str], int, int]  # start, archive, paths, size, channels


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
        jobs.append((start, archive, [f.path for f in files[start:stop]], image_size, channels))
        start = stop
    return jobs


def decode_chunk(job: DecodeJob) -> tuple[int, np.ndarray]:
    start, archive, paths, image_size, channels = job
    images = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    with ExitStack() as stack:
        # Each job opens its own handle: one inherited across fork would share its file offset.
        zip_file = stack.enter_context(zipfile.ZipFile(archive)) if archive else None
        for i, path in enumerate(paths):
            try:
                source = io.BytesIO(zip_file.read(path)) if zip_file else path
                images[i] = decode(source, image_size, channels)
            except Exception as error:
                where = ImageFile(path, archive)
                raise OSError(f"cannot decode the image {where}: {error}") from error
    return start, images


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
