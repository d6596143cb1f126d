"""The LightningModule: one meta-iteration per `training_step`, by manual optimization."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from reptile.algorithms.base import Algorithm, MetaStep, clones
from reptile.algorithms.inner_loop import InnerLoop, broadcast, task_mean
from reptile.algorithms.optimizers import Params, State
from reptile.config import ConfigValueError
from reptile.data.tasks import Task
from reptile.lightning.metrics import MeanWithConfidence


class DivergenceError(RuntimeError):
    """Training produced a NaN or infinite value."""


class MetaLearner(pl.LightningModule):
    """φ lives in `model`'s parameters; the algorithm turns tasks into a meta-gradient for them.

    With several DDP ranks each rank adapts its share of the meta-batch and the meta-gradients
    are averaged explicitly with an all-reduce (setting `p.grad` by hand bypasses DDP's hooks).
    """

    def __init__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        loss: str,
        score_before: str | None = None,
        score_after: str = "score",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "algorithm"])
        self.automatic_optimization = False
        # The composed config of the run, saved in checkpoints so that `reptile.adaptation`
        # can rebuild the model and the algorithm from a checkpoint alone.
        self.run_config: dict[str, Any] | None = None
        self.model = model
        self.algorithm = algorithm
        self.loss = loss
        try:
            self.inner = InnerLoop(
                model, loss, algorithm.make_inner_optimizer(), algorithm.backend, algorithm.compile
            )
        except ConfigValueError as error:  # a backend this model cannot run on
            raise error.under("algorithm") from None
        self.inner_state: State | None = None  # carried across meta-iterations ("carry")
        self.score_plan = self.plan_scores(score_before, score_after)
        self.scores = nn.ModuleDict({name: MeanWithConfidence() for name in self.score_plan})

    def plan_scores(self, before: str | None, after: str) -> dict[str, tuple[int, bool]]:
        """Score name → (inner steps, transductive). With batch norm the two ways of scoring
        queries differ; the one not configured is reported too, under a suffixed name (adapting
        is the expensive part and is shared)."""
        steps, transductive = self.algorithm.eval_inner_steps, self.algorithm.transductive
        plan = {after: (steps, transductive)}
        if before:
            plan[before] = (0, transductive)
        if self.inner.couples_batch:
            other = "non_transductive" if transductive else "transductive"
            plan[f"{after}_{other}"] = (steps, not transductive)
        return plan

    def phi(self) -> Params:
        return {name: p.detach() for name, p in self.model.named_parameters()}

    # --- training -------------------------------------------------------------------------

    def initial_inner_state(self, tasks: int) -> State:
        if self.algorithm.inner_state == "reset" or self.inner_state is None:
            return self.inner.optimizer.init(clones(self.phi(), tasks))
        return broadcast(self.inner_state, tasks)

    def meta_step(self, task: Task) -> MetaStep:
        """The algorithm's meta-gradient for this process's tasks: all at once, or, with
        `inner_state=sequential`, one task after another, each starting from the inner state
        the previous one ended with (the reference's order; not vectorised across tasks)."""
        tasks = len(task["support_targets"])
        if self.algorithm.inner_state != "sequential":
            return self.algorithm.meta_gradient(
                self.inner, self.phi(), self.initial_inner_state(tasks), task
            )
        state, steps = self.initial_inner_state(1), []
        for i in range(tasks):
            one_task = {key: value[i : i + 1] for key, value in task.items()}
            steps.append(self.algorithm.meta_gradient(self.inner, self.phi(), state, one_task))
            state = steps[-1].state
        gradient = {
            name: torch.stack([step.gradient[name] for step in steps]).mean(0)
            for name in steps[0].gradient
        }
        return MetaStep(gradient, state, torch.cat([step.losses for step in steps], 1))

    def training_step(self, task: Task, batch_idx: int) -> None:
        step = self.meta_step(task)
        carry = self.algorithm.inner_state != "reset"
        gradient, state, losses = self.mean_over_ranks(
            (
                step.gradient,
                task_mean(step.state) if carry else None,
                {"first": step.losses[0].mean(), "last": step.losses[-1].mean()},
            )
        )
        if carry:
            self.inner_state = state
        self.check_finite(losses["first"], losses["last"], *gradient.values())

        optimizer = self.optimizers()
        optimizer.zero_grad()
        for name, p in self.model.named_parameters():
            p.grad = gradient[name]
        optimizer.step()
        self.lr_schedulers().step()

        self.log_dict(
            {
                "train/loss": losses["first"],  # at φ, on each task's first mini-batch
                "train/loss_adapted": losses["last"],  # on the last inner mini-batch
                "train/meta_lr": optimizer.param_groups[0]["lr"],
            },
            prog_bar=True,
        )

    def mean_over_ranks(self, tree: Any) -> Any:
        """Every tensor in `tree` averaged over the DDP ranks, by one all-reduce of all of them.

        Each rank holds the mean over its equal share of the meta-batch, so the mean of the ranks'
        means is the mean over all tasks. Non-tensor leaves (Adam's step count) agree on all ranks.
        """
        if self.trainer.world_size == 1:
            return tree
        leaves, spec = tree_flatten(tree)
        tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        # `strategy.reduce` passes anything but a single tensor through unreduced: flatten.
        flat = torch.cat([leaves[i].detach().reshape(-1) for i in tensors])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        chunks = flat.split([leaves[i].numel() for i in tensors])
        for i, chunk in zip(tensors, chunks, strict=True):
            leaves[i] = chunk.view(leaves[i].shape).to(leaves[i].dtype)
        return tree_unflatten(leaves, spec)

    def check_finite(
        self, loss_first: torch.Tensor, loss_last: torch.Tensor, *tensors: torch.Tensor
    ) -> None:
        every = (loss_first, loss_last, *tensors)
        if torch.stack([torch.isfinite(t).all() for t in every]).all():  # one device sync
            return
        values = {"train/loss": loss_first, "train/loss_adapted": loss_last}
        bad = {name: value.item() for name, value in values.items() if not torch.isfinite(value)}
        detail = (
            ", ".join(f"{name}={value}" for name, value in bad.items())
            or "meta-gradient not finite"
        )
        raise DivergenceError(f"training diverged at meta-iteration {self.global_step}: {detail}")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.algorithm.make_outer_optimizer(list(self.model.parameters()))
        total = max(self.trainer.max_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: self.algorithm.meta_lr_at(min(step / total, 1.0)) / self.algorithm.meta_lr,
        )
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["inner_state"] = self.inner_state
        checkpoint["run_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.inner_state = checkpoint.get("inner_state")

    # --- evaluation -----------------------------------------------------------------------

    def adapted_params(self, task: Task, steps: list[int]) -> dict[int, Params]:
        """Per-task parameters after each number of inner steps in `steps` (sorted), from φ and
        the inner-optimizer state `algorithm.eval_inner_state` names."""
        params = clones(self.phi(), len(task["support_targets"]))
        if self.algorithm.eval_inner_state == "trained" and self.inner_state is not None:
            state = broadcast(self.inner_state, len(task["support_targets"]))
        else:
            state = self.inner.optimizer.init(params)
        snapshots, done = {}, 0
        for target in steps:
            for step in range(done, target):
                params, state, _ = self.inner.step(params, state, task, step)
            snapshots[target], done = params, target
        return snapshots

    def predict(self, params: Params, task: Task, transductive: bool | None = None) -> torch.Tensor:
        if transductive is None:
            transductive = self.algorithm.transductive
        return self.inner.predict(
            params, task["support_inputs"], task["query_inputs"], transductive
        )

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-task score: mean squared error, or accuracy for classification."""
        if self.loss == "mse":
            return (predictions - targets).square().flatten(1).mean(1)
        return (predictions.argmax(-1) == targets).float().mean(1)

    def evaluation_step(self, task: Task) -> None:
        steps = sorted({step for step, _ in self.score_plan.values()})
        params = self.adapted_params(task, steps)
        for name, (step, transductive) in self.score_plan.items():
            predictions = self.predict(params[step], task, transductive)
            self.scores[name].update(self.score(predictions, task["query_targets"]))

    def log_scores(self, stage: str) -> None:
        for name, metric in self.scores.items():
            mean, ci95 = metric.compute()
            self.log(f"{stage}/{name}", mean.float(), prog_bar=stage == "val")
            self.log(f"{stage}/{name}_ci95", ci95.float())
            metric.reset()

    def validation_step(self, task: Task, batch_idx: int) -> None:
        self.evaluation_step(task)

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val")

    def test_step(self, task: Task, batch_idx: int) -> None:
        self.evaluation_step(task)

    def on_test_epoch_end(self) -> None:
        self.log_scores("test")
