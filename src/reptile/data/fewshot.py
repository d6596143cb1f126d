"""Few-shot image classification: N-way tasks over classes of images held in memory.

A dataset (Omniglot, Mini-ImageNet, a folder of images) only says how to load its three splits;
this module draws the tasks. A split is one uint8 tensor of images plus the index range of each
class inside it, so that a task is a handful of index lookups and DataLoader workers share the
images with the main process instead of loading their own copy.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from reptile.config import ConfigValueError, require, require_int
from reptile.data.distribution import TaskDistribution
from reptile.data.tasks import SPLITS, Task


@dataclass(frozen=True)
class Split:
    """The classes of one split: base class `b` has the images `images[ranges[b, 0]:ranges[b, 1]]`.

    Every quarter-turn count in `rotations` makes each base class a distinct class (the paper's
    Omniglot augmentation), so class `c` is base class `c // len(rotations)` turned by
    `rotations[c % len(rotations)]` quarter turns, and the split has
    `len(names) * len(rotations)` classes.
    """

    images: torch.Tensor  # uint8 [num_images, channels, height, width]
    ranges: torch.Tensor  # long [num_base_classes, 2]: start and stop of each base class
    names: tuple[str, ...]  # one per base class
    rotations: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.ranges.shape != (len(self.names), 2):
            raise ValueError(
                f"ranges must be [{len(self.names)}, 2], got {tuple(self.ranges.shape)}"
            )
        if not self.rotations or len(set(self.rotations)) != len(self.rotations):
            raise ValueError(
                f"rotations must be distinct quarter-turn counts, got {self.rotations}"
            )
        if any(r not in (0, 1, 2, 3) for r in self.rotations):
            raise ValueError(f"rotations must be quarter-turn counts 0..3, got {self.rotations}")
        if self.rotations != (0,) and self.images.shape[-1] != self.images.shape[-2]:
            raise ValueError("only square images can be rotated into new classes")

    @property
    def num_classes(self) -> int:
        return len(self.names) * len(self.rotations)

    @cached_property
    def class_sizes(self) -> torch.Tensor:
        """Images per base class."""
        return self.ranges[:, 1] - self.ranges[:, 0]

    @cached_property
    def smallest_class(self) -> int:
        return int(self.class_sizes.min()) if len(self.names) else 0

    def select(self, base_classes: Sequence[int], rotations: tuple[int, ...] = (0,)) -> Split:
        """The split made of some of these base classes (sharing the image tensor, no copy)."""
        index = torch.as_tensor(list(base_classes), dtype=torch.long)
        names = tuple(self.names[i] for i in index.tolist())
        return Split(self.images, self.ranges[index].reshape(-1, 2), names, rotations)

    def class_name(self, cls: int) -> str:
        base, turn = divmod(cls, len(self.rotations))
        rotation = self.rotations[turn]
        return f"{self.names[base]}@{90 * rotation}" if rotation else self.names[base]

    def class_images(self, cls: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """The uint8 images of class `cls` (rotated as the class says), or those at `index`."""
        base, turn = divmod(cls, len(self.rotations))
        start, stop = self.ranges[base].tolist()
        images = self.images[start:stop] if index is None else self.images[start + index]
        return torch.rot90(images, self.rotations[turn], dims=(-2, -1))


class FewShotClassification(TaskDistribution):
    """N-way classification tasks drawn from the classes of a dataset's splits.

    A training task has `train_shots` support images per class (plus `tail_size` held-out query
    images per class); an evaluation task has `shots` support and `query_shots` query images per
    class. The task's classes are drawn without replacement and labelled in the random order in
    which they were drawn, so labels are permuted per task; the images of a class are drawn without
    replacement, which keeps support and query disjoint. Only the generator passed in is used, so
    a task depends on nothing but its seed.

    Subclasses implement `load_splits`; it runs once per process, in `prepare` or, at the latest,
    before DataLoader workers are started (they inherit the loaded images).
    """

    loss = "cross_entropy"
    score_before = None
    score_after = "acc"

    def __init__(
        self,
        ways: int = 5,
        shots: int = 1,
        train_shots: int = 10,
        query_shots: int = 1,
        **loader_options: Any,
    ) -> None:
        super().__init__(**loader_options)
        require_int("ways", ways, 1)
        require_int("shots", shots, 1)
        require_int("train_shots", train_shots, 1)
        require_int("query_shots", query_shots, 1)
        self.ways = ways
        self.num_outputs = ways  # one logit per class
        self.shots = shots
        self.train_shots = train_shots
        self.query_shots = query_shots
        self._splits: dict[str, Split] | None = None

    @abstractmethod
    def load_splits(self) -> dict[str, Split]:
        """The "train", "val" and "test" splits."""

    @property
    def splits(self) -> dict[str, Split]:
        """The splits, loaded on first use."""
        return self.load()

    def load(self) -> dict[str, Split]:
        """Loads the splits unless loaded already, and checks them against the task sizes."""
        if self._splits is None:
            splits = self.load_splits()
            if set(splits) != set(SPLITS):
                raise ValueError(
                    f"load_splits must return the splits {SPLITS}, got {tuple(splits)}"
                )
            check_task_size(splits["train"], "train", self.ways, self.train_shots, self.tail_size)
            for name in ("val", "test"):
                if self.num_eval_tasks[name] > 0:
                    check_task_size(splits[name], name, self.ways, self.shots, self.query_shots)
            self._splits = splits
        return self._splits

    def prepare(self) -> None:
        self.load()

    def sample_train_task(self, generator: torch.Generator, tail_size: int) -> Task:
        split = self.splits["train"]
        check_task_size(split, "train", self.ways, self.train_shots, tail_size)
        return self.sample_task(split, self.train_shots, tail_size, generator)

    def sample_eval_task(self, split: str, generator: torch.Generator) -> Task:
        require(split in ("val", "test"), "split", split, "val or test")
        classes = self.splits[split]
        check_task_size(classes, split, self.ways, self.shots, self.query_shots)
        return self.sample_task(classes, self.shots, self.query_shots, generator)

    def sample_task(
        self, split: Split, support: int, query: int, generator: torch.Generator
    ) -> Task:
        """`ways` classes × (`support` + `query`) images: float32 in [0, 1], and their labels."""
        per_class = support + query
        # The order of the draw is the label permutation: the i-th class drawn gets label i.
        classes = torch.randperm(split.num_classes, generator=generator)[: self.ways].tolist()
        picked = []
        for cls in classes:
            size = int(split.class_sizes[cls // len(split.rotations)])
            index = torch.randperm(size, generator=generator)[:per_class]
            picked.append(split.class_images(cls, index))
        images = torch.stack(picked).float().div_(255)
        labels = torch.arange(self.ways).unsqueeze(1).expand(self.ways, per_class)
        shape = images.shape[2:]  # images: [ways, per_class, C, H, W]
        return {
            "support_inputs": images[:, :support].reshape(self.ways * support, *shape),
            "support_targets": labels[:, :support].reshape(self.ways * support),
            "query_inputs": images[:, support:].reshape(self.ways * query, *shape),
            "query_targets": labels[:, support:].reshape(self.ways * query),
        }


def check_task_size(split: Split, name: str, ways: int, support: int, query: int) -> None:
    """One clear line when split `name` cannot provide `ways` classes × (support + query) images."""
    require(
        split.num_classes >= ways,
        "ways",
        ways,
        f"at most {split.num_classes}, the number of classes in the {name} split",
    )
    smallest = split.smallest_class
    if support + query <= smallest:
        return
    images = f"the smallest {name} class has {smallest} images"
    if name == "train":  # the tail is the algorithm's (algorithm.tail_shots)
        key, held_out = "train_shots", f", and tail_size={query} per class are held out"
    else:
        key, held_out = "shots", f", and query_shots={query} per class are queries"
        if query >= smallest:  # the queries alone leave no support image: theirs is the key
            support_images = f"shots={support} per class are support"
            accepted = f"at most {smallest - support}: {images}, and {support_images}"
            raise ConfigValueError("query_shots", query, accepted)
    accepted = f"at most {smallest - query}: {images}" + (held_out if query else "")
    raise ConfigValueError(key, support, accepted)
