"""ImageFolder (a folder of images per class), on generated data; its cache in test_images.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from reptile.config import ConfigValueError
from reptile.data.imagefolder import ImageFolder
from reptile.models.conv4 import Conv4

NUM_CLASSES = 10
IMAGES_PER_CLASS = 5


@pytest.fixture
def root(tmp_path) -> Path:
    """root/class<c>/<i>.{png,JPG,jpeg} of assorted sizes and modes, plus files to ignore."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(NUM_CLASSES):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
            name = f"{i}" + [".png", ".JPG", ".jpeg"][i % 3]
            Image.fromarray(pixels).save(folder / name, format="PNG" if i % 3 == 0 else "JPEG")
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"not an image either")
    (root / "empty").mkdir()  # no images: not a class
    (root / "README.md").write_text("files beside the class folders are ignored")
    return root


def make(root: Path, tmp_path: Path, **options) -> ImageFolder:
    options = {
        "image_size": 16,
        "train_shots": 4,
        "val_fraction": 0.2,
        "test_fraction": 0.3,
        **options,
    }
    data = ImageFolder(root=root, cache_dir=str(tmp_path / "cache"), **options)
    data.prepare()
    return data


def test_split_by_class(root, tmp_path):
    data = make(root, tmp_path, ways=2)
    train, val, test = (data.splits[name] for name in ("train", "val", "test"))
    assert (len(train.names), len(val.names), len(test.names)) == (5, 2, 3)
    names = set(train.names) | set(val.names) | set(test.names)
    assert names == {f"class{c:02d}" for c in range(NUM_CLASSES)}  # "empty" is not a class
    assert train.class_sizes.tolist() == [IMAGES_PER_CLASS] * 5
    assert train.images.shape == (NUM_CLASSES * IMAGES_PER_CLASS, 3, 16, 16)
    assert train.rotations == val.rotations == test.rotations == (0,)
    same = make(root, tmp_path, ways=2)
    assert same.splits["test"].names == test.names
    other = make(root, tmp_path, ways=2, split_seed=1)
    assert other.splits["test"].names != test.names


def test_images_are_resized_and_converted(root, tmp_path):
    gray = make(root, tmp_path, channels=1, ways=2, shots=2)
    color = make(root, tmp_path, channels=3, ways=2, shots=2)
    assert gray.splits["train"].images.shape[1:] == (1, 16, 16)
    assert color.splits["train"].images.shape[1:] == (3, 16, 16)
    name = gray.splits["test"].names[0]
    with Image.open(root / name / "0.png") as image:
        expected = np.asarray(image.convert("L").resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(gray.splits["test"].class_images(0)[0, 0].numpy(), expected)
    task = color.sample_eval_task("test", torch.Generator().manual_seed(0))
    assert task["support_inputs"].shape == (4, 3, 16, 16)
    assert task["query_targets"].tolist() == [0, 1]
    logits = Conv4(in_channels=3, num_classes=2, image_size=16)(task["support_inputs"])
    assert logits.shape == (4, 2)


def test_bad_options_fail_with_one_line(root, tmp_path):
    with pytest.raises(ConfigValueError, match="test_fraction=0.5: expected less than 1 - val_"):
        ImageFolder(root=root, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigValueError, match="channels=2"):
        ImageFolder(root=root, channels=2)
    with pytest.raises(ConfigValueError, match="root="):
        ImageFolder(root=tmp_path / "nowhere")
    (tmp_path / "no_images" / "a_class").mkdir(parents=True)
    with pytest.raises(ConfigValueError, match="a sub-folder of images"):
        make(tmp_path / "no_images", tmp_path)
    with pytest.raises(ConfigValueError, match="ways=5: expected at most 2, .* val split"):
        make(root, tmp_path, ways=5)


def test_config(compose, root, tmp_path):
    cfg = compose(
        "dataset=imagefolder",
        "model=conv4_omniglot",
        f"dataset.root={root}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.channels=1",
        "dataset.image_size=28",
        "dataset.ways=2",
        "dataset.train_shots=4",
        "dataset.val_fraction=0.2",
    )
    data = instantiate(cfg.dataset, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(data, ImageFolder)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1  # taken from dataset.channels
    data.prepare()
    task = data.sample_train_task(torch.Generator().manual_seed(0), tail_size=0)
    assert task["support_inputs"].shape == (2 * 4, 1, 28, 28)
    assert model(task["support_inputs"]).shape == (8, 2)
