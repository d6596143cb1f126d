"""Parameters as plain dicts of tensors, and the two tree operations that move between φ and tasks.

A per-task "clone" of the model is a dict whose tensors carry a leading task dimension
([tasks, ...]); φ itself has none. Inner-optimizer state is a tree of the same tensors (plus plain
numbers such as Adam's step count).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map_only

Params = dict[str, torch.Tensor]
State = dict[str, Any]
# Everything an algorithm learns in the outer loop: "phi" (the model's parameters) and any
# meta-parameters of its own, e.g. Meta-SGD's "inner_lr", each a Params keyed by parameter name.
MetaParams = dict[str, Params]


def broadcast(tree: Any, tasks: int) -> Any:
    """One copy per task of every tensor in `tree` (a view: no memory until written)."""
    return tree_map_only(torch.Tensor, lambda t: t.expand(tasks, *t.shape), tree)


def task_mean(tree: Any) -> Any:
    """The mean over the task dimension of every tensor in `tree`."""
    return tree_map_only(torch.Tensor, lambda t: t.mean(0), tree)
