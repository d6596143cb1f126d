"""N-way task sampling, on a small synthetic dataset whose every image is unique and asymmetric."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from reptile.config import ConfigValueError
from reptile.data.fewshot import FewShotClassification, Split

CLASS_SIZES = {"train": [12, 13, 12, 14, 12, 12], "val": [6, 7, 6, 6, 6], "test": [5, 6, 5, 5, 5]}


def numbered_split(sizes: list[int], first_class: int, rotations: tuple[int, ...]) -> Split:
    """Image j of class c: pixel (0, 0) = c, pixel (0, 1) = j, a corner marker shows rotations."""
    images = torch.zeros(sum(sizes), 1, 3, 3, dtype=torch.uint8)
    ranges, start = [], 0
    for c, size in enumerate(sizes):
        images[start : start + size, 0, 0, 0] = first_class + c
        images[start : start + size, 0, 0, 1] = torch.arange(size)
        images[start : start + size, 0, 2, 2] = 255
        ranges.append((start, start + size))
        start += size
    names = tuple(f"class{first_class + c}" for c in range(len(sizes)))
    return Split(images, torch.tensor(ranges), names, rotations)


class Numbered(FewShotClassification):
    def __init__(self, load_log: Path | None = None, val_classes: int = 5, **options) -> None:
        super().__init__(**options)
        self.load_log = load_log
        self.val_classes = val_classes

    def load_splits(self) -> dict[str, Split]:
        if self.load_log is not None:
            with open(self.load_log, "a") as log:
                log.write(f"{os.getpid()}\n")
        return {
            "train": numbered_split(CLASS_SIZES["train"], 0, (0, 1, 2, 3)),
            "val": numbered_split(CLASS_SIZES["val"][: self.val_classes], 100, (0,)),
            "test": numbered_split(CLASS_SIZES["test"], 200, (0,)),
        }


def identify(image: torch.Tensor) -> tuple[int, int, int]:
    """(class, rotation in quarter turns, index) of a float image of a `numbered_split`."""
    pixels = (image[0] * 255).round().to(torch.uint8)
    for turns in range(4):
        upright = torch.rot90(pixels, -turns, dims=(-2, -1))
        if upright[2, 2] == 255:
            return int(upright[0, 0]), turns, int(upright[0, 1])
    raise AssertionError("not an image of the dataset")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_task(task: dict, ways: int, support: int, query: int) -> None:
    assert task["support_inputs"].shape == (ways * support, 1, 3, 3)
    assert task["query_inputs"].shape == (ways * query, 1, 3, 3)
    assert task["support_inputs"].dtype == task["query_inputs"].dtype == torch.float32
    assert 0 <= task["support_inputs"].min() and task["support_inputs"].max() <= 1
    for key, count in (("support_targets", support), ("query_targets", query)):
        assert task[key].dtype == torch.long
        assert task[key].bincount(minlength=ways).tolist() == [count] * ways
    # Each label is one class (class and rotation), every image is drawn once.
    identities = {}
    for part in ("support", "query"):
        labels = task[f"{part}_targets"].tolist()
        for image, label in zip(task[f"{part}_inputs"], labels, strict=True):
            cls, turns, index = identify(image)
            identities.setdefault(label, set()).add((cls, turns, index))
    classes = set()
    for images in identities.values():
        assert len(images) == support + query  # no image twice: support and query disjoint
        assert len({(cls, turns) for cls, turns, _ in images}) == 1
        classes.add(next(iter(images))[:2])
    assert len(classes) == ways


def test_training_tasks_have_train_shots_and_a_disjoint_tail():
    data = Numbered(ways=4, train_shots=5, query_shots=2)
    for seed in range(20):
        check_task(data.sample_train_task(generator(seed), tail_size=3), 4, 5, 3)
    check_task(data.sample_train_task(generator(0), tail_size=0), 4, 5, 0)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_tasks_have_shots_and_query_shots(split):
    data = Numbered(ways=5, shots=3, query_shots=2)
    first_class = {"val": 100, "test": 200}[split]
    for seed in range(20):
        task = data.sample_eval_task(split, generator(seed))
        check_task(task, 5, 3, 2)
        classes = {identify(image)[0] for image in task["support_inputs"]}
        assert classes == set(range(first_class, first_class + 5))  # all 5 classes of the split
        assert {identify(image)[1] for image in task["support_inputs"]} == {0}  # never rotated


def test_rotations_are_classes_and_labels_are_permuted():
    data = Numbered(ways=3, train_shots=2)
    seen_classes, label_of_class = set(), {}
    for seed in range(200):
        task = data.sample_train_task(generator(seed), tail_size=0)
        labels = task["support_targets"].tolist()
        for image, label in zip(task["support_inputs"], labels, strict=True):
            cls, turns, _ = identify(image)
            seen_classes.add((cls, turns))
            label_of_class.setdefault((cls, turns), set()).add(label)
    assert seen_classes == {(c, t) for c in range(6) for t in range(4)}  # 24 classes
    assert all(labels == {0, 1, 2} for labels in label_of_class.values())


def test_rotated_class_is_rot90_of_its_base_class():
    split = Numbered().splits["train"]
    for base in range(len(split.names)):
        upright = split.class_images(4 * base)
        for turns in range(4):
            assert torch.equal(
                split.class_images(4 * base + turns), torch.rot90(upright, turns, dims=(2, 3))
            )
        assert split.class_name(4 * base + 1) == f"class{base}@90"


def test_tasks_depend_only_on_the_generator():
    data = Numbered(ways=3, train_shots=4)
    torch.manual_seed(1)
    global_state = torch.get_rng_state()
    first = data.sample_train_task(generator(7), tail_size=2)
    torch.manual_seed(12345)  # a different global state changes nothing
    again = data.sample_train_task(generator(7), tail_size=2)
    other = data.sample_train_task(generator(8), tail_size=2)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not all(torch.equal(first[key], other[key]) for key in first)
    torch.manual_seed(1)
    assert torch.equal(torch.get_rng_state(), global_state)
    data.sample_eval_task("test", generator(0))
    # Sampling never drew from the global generator.
    torch.manual_seed(3)
    before = torch.get_rng_state()
    data.sample_train_task(generator(0), 1)
    data.sample_eval_task("val", generator(0))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"ways": 7}, "ways"),  # only 5 val and test classes
        ({"shots": 5}, "shots"),  # the smallest test class has 5 images, 1 of them a query
        ({"train_shots": 13}, "train_shots"),  # 12 images in the smallest train class
        ({"train_shots": 11, "tail_size": 2}, "train_shots"),
        ({"query_shots": 5}, "query_shots"),  # the queries alone take all 5: no support is left
    ],
)
def test_impossible_task_sizes_fail_with_one_clear_line(options, key):
    data = Numbered(**options)
    with pytest.raises(ConfigValueError) as error:
        data.prepare()
    assert error.value.key == key
    assert "\n" not in str(error.value)


def test_val_split_is_only_checked_when_val_tasks_are_drawn():
    Numbered(ways=5, val_classes=4, num_val_tasks=0).prepare()
    with pytest.raises(ConfigValueError, match="ways=5: expected at most 4, the number of classes"):
        Numbered(ways=5, val_classes=4).prepare()


def test_dataloader_workers_reuse_the_loaded_splits(tmp_path):
    load_log = tmp_path / "loads"
    data = Numbered(load_log=load_log, ways=3, train_shots=2, meta_batch_size=2)
    tasks = data.train_tasks(start_step=0, num_steps=4)
    in_process = [tasks[i] for i in range(4)]
    loader = DataLoader(tasks, batch_size=None, num_workers=2)
    for expected, batch in zip(in_process, loader, strict=True):
        assert batch["support_inputs"].shape == (2, 6, 1, 3, 3)
        for key in expected:
            assert torch.equal(expected[key], batch[key])
    assert load_log.read_text().split() == [str(os.getpid())]  # loaded once, in this process
