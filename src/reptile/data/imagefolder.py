"""Your own few-shot dataset: a folder of images per class, split into train/val/test by class."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from reptile.config import is_number, require, require_int
from reptile.data.fewshot import Split
from reptile.data.images import ClassFiles, ImageDataset, ImageFile

EXTENSIONS = (".png", ".jpg", ".jpeg")


class ImageFolder(ImageDataset):
    """Tasks from `root/<class>/*.{png,jpg,jpeg}`, resized to `image_size` squares.

    The classes (sub-folders with at least one image, sorted by name) are shuffled with
    `split_seed`; the last `test_fraction` of them test, the `val_fraction` before those validate,
    the rest train, so a class belongs to one split only. `channels` is 1 (grayscale) or 3 (RGB).
    The images are decoded once into a cache under `cache_dir` (default
    `~/.cache/reptile/imagefolder`). No rotations.
    """

    cache_name = "imagefolder"
    repair = "replace or remove that file"

    def __init__(
        self,
        root: str | Path,
        cache_dir: str | None = None,
        image_size: int = 84,
        channels: int = 3,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(root, cache_dir, image_size, channels, **options)
        for key, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            fraction_ok = is_number(fraction) and 0 <= fraction < 1
            require(fraction_ok, key, fraction, "a fraction in [0, 1)")
        require(
            val_fraction + test_fraction < 1,
            "test_fraction",
            test_fraction,
            f"less than 1 - val_fraction = {1 - val_fraction:g}, to leave classes for training",
        )
        require_int("split_seed", split_seed, 0)
        require(self.root.is_dir(), "root", str(self.root), "a folder with a sub-folder per class")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def image_splits(self) -> dict[str, Split]:
        classes = self.load_images(self.class_files())
        shuffle = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(classes.names), generator=shuffle).tolist()
        num_test = round(self.test_fraction * len(order))
        num_val = round(self.val_fraction * len(order))
        num_train = len(order) - num_val - num_test
        return {
            "train": classes.select(order[:num_train]),
            "val": classes.select(order[num_train : num_train + num_val]),
            "test": classes.select(order[num_train + num_val :]),
        }

    def class_files(self) -> ClassFiles:
        """The images of every class folder that has any, both sorted by name."""
        classes: ClassFiles = {}
        for folder in sorted(os.scandir(self.root), key=lambda entry: entry.name):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            files = sorted(
                entry.path
                for entry in os.scandir(folder.path)
                if entry.is_file()
                and not entry.name.startswith(".")
                and entry.name.lower().endswith(EXTENSIONS)
            )
            if files:
                classes[folder.name] = [ImageFile(path) for path in files]
        require(
            bool(classes),
            "root",
            str(self.root),
            f"a folder with a sub-folder of images ({', '.join(EXTENSIONS)}) per class",
        )
        return classes
