"""Mini-ImageNet (Vinyals et al., 2016) in the split of Ravi & Larochelle: 64/16/20 classes."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reptile.config import require
from reptile.data.fewshot import Split
from reptile.data.images import ClassFiles, ImageDataset, ImageFile, open_archive
from reptile.data.tasks import SPLITS

ARCHIVE = "mini-imagenet.zip"
CSVS = tuple(f"{split}.csv" for split in SPLITS)
LAYOUT = "images/*.jpg with train.csv, val.csv and test.csv (columns filename,label)"
LISTED = 3  # missing images named in an error message

# A copy's CSV texts by split, the file names in its images/, how to address one, where it is.
Listing = tuple[dict[str, str], set[str], Callable[[str], ImageFile], Path]


class MiniImageNet(ImageDataset):
    """Tasks from Mini-ImageNet in the standard Ravi–Larochelle layout, as 84×84 RGB in [0, 1].

    `root` holds the standard download `mini-imagenet.zip`, read as it is, or the files extracted
    from it: `images/` and `train.csv`, `val.csv`, `test.csv`, each a header `filename,label` and
    one row per image (its file name inside `images/` and its class). The zip is used if both are
    there. Each split is decoded once into a cache under `cache_dir` (default
    `~/.cache/reptile/miniimagenet`; 1.3 GB for the 60,000 images), which later runs map from
    disk. No rotations. Classes are sorted by label, the images of a class in CSV order.
    """

    cache_name = "miniimagenet"
    repair = f"put an intact {ARCHIVE} there (or the files extracted from it)"

    def __init__(
        self,
        root: str | Path,
        cache_dir: str | None = None,
        image_size: int = 84,
        train_shots: int = 15,
        **options: Any,
    ) -> None:
        super().__init__(root, cache_dir, image_size, 3, train_shots=train_shots, **options)
        self.archive = self.find_archive()  # fails here, before anything trains

    def find_archive(self) -> Path | None:
        """root/mini-imagenet.zip, or None when root holds the extracted files."""
        if (self.root / ARCHIVE).is_file():
            return self.root / ARCHIVE
        missing = [name for name in ("images", *CSVS) if not (self.root / name).exists()]
        require(
            not missing,
            "root",
            str(self.root),
            f"a folder holding {ARCHIVE} or the files extracted from it ({LAYOUT}), but it has "
            f"no {ARCHIVE} and no {', '.join(missing)}",
        )
        return None

    def image_splits(self) -> dict[str, Split]:
        return {split: self.load_images(files, split) for split, files in self.list_files().items()}

    def list_files(self) -> dict[str, ClassFiles]:
        """The images of each class of each split, checked to be there."""
        listing = self.archived(self.archive) if self.archive else self.extracted()
        texts, present, image, source = listing
        return {
            split: self.split_files(split, texts[split], present, image, source) for split in SPLITS
        }

    def extracted(self) -> Listing:
        folder = self.root / "images"
        texts = {s: (self.root / f"{s}.csv").read_text(encoding="utf-8-sig") for s in SPLITS}
        present = {entry.name for entry in os.scandir(folder)}
        return texts, present, lambda name: ImageFile(str(folder / name)), folder

    def archived(self, path: Path) -> Listing:
        with open_archive(path) as archive:
            members = archive.namelist()
            absent = [name for name in CSVS if name not in members]
            require(
                not absent,
                "root",
                str(self.root),
                f"a {ARCHIVE} in the Ravi–Larochelle layout ({LAYOUT}), but {path} has no "
                f"{', '.join(absent)}: {self.repair}",
            )
            texts = {s: archive.read(f"{s}.csv").decode("utf-8-sig") for s in SPLITS}
        present = {name[len("images/") :] for name in members if name.startswith("images/")}
        return texts, present, lambda name: ImageFile(f"images/{name}", str(path)), path

    def split_files(
        self,
        split: str,
        text: str,
        present: set[str],
        image: Callable[[str], ImageFile],
        source: Path,
    ) -> ClassFiles:
        """The classes of `split`, sorted by label; one line if an image its CSV lists is absent."""
        rows = self.parse_rows(text, split)
        missing = [f"images/{name}" for name, _ in rows if name not in present]
        listed = ", ".join(missing[:LISTED]) + (", …" if len(missing) > LISTED else "")
        require(
            not missing,
            "root",
            str(self.root),
            f"every image that {split}.csv lists, but {len(missing)} of them are not in {source} "
            f"({listed}): {self.repair}",
        )
        classes: ClassFiles = {}
        for name, label in rows:
            classes.setdefault(label, []).append(image(name))
        return dict(sorted(classes.items()))

    def parse_rows(self, text: str, split: str) -> list[tuple[str, str]]:
        """The (filename, label) rows of `split`.csv, after checking its header and its rows."""
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [cell.strip() for cell in next(reader, [])]
        require(
            header == ["filename", "label"],
            "root",
            str(self.root),
            f"{LAYOUT}, but {split}.csv starts with {header}",
        )
        rows = []
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
            rows.append((filename, label))
        return rows
