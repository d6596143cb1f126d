"""Mini-ImageNet on the real mini-imagenet.zip in ../shared/data/miniimagenet (read-only).

The archive is decoded once per session into a tmp cache (the `miniimagenet_cache` fixture);
the cache's own checks are in test_images.py.
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from reptile.config import ConfigValueError
from reptile.data.fewshot import Split
from reptile.data.miniimagenet import MiniImageNet

from .real_data import MINIIMAGENET, SHARED_DATA, needs_miniimagenet

pytestmark = needs_miniimagenet

ARCHIVE = MINIIMAGENET / "mini-imagenet.zip"
CLASSES = {"train": 64, "val": 16, "test": 20}
# From ../shared/data/miniimagenet/README.md: each split decoded with Pillow and stacked in CSV
# row order as uint8 [N, 84, 84, 3], C order.
PIXELS_SHA256 = {
    "train": "5d01887a9f33920c31372a09d6b4ef01125581fb47bf63201717bd5c07d5b6ac",
    "val": "89b8731b22e5b4f1043bb14d48234d6e40979eb2665ea4bd52fc0293f342ef27",
    "test": "fc17f5f4bcb39dc864eebde7683d1198d72b8bbcf0b1a1d054a05f197fb43a4a",
}


@pytest.fixture(scope="module")
def data(miniimagenet_cache) -> MiniImageNet:
    """The default dataset (5-way 1-shot), loaded once for the tests that only read it."""
    data = MiniImageNet(root=MINIIMAGENET, cache_dir=str(miniimagenet_cache))
    data.prepare()
    return data


@pytest.fixture
def miniimagenet(miniimagenet_cache):
    def make(root: Path = MINIIMAGENET, **options) -> MiniImageNet:
        data = MiniImageNet(root=root, cache_dir=str(miniimagenet_cache), **options)
        data.prepare()
        return data

    return make


def csv_rows(split: str) -> list[list[str]]:
    with zipfile.ZipFile(ARCHIVE) as archive:
        return [line.split(",") for line in archive.read(f"{split}.csv").decode().split()[1:]]


def test_classes_and_splits(data):
    names = {}
    for split, num_classes in CLASSES.items():
        classes = data.splits[split]
        assert classes.images.shape == (600 * num_classes, 3, 84, 84)
        assert classes.images.dtype == torch.uint8
        assert classes.class_sizes.tolist() == [600] * num_classes
        assert classes.rotations == (0,)
        names[split] = set(classes.names)
        assert names[split] == {label for _, label in csv_rows(split)}
    assert not names["train"] & names["val"]
    assert not names["train"] & names["test"]
    assert not names["val"] & names["test"]


@pytest.mark.parametrize("split", CLASSES)
def test_pixels_match_the_published_checksum(data, split):
    images = data.splits[split].images
    digest = hashlib.sha256()
    for start in range(0, len(images), 2000):
        digest.update(images[start : start + 2000].permute(0, 2, 3, 1).contiguous().numpy())
    assert digest.hexdigest() == PIXELS_SHA256[split]


def owner(split: Split, image: torch.Tensor) -> int:
    """The class of `split` holding `image` (float in [0, 1]), found by exact comparison."""
    pixels = (image * 255).round().to(torch.uint8)
    corner = (split.images[:, :, :4, :4] == pixels[:, :4, :4]).flatten(1).all(1)
    candidates = corner.nonzero().flatten().tolist()
    matches = [i for i in candidates if torch.equal(split.images[i], pixels)]
    assert len(matches) == 1
    return int(torch.searchsorted(split.ranges[:, 1], matches[0], right=True))


def test_task_labels_name_one_class_each(data):
    split = data.splits["test"]
    task = data.sample_task(split, support=5, query=2, generator=torch.Generator().manual_seed(7))
    classes = {}
    for kind in ("support", "query"):
        labels = task[f"{kind}_targets"].tolist()
        for image, label in zip(task[f"{kind}_inputs"], labels, strict=True):
            classes.setdefault(label, set()).add(owner(split, image))
    assert sorted(classes) == [0, 1, 2, 3, 4]
    assert all(len(owners) == 1 for owners in classes.values())  # a label is one class
    assert len(set.union(*classes.values())) == 5  # five different classes
    assert task["support_targets"].bincount().tolist() == [5] * 5


def test_tasks_are_deterministic_under_a_seed(data, miniimagenet):
    first, again, other_seed = data, miniimagenet(), miniimagenet(seed=1)
    for tasks in (lambda data: data.train_tasks(0, 3), lambda data: data.eval_tasks("val")):
        task, same, other = tasks(first)[2], tasks(again)[2], tasks(other_seed)[2]
        assert all(torch.equal(task[key], same[key]) for key in task)
        assert not torch.equal(task["support_inputs"], other["support_inputs"])


def test_workers_draw_the_same_meta_batches(data):
    tasks = data.train_tasks(start_step=4, num_steps=3)
    loaded = list(DataLoader(tasks, batch_size=None, num_workers=2))
    assert len(loaded) == 3
    for step, batch in enumerate(loaded):
        assert batch["support_inputs"].shape == (5, 5 * 15, 3, 84, 84)  # meta-batch of 5 tasks
        expected = tasks[step]
        assert all(torch.equal(batch[key], expected[key]) for key in expected)


def extract_classes(root: Path, per_split: int, images_per_class: int) -> None:
    """root/images + the three CSVs, cut to the first classes and images of each split."""
    (root / "images").mkdir(parents=True)
    with zipfile.ZipFile(ARCHIVE) as archive:
        for split in CLASSES:
            rows, labels = [], []
            for name, label in csv_rows(split):
                if label not in labels:
                    labels.append(label)
                kept = [row for row in rows if row[1] == label]
                if len(labels) <= per_split and len(kept) < images_per_class:
                    rows.append([name, label])
                    (root / "images" / name).write_bytes(archive.read(f"images/{name}"))
            text = "\n".join(["filename,label", *(",".join(row) for row in rows)])
            (root / f"{split}.csv").write_text(text + "\n")


def test_extracted_files_decode_as_the_zip(data, tmp_path):
    root = tmp_path / "extracted"
    extract_classes(root, per_split=2, images_per_class=20)
    extracted = MiniImageNet(root=root, cache_dir=str(tmp_path / "cache"), ways=2)
    assert extracted.archive is None
    extracted.prepare()
    for split in CLASSES:
        part, whole = extracted.splits[split], data.splits[split]
        assert part.names == whole.names[:2]
        for c in range(2):
            assert torch.equal(part.class_images(c), whole.class_images(c)[:20])


def test_missing_files_fail_with_one_line(tmp_path):
    with pytest.raises(ConfigValueError) as error:
        MiniImageNet(root=tmp_path)
    assert error.value.key == "root"
    assert "\n" not in str(error.value)
    assert str(error.value) == (
        f"root={str(tmp_path)!r}: expected a folder holding mini-imagenet.zip or the files "
        "extracted from it (images/*.jpg with train.csv, val.csv and test.csv (columns "
        "filename,label)), but it has no mini-imagenet.zip and no images, train.csv, val.csv, "
        "test.csv"
    )


def test_missing_image_or_bad_csv_fails_with_one_line(tmp_path):
    root = tmp_path / "extracted"
    extract_classes(root, per_split=2, images_per_class=20)
    name, _ = csv_rows("val")[3]
    (root / "images" / name).unlink()
    with pytest.raises(ConfigValueError) as error:
        MiniImageNet(root=root, cache_dir=str(tmp_path / "cache"), ways=2).prepare()
    assert str(error.value).endswith(
        f"expected every image that val.csv lists, but 1 of them are not in {root / 'images'} "
        f"(images/{name}): put an intact mini-imagenet.zip there (or the files extracted from it)"
    )
    (root / "train.csv").write_text("file,class\n")
    with pytest.raises(ConfigValueError, match=r"but train\.csv starts with \['file', 'class'\]"):
        MiniImageNet(root=root, cache_dir=str(tmp_path / "cache"), ways=2).prepare()


def test_truncated_archive_fails_with_one_line(tmp_path):
    with open(ARCHIVE, "rb") as source, open(tmp_path / "mini-imagenet.zip", "wb") as copy:
        copy.write(source.read(20 * 2**20))  # a download stopped at 20 MiB
    with pytest.raises(ConfigValueError) as error:
        MiniImageNet(root=tmp_path, cache_dir=str(tmp_path / "cache")).prepare()
    assert error.value.key == "root" and "\n" not in str(error.value)
    assert str(error.value) == (
        f"root={str(tmp_path)!r}: expected intact image files, but "
        f"{tmp_path / 'mini-imagenet.zip'} is not an intact zip archive (File is not a zip file; "
        "a truncated or partial copy?): put an intact mini-imagenet.zip there (or the files "
        "extracted from it)"
    )
    assert not (tmp_path / "cache").exists()


def damage_member(archive: Path, member: str) -> None:
    """Flips one byte in the middle of the stored data of `member` (its CRC-32 no longer fits)."""
    with zipfile.ZipFile(archive) as zip_file:
        info = zip_file.getinfo(member)
    with open(archive, "r+b") as file:
        file.seek(info.header_offset + 26)
        name_length, extra_length = (int.from_bytes(file.read(2), "little") for _ in range(2))
        position = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        file.seek(position)
        byte = file.read(1)[0]
        file.seek(position)
        file.write(bytes([byte ^ 0xFF]))


def test_damaged_members_are_named(tmp_path):
    copy = tmp_path / "mini-imagenet.zip"
    shutil.copy(ARCHIVE, copy)
    damaged = [f"images/{csv_rows('train')[0][0]}", f"images/{csv_rows('test')[-1][0]}"]
    for member in damaged:
        damage_member(copy, member)
    with pytest.raises(ConfigValueError) as error:
        MiniImageNet(root=tmp_path, cache_dir=str(tmp_path / "cache")).prepare()
    assert "\n" not in str(error.value)
    assert str(error.value).endswith(
        f"expected intact image files, but 2 members of {copy} fail their CRC-32 check "
        f"({', '.join(sorted(damaged))}): put an intact mini-imagenet.zip there (or the files "
        "extracted from it)"
    )
    cache = tmp_path / "cache"
    assert not [path for path in cache.iterdir()]  # nothing half-written left behind


def test_archive_without_the_split_files_fails_with_one_line(tmp_path):
    with zipfile.ZipFile(tmp_path / "mini-imagenet.zip", "w") as archive:
        archive.writestr("train.csv", "filename,label\n")
    with pytest.raises(ConfigValueError, match=r"mini-imagenet\.zip has no val\.csv, test\.csv: "):
        MiniImageNet(root=tmp_path, cache_dir=str(tmp_path / "cache")).prepare()


def test_config(compose, miniimagenet_cache):
    cfg = compose(
        "experiment=miniimagenet_5w5s",
        f"paths.data_dir={SHARED_DATA}",
        f"dataset.cache_dir={miniimagenet_cache}",
    )
    data = instantiate(cfg.dataset, _convert_="all")
    assert isinstance(data, MiniImageNet)
    assert data.root == MINIIMAGENET and data.archive == ARCHIVE
    assert (data.ways, data.shots, data.train_shots, data.image_size) == (5, 5, 15, 84)
    model = instantiate(cfg.model, _convert_="all")
    assert model.classifier.in_features == 32 * 6 * 6
    data.prepare()
    task = data.sample_eval_task("test", torch.Generator().manual_seed(0))
    assert model(task["support_inputs"]).shape == (25, 5)
