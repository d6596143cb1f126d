"""Omniglot on the real archives in ../shared/data/omniglot (read-only), cached in a tmp folder.

The archives are decoded once per session (the `omniglot_cache` fixture); the cache's own checks
are in test_images.py."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from reptile.config import ConfigValueError
from reptile.data import images as image_cache
from reptile.data.omniglot import Omniglot

from .real_data import OMNIGLOT, SHARED_DATA, needs_omniglot

pytestmark = needs_omniglot


@pytest.fixture
def omniglot(omniglot_cache):
    def make(**options) -> Omniglot:
        data = Omniglot(root=OMNIGLOT, cache_dir=str(omniglot_cache), **options)
        data.prepare()
        return data

    return make


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_paper_split(omniglot):
    data = omniglot()
    train, val, test = (data.splits[name] for name in ("train", "val", "test"))
    assert train.images.shape == (32_460, 1, 28, 28)  # all splits share one image tensor
    assert len(train.names) + len(test.names) == 1623
    assert (len(train.names), len(val.names), len(test.names)) == (1200, 100, 423)
    assert train.rotations == (0, 1, 2, 3) and train.num_classes == 4800
    assert val.rotations == test.rotations == (0,)
    for split in (train, val, test):
        assert split.class_sizes.tolist() == [20] * len(split.names)
    assert set(val.names) <= set(train.names)  # carved from the training characters
    assert not set(test.names) & set(train.names)
    assert len({name.split("/")[0] for name in test.names}) == 2  # from both archives
    # Every image belongs to exactly one character.
    ranges = torch.cat([train.ranges, test.ranges]).sort(0).values
    assert ranges[0, 0] == 0 and ranges[-1, 1] == 32_460
    assert torch.equal(ranges[1:, 0], ranges[:-1, 1])


def test_split_options(omniglot):
    paper = omniglot()
    held_out = omniglot(hold_out_val=True)
    assert len(held_out.splits["train"].names) == 1100
    assert held_out.splits["val"].names == paper.splits["val"].names
    assert not set(held_out.splits["val"].names) & set(held_out.splits["train"].names)
    assert held_out.splits["test"].names == paper.splits["test"].names
    other = omniglot(split_seed=1, num_train_characters=1000, num_val_characters=50)
    assert (len(other.splits["train"].names), len(other.splits["test"].names)) == (1000, 623)
    assert other.splits["test"].names != paper.splits["test"].names


def test_cached_images_are_the_resized_pngs(omniglot):
    split = omniglot().splits["test"]
    for c in range(0, len(split.names), 47):
        name = split.names[c]  # images_{background,evaluation}/<alphabet>/<character>
        with zipfile.ZipFile(OMNIGLOT / f"{name.split('/')[0]}.zip") as archive:
            names = archive.namelist()
            drawings = sorted(m for m in names if m.startswith(name + "/") and m.endswith(".png"))
            for index in (0, 19):
                with Image.open(io.BytesIO(archive.read(drawings[index]))) as image:
                    expected = image.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
                cached = split.class_images(c)[index, 0].numpy()
                assert np.array_equal(cached, np.asarray(expected))


def test_rotated_classes_are_rot90_of_the_character(omniglot):
    train = omniglot().splits["train"]
    for base in (0, 599, 1199):
        upright = train.class_images(4 * base)
        assert train.class_name(4 * base) == train.names[base]
        for turns in (1, 2, 3):
            rotated = train.class_images(4 * base + turns)
            assert torch.equal(rotated, torch.rot90(upright, turns, dims=(2, 3)))
            assert not torch.equal(rotated, upright)


def image_keys(images: torch.Tensor) -> list[bytes]:
    return [bytes(image.numpy().tobytes()) for image in (images * 255).round().to(torch.uint8)]


def test_training_tasks(omniglot):
    data = omniglot(ways=5, train_shots=10)
    train = data.splits["train"]
    # Which training classes (character and rotation) hold each image.
    owners: dict[bytes, set[int]] = {}
    for turns in range(4):
        rotated = torch.rot90(train.images, turns, dims=(2, 3))
        for base, (start, stop) in enumerate(train.ranges.tolist()):
            for image in rotated[start:stop]:
                owners.setdefault(image.numpy().tobytes(), set()).add(4 * base + turns)
    for seed in range(5):
        task = data.sample_train_task(generator(seed), tail_size=2)
        assert task["support_inputs"].shape == (50, 1, 28, 28)
        assert task["query_inputs"].shape == (10, 1, 28, 28)
        assert task["support_targets"].bincount().tolist() == [10] * 5
        assert task["query_targets"].bincount().tolist() == [2] * 5
        classes = []
        for label in range(5):
            support = task["support_inputs"][task["support_targets"] == label]
            tail = task["query_inputs"][task["query_targets"] == label]
            keys = image_keys(torch.cat([support, tail]))
            assert len(set(keys)) == 12  # support and tail are 12 different drawings
            common = set.intersection(*(owners[key] for key in keys))
            assert len(common) >= 1  # all from one class: one character, one rotation
            classes.append(common)
        assert all(not a & b for i, a in enumerate(classes) for b in classes[i + 1 :])


@pytest.mark.parametrize(("split", "shots"), [("val", 1), ("test", 5)])
def test_eval_tasks(omniglot, split, shots):
    data = omniglot(ways=20, shots=shots, query_shots=1)
    test_images = set(image_keys(data.splits[split].images[data.splits[split].ranges[:, 0]]))
    for seed in range(3):
        task = data.sample_eval_task(split, generator(seed))
        assert task["support_inputs"].shape == (20 * shots, 1, 28, 28)
        assert task["support_targets"].bincount().tolist() == [shots] * 20
        assert task["query_targets"].bincount().tolist() == [1] * 20
        assert task["support_inputs"].dtype == torch.float32
        assert 0 <= task["support_inputs"].min() < task["support_inputs"].max() <= 1
        assert not set(image_keys(task["query_inputs"])) & set(image_keys(task["support_inputs"]))
    assert test_images  # the split's first drawings, a sanity check of image_keys


def test_tasks_are_deterministic_per_seed(omniglot):
    data = omniglot(ways=5, shots=1)
    for sample in (
        lambda seed: data.sample_train_task(generator(seed), tail_size=1),
        lambda seed: data.sample_eval_task("test", generator(seed)),
    ):
        first, again, other = sample(3), sample(3), sample(4)
        assert all(torch.equal(first[key], again[key]) for key in first)
        assert not torch.equal(first["support_inputs"], other["support_inputs"])


def test_missing_files_fail_with_one_line(tmp_path):
    with pytest.raises(ConfigValueError) as error:
        Omniglot(root=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert error.value.key == "root"
    assert "images_background.zip and images_evaluation.zip" in message
    assert "download=true" in message


def test_incomplete_copy_is_rejected(tmp_path):
    (tmp_path / "images_background.zip").symlink_to(OMNIGLOT / "images_background.zip")
    with zipfile.ZipFile(tmp_path / "images_evaluation.zip", "w") as partial:
        partial.writestr("images_evaluation/Angelic/character01/0965_01.png", b"")
    with pytest.raises(ConfigValueError, match="1 characters and 1 images instead of 659 and"):
        Omniglot(root=tmp_path, cache_dir=str(tmp_path / "cache")).prepare()


def test_extracted_folders_list_the_same_images(tmp_path):
    (tmp_path / "images_background.zip").symlink_to(OMNIGLOT / "images_background.zip")
    with zipfile.ZipFile(OMNIGLOT / "images_evaluation.zip") as archive:
        archive.extractall(tmp_path)
    from_folder = Omniglot(root=tmp_path).character_files()
    from_zips = Omniglot(root=OMNIGLOT).character_files()
    assert list(from_folder) == list(from_zips)
    assert [len(files) for files in from_folder.values()] == [20] * 1623
    character = "images_evaluation/Angelic/character01"
    assert from_folder[character][0].archive is None
    decoded, from_zip = np.zeros((2, 20, 1, 28, 28), dtype=np.uint8)
    failure = image_cache.decode_chunk((None, [f.path for f in from_folder[character]], 0), decoded)
    zip_failure = image_cache.decode_chunk(
        (str(OMNIGLOT / "images_evaluation.zip"), [f.path for f in from_zips[character]], 0),
        from_zip,
    )
    assert failure is None and zip_failure is None and np.array_equal(decoded, from_zip)
    assert decoded.any()


def file_url(path: Path) -> str:
    return path.resolve().as_uri()


def test_download_checks_what_it_got(tmp_path, monkeypatch):
    root = tmp_path / "omniglot"
    urls = {name: file_url(OMNIGLOT / f"{name}.zip") for name in Omniglot.URLS}
    monkeypatch.setattr(Omniglot, "URLS", urls)
    characters = Omniglot(root=root, download=True).character_files()
    assert len(characters) == 1623
    assert sorted(path.name for path in root.iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]


@pytest.mark.parametrize("content", [None, b"<html>not a zip</html>"])  # None: unreachable
def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch, content):
    served = tmp_path / "served.zip"
    if content is not None:
        served.write_bytes(content)
    monkeypatch.setattr(Omniglot, "URLS", {name: file_url(served) for name in Omniglot.URLS})
    root = tmp_path / "omniglot"
    with pytest.raises(ConfigValueError, match="which failed") as error:
        Omniglot(root=root, download=True).character_files()
    assert "\n" not in str(error.value)
    assert not list(root.iterdir())


def test_wrong_download_is_rejected(tmp_path, monkeypatch):
    served = {
        "images_background": file_url(OMNIGLOT / "images_evaluation.zip"),  # the wrong archive
        "images_evaluation": file_url(OMNIGLOT / "images_evaluation.zip"),
    }
    monkeypatch.setattr(Omniglot, "URLS", served)
    root = tmp_path / "omniglot"
    with pytest.raises(ConfigValueError, match="the download holds 659 characters"):
        Omniglot(root=root, download=True).character_files()
    assert not list(root.iterdir())


def test_too_few_val_characters_for_the_ways(omniglot):
    with pytest.raises(ConfigValueError, match="ways=5: expected at most 3, the number of classes"):
        omniglot(num_val_characters=3)


def test_config(compose, omniglot_cache):
    cfg = compose(
        "dataset=omniglot",
        "model=conv4_omniglot",
        f"paths.data_dir={SHARED_DATA}",
        f"dataset.cache_dir={omniglot_cache}",
        "dataset.ways=20",
    )
    data = instantiate(cfg.dataset, _convert_="all")
    assert isinstance(data, Omniglot)
    assert (data.ways, data.shots, data.train_shots, data.query_shots) == (20, 1, 10, 1)
    assert data.root == OMNIGLOT
    model = instantiate(cfg.model, _convert_="all")
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 20)
