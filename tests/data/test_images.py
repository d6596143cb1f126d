"""The image cache every image dataset decodes into: reuse, memory-mapping, rebuilding, failures.

The mechanism is checked on a small folder of generated images (ImageFolder: every way a cache
can be damaged or stale), then on the real datasets: the session caches of Omniglot and
Mini-ImageNet are reused without decoding and mapped from disk, and a damaged split of the real
Mini-ImageNet cache is decoded again alone.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reptile.cli import STOP_SIGNALS, stop_request
from reptile.config import ConfigValueError
from reptile.data import images as image_cache
from reptile.data.imagefolder import ImageFolder
from reptile.data.images import ImageFile, decode_pool, shared_array
from reptile.data.miniimagenet import MiniImageNet
from reptile.data.omniglot import Omniglot

from .real_data import MINIIMAGENET, OMNIGLOT, needs_miniimagenet, needs_omniglot

NUM_CLASSES = 8
IMAGES_PER_CLASS = 4
LOGGER = "reptile.data.images"


@pytest.fixture
def root(tmp_path) -> Path:
    """root/class<c>/<i>.png: random RGB images of 20×20 pixels."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(NUM_CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def load(root: Path, cache: Path) -> ImageFolder:
    data = ImageFolder(
        root=root,
        cache_dir=str(cache),
        image_size=20,
        ways=2,
        train_shots=2,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    data.prepare()
    return data


def entry(cache: Path) -> tuple[Path, Path]:
    """The array and the metadata file of the one cache entry in `cache`."""
    (data,) = cache.glob("*.npy")
    return data, data.with_suffix(".json")


def png_pixels(root: Path) -> torch.Tensor:
    """Every image as uint8 [N, 3, 20, 20], classes and files sorted: what the cache must hold."""
    return png_pixels_of([ImageFile(str(png)) for png in sorted(root.glob("*/*.png"))])


def png_pixels_of(files: list[ImageFile]) -> torch.Tensor:
    arrays = []
    for png in files:
        with Image.open(png.path) as image:
            arrays.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


@pytest.fixture(params=[1, 2], ids=["in-process", "pool"])
def workers(request, monkeypatch) -> int:
    """Decoding in this process, or in a pool of 2 forked workers (used from PARALLEL_FROM images
    on: here forced for a few)."""
    monkeypatch.setattr(image_cache, "decode_workers", lambda count: request.param)
    return request.param


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")


@linux_only
def test_images_are_mapped_from_the_cache_and_reused(root, tmp_path, request, workers):
    first = load(root, tmp_path / "cache")
    data, meta = entry(tmp_path / "cache")
    assert torch.equal(first.splits["train"].images, png_pixels(root))
    assert torch.equal(torch.from_numpy(np.load(data)), png_pixels(root))  # a plain .npy
    assert json.loads(meta.read_text())["bytes"] == data.stat().st_size
    assert str(data.resolve()) in mapped_files()
    request.getfixturevalue("no_decoding")
    again = load(root, tmp_path / "cache")
    assert torch.equal(again.splits["train"].images, png_pixels(root))


def test_the_same_files_by_another_path_reuse_the_cache(root, tmp_path, monkeypatch, request):
    load(root, tmp_path / "cache")
    request.getfixturevalue("no_decoding")
    monkeypatch.chdir(root.parent)
    again = load(Path(root.name), tmp_path / "cache")  # a relative root
    assert torch.equal(again.splits["train"].images, png_pixels(root))


def flip_a_pixel(data: Path, meta: Path) -> None:
    with open(data, "r+b") as file:
        file.seek(-100, 2)
        byte = file.read(1)[0]
        file.seek(-100, 2)
        file.write(bytes([byte ^ 1]))


def truncate(data: Path, meta: Path) -> None:
    data.write_bytes(data.read_bytes()[:-100])


def remove_the_array(data: Path, meta: Path) -> None:
    data.unlink()


def remove_the_metadata(data: Path, meta: Path) -> None:
    meta.unlink()


def garble_the_metadata(data: Path, meta: Path) -> None:
    meta.write_text('{"format": 2, "finger')


def edit_metadata(**changes) -> Callable[[Path, Path], None]:
    def edit(data: Path, meta: Path) -> None:
        meta.write_text(json.dumps(json.loads(meta.read_text()) | changes))

    return edit


DAMAGES = [
    (flip_a_pixel, "is damaged (it fails its CRC-32 check)"),
    (truncate, "is damaged ("),
    (remove_the_array, "is damaged (FileNotFoundError"),
    (remove_the_metadata, "is damaged (FileNotFoundError"),
    (garble_the_metadata, "is damaged (JSONDecodeError"),
    (edit_metadata(fingerprint="made from other files"), "is stale (the image files or"),
    (edit_metadata(format=1), "is stale (written by another version"),
]


@pytest.mark.parametrize(("damage", "problem"), DAMAGES)
def test_damaged_or_stale_cache_is_rebuilt(root, tmp_path, caplog, damage, problem):
    load(root, tmp_path / "cache")
    damage(*entry(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rebuilt = load(root, tmp_path / "cache")
    assert problem in caplog.text and "rebuilding it" in caplog.text
    assert torch.equal(rebuilt.splits["train"].images, png_pixels(root))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load(root, tmp_path / "cache")  # the rebuilt cache is valid
    assert not caplog.text


def test_changed_image_makes_the_cache_stale(root, tmp_path, caplog):
    load(root, tmp_path / "cache")
    changed = root / "class3" / "1.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(changed)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = load(root, tmp_path / "cache")
    assert "is stale (the image files or the decoding settings have changed)" in caplog.text
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 20, 20)
    assert torch.equal(data.splits["train"].images[3 * IMAGES_PER_CLASS + 1], red)


def test_unwritable_cache_only_warns(root, tmp_path, caplog, workers):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        data = load(root, tmp_path / "cache")
    assert "Could not write the image cache" in caplog.text
    assert "decoding into memory" in caplog.text
    assert torch.equal(data.splits["train"].images, png_pixels(root))
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


def test_undecodable_image_fails_with_one_line_and_leaves_no_cache(root, tmp_path, workers):
    broken = root / "class2" / "0.png"
    broken.write_bytes(broken.read_bytes()[:60])  # a PNG cut short
    with pytest.raises(ConfigValueError) as error:
        load(root, tmp_path / "cache")
    message = str(error.value)
    assert error.value.key == "root" and "\n" not in message
    assert message.startswith(f"root={str(root)!r}: expected intact image files, but the image ")
    assert f"{broken} cannot be decoded (" in message
    assert message.endswith("): replace or remove that file")
    assert not list((tmp_path / "cache").iterdir())  # no cache, no temporary file


@needs_omniglot
def test_omniglot_cache_is_reused_without_decoding(omniglot_cache, no_decoding):
    data = Omniglot(root=OMNIGLOT, cache_dir=str(omniglot_cache))
    data.prepare()
    assert data.splits["train"].images.shape == (32_460, 1, 28, 28)


@needs_miniimagenet
@linux_only
def test_miniimagenet_cache_is_mapped_without_decoding(miniimagenet_cache, no_decoding):
    data = MiniImageNet(root=MINIIMAGENET, cache_dir=str(miniimagenet_cache))
    data.prepare()
    maps = mapped_files()
    for split, count in (("train", 38_400), ("val", 9_600), ("test", 12_000)):
        assert data.splits[split].images.shape == (count, 3, 84, 84)
        (array,) = miniimagenet_cache.glob(f"miniimagenet-{split}-*.npy")
        assert str(array.resolve()) in maps


def linked_copy(cache: Path, target: Path, split: str) -> tuple[Path, Path]:
    """`target` with links to the entries of `cache`, except a copy of `split`'s own entry."""
    target.mkdir()
    for path in cache.iterdir():
        if f"-{split}-" in path.name:
            (target / path.name).write_bytes(path.read_bytes())
        else:
            (target / path.name).symlink_to(path)
    (data,) = target.glob(f"miniimagenet-{split}-*.npy")
    return data, data.with_suffix(".json")


@needs_miniimagenet
@pytest.mark.parametrize(
    ("split", "damage", "problem"),
    [("val", flip_a_pixel, "damaged"), ("val", edit_metadata(fingerprint="old"), "stale")],
)
def test_real_split_is_rebuilt_alone(miniimagenet_cache, tmp_path, caplog, split, damage, problem):
    damage(*linked_copy(miniimagenet_cache, tmp_path / "cache", split))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rebuilt = MiniImageNet(root=MINIIMAGENET, cache_dir=str(tmp_path / "cache"))
        rebuilt.prepare()
    assert caplog.text.count("rebuilding it") == 1 and f"-{split}-" in caplog.text
    assert f"is {problem}" in caplog.text
    (reference,) = miniimagenet_cache.glob(f"miniimagenet-{split}-*.npy")
    assert np.array_equal(rebuilt.splits[split].images.numpy(), np.load(reference, mmap_mode="r"))
    # The other splits' entries were used as they are: still the links to the session cache.
    linked = {path.name: path.is_symlink() for path in (tmp_path / "cache").iterdir()}
    assert linked == {name: f"-{split}-" not in name for name in linked} and len(linked) == 6


def test_decode_pool_terminates_under_the_runs_signal_handler():
    """The pool's forked workers inherit the run's SIGTERM handler, which ignores the signal in a
    child: `Pool.terminate` would wait for them forever (a cache build hung so on the real
    Mini-ImageNet test split). Here a worker is busy for a minute when the pool is terminated."""
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    stop_request.install()
    try:
        start = time.monotonic()
        with decode_pool(2, shared_array((1,))) as pool:
            pool.apply_async(time.sleep, (60,))
            time.sleep(0.5)  # the task is running in a worker
        assert time.monotonic() - start < 10
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_pool_workers_write_into_the_shared_array_and_send_back_only_failures(root):
    """What a worker sends back is None or its first failure, never images: a result of megabytes
    that nobody reads any more, after an error, blocks its worker inside the lock that
    `Pool.terminate` needs (CI hung so on the damaged Mini-ImageNet archive)."""
    files = [ImageFile(str(path)) for path in sorted(root.glob("*/*.png"))]
    broken = root / "class7" / "1.png"
    broken.write_bytes(b"not a PNG")
    images = shared_array((len(files), 3, 20, 20))
    jobs = image_cache.decode_jobs(files, chunk=IMAGES_PER_CLASS)
    with decode_pool(2, images) as pool:
        results = list(pool.imap(image_cache.decode_in_worker, jobs))
    assert results[:-1] == [None] * (NUM_CLASSES - 1)
    failed, reason = results[-1]
    assert failed == ImageFile(str(broken)) and reason.startswith("UnidentifiedImageError: ")
    intact = slice(0, len(files) - IMAGES_PER_CLASS)
    assert torch.equal(torch.from_numpy(images[intact]), png_pixels_of(files[intact]))
