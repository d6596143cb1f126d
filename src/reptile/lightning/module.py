"""The LightningModule: one meta-iteration per `training_step`, by manual optimization.

Glue only: the algorithm adapts, scores and computes the meta-gradient; this module holds φ (the
model's parameters) and the algorithm's own meta-parameters, sets their gradients for the outer
optimizer, averages across DDP ranks, checks for divergence, logs, and checkpoints the inner state.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from reptile.algorithms.base import Algorithm, ScorePlan
from reptile.algorithms.params import MetaParams, Params, State
from reptile.cli import DivergenceError
from reptile.config import ConfigValueError
from reptile.data.tasks import Task
from reptile.lightning.metrics import MeanWithConfidence


def parameter_key(name: str) -> str:
    """A parameter's name as a key of `nn.ParameterDict`, which refuses dots."""
    return name.replace(".", "/")


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of `tensors` is finite, as one boolean tensor, in a few kernels for
    any number of tensors: x·0 is 0 for a finite x and NaN for ±inf and NaN."""
    zeros = torch._foreach_mul(tensors, 0.0)
    return torch.stack(torch._foreach_norm(zeros)).isfinite().all()


class MetaLearner(pl.LightningModule):
    """φ lives in `model`'s parameters, the algorithm's own meta-parameters (e.g. Meta-SGD's
    learning rates) in `learned`; the algorithm turns tasks into a meta-gradient for all of them.

    With several DDP ranks each rank adapts its share of the meta-batch and the meta-gradients
    are averaged explicitly with an all-reduce (setting `p.grad` by hand bypasses DDP's hooks).

    Divergence is recorded on the device, so that a step needs no host sync, and read every
    `divergence_check_every` meta-iterations (default: every one on the CPU, where reading is
    free; every `trainer.log_every_n_steps` on an accelerator), before every checkpoint and
    validation, and at the end of training; the error names the first meta-iteration that went
    bad, however late it is read.
    """

    def __init__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        loss: str,
        score_before: str | None = None,
        score_after: str = "score",
        divergence_check_every: int | None = None,
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
            self.inner = algorithm.inner_loop(model, loss)
        except ConfigValueError as error:  # e.g. a backend this model cannot run on
            raise error.under("algorithm") from None
        learned = algorithm.init_meta_parameters(model, self.inner.adapted)
        self.learned = nn.ModuleDict(
            {
                group: nn.ParameterDict(
                    {parameter_key(name): nn.Parameter(value) for name, value in values.items()}
                )
                for group, values in learned.items()
            }
        )
        self.inner_state: State | None = None  # carried across meta-iterations
        self.divergence_check_every = divergence_check_every
        # The first non-finite meta-iteration (-1: none) and its train/loss, train/loss_adapted.
        self.first_divergence: tuple[torch.Tensor, torch.Tensor] | None = None
        # train/loss, train/loss_adapted summed since the last logged step, and their count.
        self.loss_sums: torch.Tensor | None = None
        self.loss_count = 0
        self.score_plan = self.plan_scores(score_before, score_after)
        self.scores = nn.ModuleDict({name: MeanWithConfidence() for name in self.score_plan})

    def plan_scores(self, before: str | None, after: str) -> ScorePlan:
        """With batch norm the two ways of scoring queries differ; the one not configured is
        reported too, under a suffixed name (adapting is the expensive part and is shared)."""
        steps, transductive = self.algorithm.eval_inner_steps, self.algorithm.transductive
        plan = {after: (steps, transductive)}
        if before:
            plan[before] = (0, transductive)
        if self.inner.couples_batch:
            other = "non_transductive" if transductive else "transductive"
            plan[f"{after}_{other}"] = (steps, not transductive)
        return plan

    def meta_parameter_tensors(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every meta-parameter by group and parameter name: "phi" and the algorithm's own."""
        groups = {"phi": dict(self.model.named_parameters())}
        for group, values in self.learned.items():
            groups[group] = {key.replace("/", "."): value for key, value in values.items()}
        return groups

    def meta_parameters(self) -> MetaParams:
        return {
            group: {name: p.detach() for name, p in values.items()}
            for group, values in self.meta_parameter_tensors().items()
        }

    # --- training -------------------------------------------------------------------------

    def training_step(self, task: Task, batch_idx: int) -> None:
        meta_iteration = self.global_step  # the optimizer step below advances it
        step = self.algorithm.meta_step(self.inner, self.meta_parameters(), self.inner_state, task)
        gradient, state, losses = self.mean_over_ranks(
            (
                step.gradient,
                step.state,
                # train/loss at φ (each task's first mini-batch), train/loss_adapted (its last)
                torch.stack([step.losses[0].mean(), step.losses[-1].mean()]).detach(),
            )
        )
        if state is not None:
            self.inner_state = state
        self.record_divergence(meta_iteration, losses, gradient)
        if (meta_iteration + 1) % self.check_interval() == 0:
            self.raise_if_diverged()

        optimizer = self.optimizers()
        self.descend(gradient, optimizer)
        self.lr_schedulers().step()

        self.log_losses(losses, optimizer.param_groups[0]["lr"])

    def log_losses(self, losses: torch.Tensor, meta_lr: float) -> None:
        """Sums the step's losses on the device; at the steps Lightning writes its logs (every
        `trainer.log_every_n_steps`), logs their mean over the meta-iterations since the last
        write: every meta-iteration counts, with no host sync in between."""
        self.loss_sums = losses if self.loss_sums is None else self.loss_sums + losses
        self.loss_count += 1
        # Lightning's own decision to write logs at this step (the interval, or a stop); no public
        # API exposes it, and the pinned pytorch-lightning keeps it stable.
        if not self.trainer._logger_connector.should_update_logs:
            return
        mean = self.loss_sums / self.loss_count
        self.loss_sums, self.loss_count = None, 0
        self.log_dict(
            {
                "train/loss": mean[0],
                "train/loss_adapted": mean[1],
                "train/meta_lr": meta_lr,
            },
            prog_bar=True,
        )

    def descend(self, gradient: MetaParams, optimizer: Any) -> None:
        """One step of the outer optimizer with `gradient` as every meta-parameter's gradient."""
        optimizer.zero_grad()
        for group, values in self.meta_parameter_tensors().items():
            for name, p in values.items():
                p.grad = gradient[group][name]
        optimizer.step()

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

    def check_interval(self) -> int:
        if self.divergence_check_every is not None:
            return self.divergence_check_every
        return 1 if self.device.type == "cpu" else self.trainer.log_every_n_steps

    def record_divergence(self, meta_iteration: int, losses: torch.Tensor, gradient: Any) -> None:
        """Keeps, on the device, the first meta-iteration whose losses or meta-gradient are not
        finite, with its losses: device operations only, no host sync."""
        finite = all_finite([losses, *tree_flatten(gradient)[0]])
        if self.first_divergence is None:
            none = torch.full((), -1, dtype=torch.long, device=self.device)
            self.first_divergence = (none, torch.zeros_like(losses))
        first, losses_then = self.first_divergence
        newly = first.lt(0).logical_and_(finite.logical_not())
        self.first_divergence = (
            torch.where(newly, meta_iteration, first),
            torch.where(newly, losses, losses_then),
        )

    def raise_if_diverged(self) -> None:
        if self.first_divergence is None:
            return
        first, losses = self.first_divergence
        meta_iteration = int(first)  # the host sync
        if meta_iteration < 0:
            return
        loss_first, loss_last = losses.tolist()
        values = {"train/loss": loss_first, "train/loss_adapted": loss_last}
        bad = {name: value for name, value in values.items() if not math.isfinite(value)}
        detail = (
            ", ".join(f"{name}={value}" for name, value in bad.items())
            or "meta-gradient not finite"
        )
        raise DivergenceError(f"training diverged at meta-iteration {meta_iteration}: {detail}")

    def on_validation_start(self) -> None:
        self.raise_if_diverged()  # do not score a φ that is not finite

    def on_train_end(self) -> None:
        self.raise_if_diverged()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.algorithm.make_outer_optimizer(list(self.parameters()))
        total = max(self.trainer.max_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: self.algorithm.meta_lr_at(min(step / total, 1.0)) / self.algorithm.meta_lr,
        )
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_diverged()  # a checkpoint never holds a φ that is not finite
        checkpoint["inner_state"] = self.inner_state
        checkpoint["run_config"] = self.run_config
        # A checkpoint between two logged steps (a signal's) keeps the interval's partial sums:
        # the resumed run logs the uninterrupted run's train/loss.
        checkpoint["loss_sums"] = (self.loss_sums, self.loss_count)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.inner_state = checkpoint.get("inner_state")
        self.loss_sums, self.loss_count = checkpoint.get("loss_sums", (None, 0))

    def on_train_start(self) -> None:
        if self.loss_sums is not None:  # restored before the module moved to its device
            self.loss_sums = self.loss_sums.to(self.device)

    # --- evaluation -----------------------------------------------------------------------

    def adapted_params(self, task: Task, steps: list[int]) -> dict[int, Params]:
        """Per-task parameters after each number of inner steps in `steps` (sorted)."""
        return self.algorithm.adapt(
            self.inner, self.meta_parameters(), self.inner_state, task, steps
        )

    def predict(self, params: Params, task: Task, transductive: bool | None = None) -> torch.Tensor:
        """Outputs for the task's queries (transductive as configured unless told)."""
        if transductive is None:
            transductive = self.algorithm.transductive
        return self.inner.predict(
            params, task["support_inputs"], task["query_inputs"], transductive
        )

    def evaluation_step(self, task: Task) -> None:
        scores = self.algorithm.evaluate(
            self.inner, self.meta_parameters(), self.inner_state, task, self.score_plan
        )
        for name, values in scores.items():
            self.scores[name].update(values)

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
