"""ANIL (Raghu et al., 2020), "almost no inner loop": only the head adapts to a task."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from reptile.algorithms.base import MetaStep
from reptile.algorithms.inner_loop import InnerLoop
from reptile.algorithms.params import MetaParams, State
from reptile.algorithms.tail import SecondOrderTail
from reptile.config import require, require_bool
from reptile.data.tasks import Task


def last_layer(model: nn.Module) -> str:
    """The name of the last module, in registration order, that holds parameters of its own."""
    owners = [
        name
        for name, module in model.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    return owners[-1]


@dataclass(frozen=True)
class ANIL(SecondOrderTail):
    """The inner loop adapts the head alone (the parameters under the `head` name prefixes; by
    default the model's last layer); the body is shared by all tasks and learned in the outer
    loop only, through the tail loss at the adapted head.

    `first_order` (default): the head's meta-gradient is FOMAML's (its k-th inner step, taken on
    the tail), the body's inner_lr · ∇_body L_tail(body, head_k−1): any inner optimizer, any
    backend, compile. `first_order=false`: ANIL as published, MAML's meta-gradient differentiated
    through the head's k − 1 SGD steps (torch.func; inner_optimizer=sgd, no compile).
    """

    head: tuple[str, ...] = ()
    first_order: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_bool("first_order", self.first_order)
        require(
            isinstance(self.head, (list, tuple)) and all(isinstance(p, str) for p in self.head),
            "head",
            self.head,
            "a list of parameter-name prefixes (empty: the model's last layer)",
        )
        if not self.first_order:
            self.check_second_order()

    def adapted_names(self, model: nn.Module) -> tuple[str, ...]:
        names = [name for name, _ in model.named_parameters()]
        prefixes = tuple(self.head) or (last_layer(model),)
        head = tuple(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))
        require(
            0 < len(head) < len(names),
            "head",
            list(self.head),
            f"prefixes of some but not all of the model's parameters ({', '.join(names)})",
        )
        return head

    def meta_gradient(
        self, inner: InnerLoop, meta: MetaParams, state: State, task: Task
    ) -> MetaStep:
        if self.first_order:
            return self.first_order_gradient(inner, meta, state, task)
        return self.second_order_gradient(inner, meta, state, task)
