"""Omniglot (Lake et al., 2015): 1623 handwritten characters, 20 drawings of each."""

from __future__ import annotations

import logging
import shutil
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import torch

from reptile.config import is_int, require, require_bool, require_int
from reptile.data.fewshot import Split
from reptile.data.images import ClassFiles, ImageDataset, ImageFile, open_archive
from reptile.files import atomic_file

log = logging.getLogger(__name__)

SOURCE = "https://github.com/brendenlake/omniglot/raw/master/python/"
PAGE = "https://github.com/brendenlake/omniglot/tree/master/python"
# The two official archives, with the characters and images each holds.
ARCHIVES = {"images_background": (964, 19_280), "images_evaluation": (659, 13_180)}
NUM_CHARACTERS = sum(characters for characters, _ in ARCHIVES.values())  # 1623


class Omniglot(ImageDataset):
    """The paper's Omniglot tasks, read from the official archives or their extracted folders.

    `root` holds `images_background.zip` and `images_evaluation.zip` (or the folders extracted
    from them); with `download`, missing archives are fetched from the official repository and
    checked. The images are decoded and resized once into a cache under `cache_dir` (default
    `~/.cache/reptile/omniglot`), which later runs load in about a second; root is never written
    to unless downloading.

    Splits, as in the paper: the 1623 characters of both archives, sorted by path, are shuffled
    with `split_seed`; the first `num_train_characters` (1200) are the training characters, each
    rotated by 0/90/180/270 degrees into 4 classes; the other 423 are the test characters, not
    rotated. Validation uses the last `num_val_characters` training characters, not rotated, so it
    never touches a test character. By default they also stay in training, which keeps the paper's
    1200 training characters: validation then scores new tasks and drawings of characters seen in
    training. `hold_out_val=true` drops them from training instead, for model selection on
    characters never trained on.
    """

    URLS = {name: f"{SOURCE}{name}.zip" for name in ARCHIVES}
    cache_name = "omniglot"
    repair = f"replace it with the official archive from {PAGE} (or the folder extracted from it)"

    def __init__(
        self,
        root: str | Path,
        cache_dir: str | None = None,
        download: bool = False,
        image_size: int = 28,
        num_train_characters: int = 1200,
        num_val_characters: int = 100,
        hold_out_val: bool = False,
        split_seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(root, cache_dir, image_size, 1, **options)
        require_bool("download", download)
        require_bool("hold_out_val", hold_out_val)
        require(
            is_int(num_train_characters) and 1 <= num_train_characters < NUM_CHARACTERS,
            "num_train_characters",
            num_train_characters,
            f"an integer from 1 to {NUM_CHARACTERS - 1} (the rest are test characters)",
        )
        most_val = num_train_characters - 1 if hold_out_val else num_train_characters
        require(
            is_int(num_val_characters) and 0 <= num_val_characters <= most_val,
            "num_val_characters",
            num_val_characters,
            f"an integer from 0 to {most_val} (taken from the training characters)",
        )
        require_int("split_seed", split_seed, 0)
        self.download = download
        self.num_train_characters = num_train_characters
        self.num_val_characters = num_val_characters
        self.hold_out_val = hold_out_val
        self.split_seed = split_seed
        if not download:
            self.missing_archives(raise_error=True)  # fail before anything trains

    def image_splits(self) -> dict[str, Split]:
        characters = self.load_images(self.character_files())
        shuffle = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(characters.names), generator=shuffle).tolist()
        train = order[: self.num_train_characters]
        val = train[len(train) - self.num_val_characters :]
        if self.hold_out_val:
            train = train[: len(train) - self.num_val_characters]
        return {
            "train": characters.select(train, rotations=(0, 1, 2, 3)),
            "val": characters.select(val),
            "test": characters.select(order[self.num_train_characters :]),
        }

    def character_files(self) -> ClassFiles:
        """The drawings of every character of both archives, sorted by path."""
        for name in self.missing_archives(raise_error=not self.download):
            self.download_archive(name)
        characters: ClassFiles = {}
        for name in ARCHIVES:
            archive = self.root / f"{name}.zip"
            if archive.is_file():
                source, found = archive, list_archive(archive, name)
            else:
                source, found = self.root / name, list_folder(self.root / name, name)
            problem = count_problem(found, name)
            require(
                problem is None,
                "root",
                str(self.root),
                f"the complete official {name}, but {source} holds {problem}: replace it with "
                f"{self.URLS[name]} (or the folder extracted from it)",
            )
            characters.update(found)
        return dict(sorted(characters.items()))

    def missing_archives(self, raise_error: bool) -> list[str]:
        """The archives found neither as a zip nor as a folder in root."""
        missing = [
            name
            for name in ARCHIVES
            if not (self.root / f"{name}.zip").is_file() and not (self.root / name).is_dir()
        ]
        require(
            not (missing and raise_error),
            "root",
            str(self.root),
            f"a folder holding {' and '.join(n + '.zip' for n in missing)} (or the folders "
            f"extracted from them): get them from {PAGE} or set download=true",
        )
        return missing

    def download_archive(self, name: str) -> None:
        """Fetches the official archive `name` into root, keeping it only if its content checks."""
        url, target = self.URLS[name], self.root / f"{name}.zip"
        log.info("Downloading %s to %s", url, target)
        try:
            with (
                atomic_file(target) as file,
                urllib.request.urlopen(url, timeout=60) as data,
            ):
                shutil.copyfileobj(data, file)
                file.flush()
                with zipfile.ZipFile(file.name) as archive:
                    broken = archive.testzip()
                require(
                    broken is None, "download", True, f"an intact {url}, but {broken} is corrupt"
                )
                problem = count_problem(list_archive(Path(file.name), name), name)
                require(
                    problem is None,
                    "download",
                    True,
                    f"the official archive at {url}, but the download holds {problem}",
                )
        except (OSError, zipfile.BadZipFile) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            require(
                False,
                "root",
                str(self.root),
                f"a writable folder to download {url} into, which failed ({reason}); without "
                f"network, put {name}.zip (or the folder extracted from it) there yourself",
            )


def list_archive(path: Path, name: str) -> ClassFiles:
    """The PNGs of an official archive, by character `name/<alphabet>/<character>`."""
    characters: ClassFiles = {}
    with open_archive(path) as archive:
        members = archive.namelist()
    for member in sorted(members):
        parts = member.split("/")
        # Skips folders and the resource forks (__MACOSX/, ._*) that macOS adds to archives.
        if not member.endswith(".png") or "__MACOSX" in parts or parts[-1].startswith("._"):
            continue
        if len(parts) >= 3:
            character = "/".join([name, *parts[-3:-1]])
            characters.setdefault(character, []).append(ImageFile(member, str(path)))
    return characters


def list_folder(folder: Path, name: str) -> ClassFiles:
    """The PNGs of an extracted archive, `folder/<alphabet>/<character>/*.png`."""
    characters: ClassFiles = {}
    for png in sorted(folder.glob("*/*/*.png")):
        if not png.name.startswith("."):
            character = "/".join([name, png.parent.parent.name, png.parent.name])
            characters.setdefault(character, []).append(ImageFile(str(png)))
    return characters


def count_problem(characters: ClassFiles, name: str) -> str | None:
    """What is wrong with the character counts of archive `name` (a partial or different copy)."""
    expected = ARCHIVES[name]
    found = (len(characters), sum(len(files) for files in characters.values()))
    if found == expected:
        return None
    return f"{found[0]} characters and {found[1]} images instead of {expected[0]} and {expected[1]}"
