"""What every algorithm shares: its hyperparameters, its adaptation, and evaluation.

An algorithm owns its adaptation: which parameters the inner loop adapts (`adapted_names`), the
meta-parameters it learns beside φ (`init_meta_parameters`, `learned_state`), how the inner
optimizer's state runs through the tasks (`inner_state`), and how tasks are adapted and scored at
evaluation (`evaluate`). A rule of Reptile's kind implements `meta_gradient` and nothing else; the
outer optimizer then steps every meta-parameter with that gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_map, tree_map_only

from reptile.algorithms.inner_loop import BACKENDS, InnerLoop
from reptile.algorithms.optimizers import INNER_OPTIMIZERS
from reptile.algorithms.params import MetaParams, Params, State, broadcast, task_mean
from reptile.config import (
    require,
    require_bool,
    require_choice,
    require_int,
    require_non_negative,
    require_positive,
)
from reptile.data.tasks import InnerSchedule, Task

INNER_STATES = ("carry", "sequential", "reset")
EVAL_INNER_STATES = ("trained", "fresh")
OUTER_OPTIMIZERS = ("sgd", "adam")
# Score name → (inner steps, transductive): what `evaluate` reports for a task.
ScorePlan = dict[str, tuple[int, bool]]


class MetaStep(NamedTuple):
    gradient: MetaParams  # for every meta-parameter, averaged over this process's tasks
    # The inner optimizer's state after the step: per task ([tasks, ...]) from `meta_gradient`;
    # from `meta_step`, what the next meta-iteration starts from (None: nothing is carried).
    state: State | None
    losses: torch.Tensor  # inner-loop losses [steps, tasks]


@dataclass(frozen=True)
class Algorithm(ABC):
    """Hyperparameters, under the names users override (`algorithm.inner_steps=10`)."""

    inner_steps: int = 5  # k
    inner_batch_size: int = 10
    inner_lr: float = 1e-3
    inner_optimizer: str = "adam"
    inner_betas: tuple[float, float] = (0.0, 0.999)  # Adam's; the reference uses beta1 = 0
    # "carry": Adam's moments persist across training tasks: the tasks of a meta-batch start
    # from the shared moments, which then become their mean (vectorised across tasks);
    # "sequential": they persist from task to task, as in the reference implementation, which
    # adapts a meta-batch's tasks one after another (each DDP rank chains its share, and the
    # ranks' final moments are averaged); "reset": every task starts from fresh moments.
    inner_state: str = "carry"
    # Where each evaluation task's inner optimizer starts: "trained", from the state training
    # carried (as the reference does: it saves the moments and restores them after every task;
    # fresh when nothing was carried), or "fresh" (zero moments).
    eval_inner_state: str = "trained"
    meta_lr: float = 1.0  # ε at the first meta-iteration
    meta_lr_final: float = 0.0  # ε at the last one, linearly annealed
    outer_optimizer: str = "sgd"  # sgd with lr ε is the plain Reptile interpolation
    outer_betas: tuple[float, float] = (0.9, 0.999)
    eval_inner_steps: int = 50
    eval_batch_size: int = 5
    transductive: bool = False
    tail_shots: int = 0  # held-out samples per class for a separate final mini-batch
    # How the inner loop computes per-task gradients (InnerLoop): auto, folded or vmap.
    backend: str = "auto"
    # torch.compile training's meta-step (the k-step inner loop of all tasks and the meta-gradient)
    # as one graph: faster on small models, after a cold compile of a minute or more.
    compile: bool = False
    # Evaluation adapts as many of a batch's tasks at once as fit in this many MiB of
    # activations (estimated from the model's layer sizes); the rest wait for the next chunk.
    # None: 1024 on CPU, a quarter of the free memory on a GPU.
    eval_memory_mib: int | None = None

    def __post_init__(self) -> None:
        require_int("inner_steps", self.inner_steps, 1)
        require_int("inner_batch_size", self.inner_batch_size, 1)
        require_positive("inner_lr", self.inner_lr)
        require_choice("inner_optimizer", self.inner_optimizer, tuple(INNER_OPTIMIZERS))
        require_choice("inner_state", self.inner_state, INNER_STATES)
        require_choice("eval_inner_state", self.eval_inner_state, EVAL_INNER_STATES)
        require_positive("meta_lr", self.meta_lr)
        require_non_negative("meta_lr_final", self.meta_lr_final)
        require_choice("outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        for key in ("inner_betas", "outer_betas"):
            betas = getattr(self, key)
            valid = len(betas) == 2 and all(0 <= b < 1 for b in betas)
            require(valid, key, list(betas), "two numbers in [0, 1)")
        require_int("eval_inner_steps", self.eval_inner_steps, 0)
        require_int("eval_batch_size", self.eval_batch_size, 1)
        require_bool("transductive", self.transductive)
        require_int("tail_shots", self.tail_shots, 0)
        require_choice("backend", self.backend, BACKENDS)
        require_bool("compile", self.compile)
        if self.eval_memory_mib is not None:
            require_int("eval_memory_mib", self.eval_memory_mib, 1)

    # --- the inner loop's mini-batches, the outer optimizer ---------------------------------

    @property
    def train_schedule(self) -> InnerSchedule:
        return InnerSchedule(self.inner_steps, self.inner_batch_size)

    def eval_schedule(self, steps: int | None = None) -> InnerSchedule:
        """Evaluation's mini-batches: `eval_inner_steps` of them, or `steps`."""
        steps = self.eval_inner_steps if steps is None else steps
        return InnerSchedule(max(steps, 1), self.eval_batch_size)

    def make_outer_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.outer_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.meta_lr, betas=tuple(self.outer_betas))
        return torch.optim.SGD(params, lr=self.meta_lr)

    def meta_lr_at(self, fraction_done: float) -> float:
        """ε after `fraction_done` of training: linear from `meta_lr` to `meta_lr_final`."""
        return (1 - fraction_done) * self.meta_lr + fraction_done * self.meta_lr_final

    # --- what is adapted, what is learned ----------------------------------------------------

    def adapted_names(self, model: nn.Module) -> tuple[str, ...]:
        """The parameters the inner loop adapts: all of them."""
        return tuple(name for name, _ in model.named_parameters())

    def init_meta_parameters(self, model: nn.Module, adapted: tuple[str, ...]) -> MetaParams:
        """The algorithm's own meta-parameters beside φ, at their initial values: none."""
        return {}

    def learned_state(self, meta: MetaParams) -> State:
        """Inner-optimizer state that the meta-parameters supply (Meta-SGD's learning rates)."""
        return {}

    def inner_loop(self, model: nn.Module, loss: str) -> InnerLoop:
        optimizer = INNER_OPTIMIZERS[self.inner_optimizer](self.inner_lr, tuple(self.inner_betas))
        return InnerLoop(
            model, loss, optimizer, self.backend, self.compile, self.adapted_names(model)
        )

    # --- training --------------------------------------------------------------------------

    def start_state(
        self, inner: InnerLoop, meta: MetaParams, carried: State | None, tasks: int
    ) -> State:
        """The inner state `tasks` tasks start from: `carried`, or a fresh one if None, plus what
        the meta-parameters supply."""
        if carried is None:
            state = inner.init_state(broadcast(meta["phi"], tasks))
        else:
            state = broadcast(carried, tasks)
        return {**state, **broadcast(self.learned_state(meta), tasks)}

    def carried_state(self, state: State) -> State | None:
        """What the next meta-iteration starts from: the tasks' mean state, unless reset."""
        return None if self.inner_state == "reset" else task_mean(state)

    def meta_step(
        self, inner: InnerLoop, meta: MetaParams, carried: State | None, task: Task
    ) -> MetaStep:
        """The meta-gradient of this process's tasks: all at once, or, with
        `inner_state=sequential`, one task after another, each starting from the inner state
        the previous one ended with (the reference's order; not vectorised across tasks).
        With `compile`, all of it is one graph."""
        if carried is None or self.inner_state == "reset":
            # A fresh state as a tensor tree too: the compiled step then sees one kind of input
            # (one graph, and one more once Adam's step count varies).
            carried = inner.init_state(meta["phi"])
        step = inner.compiled(self.meta_step_eagerly)(inner, meta, carried, task)
        if not inner.compile or step.state is None:
            return step
        # A CUDA graph's outputs live in its memory pool, which its next replay overwrites, and
        # the carried state is that replay's input: it is copied out.
        return step._replace(state=tree_map_only(torch.Tensor, torch.clone, step.state))

    def meta_step_eagerly(
        self, inner: InnerLoop, meta: MetaParams, carried: State, task: Task
    ) -> MetaStep:
        tasks = len(task["support_targets"])
        if self.inner_state != "sequential":
            start = self.start_state(inner, meta, carried, tasks)
            step = self.meta_gradient(inner, meta, start, task)
            return MetaStep(step.gradient, self.carried_state(step.state), step.losses)
        state, steps = self.start_state(inner, meta, carried, 1), []
        for i in range(tasks):
            one_task = {key: value[i : i + 1] for key, value in task.items()}
            steps.append(self.meta_gradient(inner, meta, state, one_task))
            state = steps[-1].state
        gradient = tree_map(lambda *tasks: torch.stack(tasks).mean(0), *[s.gradient for s in steps])
        losses = torch.cat([s.losses for s in steps], 1)
        return MetaStep(gradient, self.carried_state(state), losses)

    @abstractmethod
    def meta_gradient(
        self, inner: InnerLoop, meta: MetaParams, state: State, task: Task
    ) -> MetaStep:
        """The direction the outer optimizer descends, from the tasks of `task` (a meta-batch),
        each starting from its slice of `state`."""

    # --- evaluation ------------------------------------------------------------------------

    def adapt(
        self,
        inner: InnerLoop,
        meta: MetaParams,
        carried: State | None,
        task: Task,
        steps: list[int],
    ) -> dict[int, Params]:
        """Per-task parameters after each number of inner steps in `steps` (sorted), from φ and
        the inner state `eval_inner_state` names."""
        tasks = len(task["support_targets"])
        params = broadcast(meta["phi"], tasks)
        carried = carried if self.eval_inner_state == "trained" else None
        state = self.start_state(inner, meta, carried, tasks)
        snapshots, done = {}, 0
        for target in steps:
            for step in range(done, target):
                params, state, _ = inner.step(params, state, task, step)
            snapshots[target], done = params, target
        return snapshots

    def eval_memory_bytes(self, device: torch.device) -> int:
        if self.eval_memory_mib is not None:
            return self.eval_memory_mib * 2**20
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0] // 4
        return 2**30

    def evaluate(
        self,
        inner: InnerLoop,
        meta: MetaParams,
        carried: State | None,
        task: Task,
        plan: ScorePlan,
    ) -> dict[str, torch.Tensor]:
        """Per-task scores [tasks] under each name of `plan`; the adaptation is shared. The tasks
        are adapted and scored in chunks that fit `eval_memory_mib`."""
        non_transductive = any(not transductive for _, transductive in plan.values())
        per_task = inner.evaluation_bytes(task, self.eval_batch_size, non_transductive)
        chunk = max(1, self.eval_memory_bytes(task["support_inputs"].device) // per_task)
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in plan}
        for start in range(0, len(task["support_targets"]), chunk):
            part = {key: value[start : start + chunk] for key, value in task.items()}
            params = self.adapt(inner, meta, carried, part, sorted({s for s, _ in plan.values()}))
            for name, (steps, transductive) in plan.items():
                scores[name].append(inner.score(params[steps], part, transductive))
            del params  # free this chunk's adapted copies before adapting the next
        return {name: torch.cat(values) for name, values in scores.items()}
