"""Mini-ImageNet (Vinyals et al., 2016) in the split of Ravi & Larochelle: 64/16/20 classes."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from reptile.config import require, require_int
from reptile.data.fewshot import FewShotClassification, Split
from reptile.data.images import ClassFiles, ImageFile, cache_path, load_classes
from reptile.data.tasks import SPLITS

LAYOUT = "images/*.jpg with train.csv, val.csv and test.csv (columns filename,label)"


class MiniImageNet(FewShotClassification):
    """Tasks from Mini-ImageNet in the standard Ravi–Larochelle layout, as 84×84 RGB in [0, 1].

    `root` holds `images/` and `train.csv`, `val.csv`, `test.csv`, each a header `filename,label`
    and one row per image (the file name inside `images/` and its class). Each split is decoded and
    resized once into a cache under `cache_dir` (default `~/.cache/reptile/miniimagenet`); the
    full dataset (60,000 images) takes 1.3 GB there. No rotations. Classes are sorted by label.
    """

    def __init__(
        self,
        root: str | Path,
        cache_dir: str | None = None,
        image_size: int = 84,
        train_shots: int = 15,
        **options: Any,
    ) -> None:
        super().__init__(train_shots=train_shots, **options)
        require_int("image_size", image_size, 1)
        self.root = Path(root).expanduser()
        self.cache_dir = cache_dir
        self.image_size = image_size
        missing = [
            name
            for name in ["images", *(f"{split}.csv" for split in SPLITS)]
            if not (self.root / name).exists()
        ]
        require(
            not missing,
            "root",
            str(self.root),
            f"a Mini-ImageNet folder in the Ravi–Larochelle layout, {LAYOUT}; "
            f"missing: {', '.join(missing)}",
        )

    def load_splits(self) -> dict[str, Split]:
        splits = {}
        for split in SPLITS:
            cache = cache_path(
                self.cache_dir, "miniimagenet", self.root, split, f"{self.image_size}px"
            )
            try:
                splits[split] = load_classes(self.split_files(split), self.image_size, 3, cache)
            except FileNotFoundError as error:
                require(
                    False,
                    "root",
                    str(self.root),
                    f"every image that {split}.csv lists to be in images/, but "
                    f"{error.filename} is missing",
                )
        return splits

    def split_files(self, split: str) -> ClassFiles:
        """The images of each class of `split`, in the order its CSV lists them."""
        classes: ClassFiles = {}
        with open(self.root / f"{split}.csv", newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            header = [cell.strip() for cell in next(reader, [])]
            require(
                header == ["filename", "label"],
                "root",
                str(self.root),
                f"{LAYOUT}, but {split}.csv starts with {header}",
            )
            for row in reader:
                if not row:
                    continue
                require(
                    len(row) == 2,
                    "root",
                    str(self.root),
                    f"{LAYOUT}, but line {reader.line_num} of {split}.csv is {row}",
                )
                filename, label = (cell.strip() for cell in row)
                classes.setdefault(label, []).append(
                    ImageFile(str(self.root / "images" / filename))
                )
        return dict(sorted(classes.items()))
