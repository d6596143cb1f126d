"""Mini-ImageNet, on a small dataset generated in the Ravi–Larochelle layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from reptile.config import ConfigValueError
from reptile.data import images as image_cache
from reptile.data.miniimagenet import MiniImageNet

CLASSES = {"train": 8, "val": 5, "test": 5}
IMAGES_PER_CLASS = 16  # enough for the default 15 train shots


def make_miniimagenet(root: Path) -> dict[str, dict[str, list[str]]]:
    """root/images/<wnid><index>.jpg and root/{split}.csv, as the standard tools write them.

    Returns split → class → file names. Most images are 84×84; one per class is larger and not
    square, as in a layout whose images were not resized beforehand.
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    layout: dict[str, dict[str, list[str]]] = {}
    for split, num_classes in CLASSES.items():
        rows = ["filename,label"]
        layout[split] = {}
        for c in range(num_classes):
            wnid = f"n{len(split)}{c:07d}"
            for i in range(IMAGES_PER_CLASS):
                name = f"{wnid}{i + 1:08d}.jpg"
                size = (84, 84) if i else (120, 100)
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / name, quality=95)
                layout[split].setdefault(wnid, []).append(name)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return layout


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "miniimagenet"
    make_miniimagenet(root)
    return root


def test_splits_and_images(root, tmp_path):
    data = MiniImageNet(root=root, cache_dir=str(tmp_path / "cache"), ways=5)
    data.setup()
    names = {split: data.splits[split].names for split in CLASSES}
    for split, num_classes in CLASSES.items():
        classes = data.splits[split]
        assert classes.images.shape == (num_classes * IMAGES_PER_CLASS, 3, 84, 84)
        assert classes.images.dtype == torch.uint8
        assert classes.rotations == (0,)
        assert classes.class_sizes.tolist() == [IMAGES_PER_CLASS] * num_classes
        assert list(classes.names) == sorted(classes.names)
    assert not set(names["train"]) & (set(names["val"]) | set(names["test"]))
    assert not set(names["val"]) & set(names["test"])
    # The second image of the first test class, an 84×84 JPEG, is decoded as is.
    wnid = names["test"][0]
    with Image.open(root / "images" / f"{wnid}00000002.jpg") as image:
        expected = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(data.splits["test"].class_images(0)[1].numpy(), expected)


def test_tasks(root, tmp_path):
    data = MiniImageNet(root=root, cache_dir=str(tmp_path / "cache"), shots=2, train_shots=4)
    data.setup()
    task = data.sample_train_task(torch.Generator().manual_seed(0), tail_size=1)
    assert task["support_inputs"].shape == (20, 3, 84, 84)
    assert task["query_inputs"].shape == (5, 3, 84, 84)
    assert task["support_targets"].bincount().tolist() == [4] * 5
    for split in ("val", "test"):
        task = data.sample_eval_task(split, torch.Generator().manual_seed(0))
        assert task["support_inputs"].shape == (10, 3, 84, 84)
        assert task["query_targets"].tolist() == [0, 1, 2, 3, 4]
        assert 0 <= task["query_inputs"].min() < task["query_inputs"].max() <= 1


def test_cache_is_reused(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = MiniImageNet(root=root, cache_dir=str(cache))
    first.setup()
    assert len(list(cache.glob("miniimagenet-*.pt"))) == 3  # one per split

    def decode(*args, **kwargs):
        raise AssertionError("decoded images although a valid cache was there")

    monkeypatch.setattr(image_cache, "decode_images", decode)
    again = MiniImageNet(root=root, cache_dir=str(cache))
    again.setup()
    for split in CLASSES:
        assert torch.equal(first.splits[split].images, again.splits[split].images)


def test_changed_image_makes_the_cache_stale(root, tmp_path, caplog):
    cache = tmp_path / "cache"
    MiniImageNet(root=root, cache_dir=str(cache)).setup()
    changed = next((root / "images").glob("*.jpg"))
    Image.new("RGB", (84, 84), (255, 0, 0)).save(changed)
    with caplog.at_level(logging.WARNING, logger="reptile.data.images"):
        MiniImageNet(root=root, cache_dir=str(cache)).setup()
    assert caplog.text.count("is stale") == 1  # only the split holding the image


def test_missing_layout_fails_with_one_line(tmp_path):
    with pytest.raises(ConfigValueError) as error:
        MiniImageNet(root=tmp_path)
    assert error.value.key == "root"
    assert "\n" not in str(error.value)
    assert "missing: images, train.csv, val.csv, test.csv" in str(error.value)


def test_missing_image_or_bad_csv_fails_with_one_line(root, tmp_path):
    next((root / "images").glob(f"n{len('val')}*.jpg")).unlink()
    with pytest.raises(ConfigValueError, match=r"every image that (val|test)\.csv lists"):
        MiniImageNet(root=root, cache_dir=str(tmp_path / "cache")).setup()
    (root / "train.csv").write_text("file,class\n")
    with pytest.raises(ConfigValueError, match=r"but train\.csv starts with \['file', 'class'\]"):
        MiniImageNet(root=root, cache_dir=str(tmp_path / "cache")).setup()


def test_config(compose, root, tmp_path):
    cfg = compose(
        "dataset=miniimagenet",
        "model=conv4_miniimagenet",
        f"paths.data_dir={root.parent}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
    )
    data = instantiate(cfg.dataset, _convert_="all")
    assert isinstance(data, MiniImageNet)
    assert (data.ways, data.shots, data.train_shots, data.image_size) == (5, 1, 15, 84)
    model = instantiate(cfg.model, _convert_="all")
    assert model.classifier.in_features == 32 * 6 * 6
    data.setup()
    task = data.sample_eval_task("test", torch.Generator().manual_seed(0))
    assert model(task["support_inputs"]).shape == (5, 5)
