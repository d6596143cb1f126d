"""The LightningModule through the real Trainer, against cases worked by hand and per-task loops."""

from __future__ import annotations

import copy
import csv
import dataclasses
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import quiet_trainer, sine_tasks, take_steps, weights
from torch import nn
from torch.utils.data import DataLoader

from reptile.algorithms import Reptile
from reptile.data.sine import SineWaves
from reptile.data.tasks import InnerSchedule
from reptile.lightning.datamodule import TaskDataModule
from reptile.lightning.module import MetaLearner
from reptile.models.mlp import MLP


def hand_worked_tasks() -> dict[str, torch.Tensor]:
    """Two tasks for y = w·x: slopes 2 and −1, points x = 1, 2, both points in every batch."""
    x = torch.tensor([[1.0], [2.0]])
    return {
        "support_inputs": torch.stack([x, x]),
        "support_targets": torch.stack([2 * x, -1 * x]),
        "query_inputs": torch.zeros(2, 0, 1),
        "query_targets": torch.zeros(2, 0, 1),
        "batch_index": torch.tensor([[[0, 1], [0, 1]], [[0, 1], [0, 1]]]),
    }


def train_from_zero(
    algorithm: Reptile, tasks: dict[str, torch.Tensor], meta_iterations: int = 1
) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    module = MetaLearner(model, algorithm, loss="mse", score_after="mse_after")
    trainer = quiet_trainer(max_steps=meta_iterations)
    loader = DataLoader([tasks] * meta_iterations, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return model


def hand_worked_reptile(epsilon: float) -> Reptile:
    """Inner SGD at lr 0.1, k = 2 batches of both points, constant ε."""
    return Reptile(
        inner_optimizer="sgd",
        inner_lr=0.1,
        inner_steps=2,
        inner_batch_size=2,
        meta_lr=epsilon,
        meta_lr_final=epsilon,
    )


def test_reptile_update_equals_hand_computation() -> None:
    """Inner SGD, lr 0.1, k = 2, from w = 0, loss mean((w·x − y)²):
    slope 2:  grad −10 → w = 1;    grad −5  → w = 1.5
    slope −1: grad  5  → w = −0.5; grad 2.5 → w = −0.75
    mean W = 0.375; φ ← 0 + ε·(0.375 − 0) = 0.1875 with ε = 0.5."""
    model = train_from_zero(hand_worked_reptile(epsilon=0.5), hand_worked_tasks())
    assert model.weight.item() == pytest.approx(0.1875, abs=1e-7)


def test_serial_reptile_moves_toward_the_single_task_solution() -> None:
    """n = 1, ε = 1: φ becomes W itself, 1.5 for the slope-2 task above."""
    tasks = {key: value[:1] for key, value in hand_worked_tasks().items()}
    model = train_from_zero(hand_worked_reptile(epsilon=1.0), tasks)
    assert model.weight.item() == pytest.approx(1.5, abs=1e-7)


def test_outer_adam_is_fed_phi_minus_mean_w_as_its_gradient() -> None:
    """Three meta-iterations on the tasks above with outer Adam (lr 0.1, constant): φ follows
    Adam written out, fed g = φ − mean W_i, each W_i from the inner SGD steps written out (the
    gradient of mean((w·x − s·x)²) over x = 1, 2 is 5·(w − s))."""
    algorithm = dataclasses.replace(hand_worked_reptile(epsilon=0.1), outer_optimizer="adam")
    model = train_from_zero(algorithm, hand_worked_tasks(), meta_iterations=3)
    (beta1, beta2), phi, m, v = algorithm.outer_betas, 0.0, 0.0, 0.0
    for t in range(1, 4):
        adapted = []
        for slope in (2.0, -1.0):
            w = phi
            for _ in range(2):
                w -= 0.1 * 5 * (w - slope)
            adapted.append(w)
        g = phi - sum(adapted) / 2
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g**2
        phi -= 0.1 * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)) ** 0.5 + 1e-8)
    assert model.weight.item() == pytest.approx(phi, abs=1e-6)
    assert phi == pytest.approx(0.3, abs=0.01)  # three Adam steps of about lr each


def test_meta_lr_is_annealed_linearly() -> None:
    algorithm = Reptile(meta_lr=1.0, meta_lr_final=0.2)
    assert [algorithm.meta_lr_at(f) for f in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.6, 0.2])


def sine_meta_batches(meta_batches: int, tasks: int, steps: int) -> list[dict[str, torch.Tensor]]:
    return [sine_tasks(tasks, steps, 5, first=step * tasks) for step in range(meta_batches)]


def reference_training(
    model: nn.Module, meta_batches: list[dict], inner_state: str, steps: int, epsilon: float
) -> dict:
    """The reference implementation's loop: one model whose weights are restored around each task,
    one torch.optim.Adam; "sequential" keeps that optimizer's state from task to task, "carry"
    starts every task of a meta-batch from the same state and keeps the tasks' mean."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.999))
    for tasks in meta_batches:
        phi, start = weights(model), copy.deepcopy(optimizer.state_dict())
        adapted, states = [], []
        for i in range(len(tasks["support_targets"])):
            if inner_state == "carry":
                optimizer.load_state_dict(copy.deepcopy(start))  # loading aliases tensors
            take_steps(model, optimizer, tasks, i, steps)
            adapted.append(weights(model))
            states.append(copy.deepcopy(optimizer.state_dict()))
            model.load_state_dict(phi)
        if inner_state == "carry":
            for key, slot in states[0]["state"].items():
                for name in ("exp_avg", "exp_avg_sq"):
                    slot[name] = torch.stack([s["state"][key][name] for s in states]).mean(0)
            optimizer.load_state_dict(states[0])
        mean = {name: torch.stack([w[name] for w in adapted]).mean(0) for name in phi}
        model.load_state_dict({name: p + epsilon * (mean[name] - p) for name, p in phi.items()})
    return optimizer.state_dict()


@pytest.mark.parametrize("inner_state", ["carry", "sequential"])
def test_carried_inner_state_follows_a_per_task_loop(inner_state: str) -> None:
    """Three meta-iterations through the real Trainer against `reference_training`; then the
    evaluation inner loop from the trained state (and from a fresh one) against torch.optim."""
    steps, epsilon = 3, 0.5
    torch.manual_seed(0)
    model, meta_batches = MLP(), sine_meta_batches(3, tasks=4, steps=steps)
    reference = copy.deepcopy(model)
    algorithm = Reptile(
        inner_lr=0.01,
        inner_steps=steps,
        inner_batch_size=5,
        inner_state=inner_state,
        meta_lr=epsilon,
        meta_lr_final=epsilon,
        eval_batch_size=5,
    )
    learner = MetaLearner(model, algorithm, loss="mse")
    trainer = quiet_trainer(
        max_steps=len(meta_batches),
    )
    trainer.fit(learner, train_dataloaders=DataLoader(meta_batches, batch_size=None))
    trained_state = reference_training(reference, meta_batches, inner_state, steps, epsilon)

    tolerance = {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(weights(model), weights(reference), **tolerance)
    names = [name for name, _ in reference.named_parameters()]
    for key, name in enumerate(names):
        for slot in ("exp_avg", "exp_avg_sq"):
            expected = trained_state["state"][key][slot]
            torch.testing.assert_close(learner.inner_state[slot][name], expected, **tolerance)

    task = meta_batches[0]
    for start in ("trained", "fresh"):
        learner.algorithm = dataclasses.replace(algorithm, eval_inner_state=start)
        adapted = learner.adapted_params(task, [steps])[steps]
        for i in range(len(task["support_targets"])):
            clone = copy.deepcopy(reference)
            optimizer = torch.optim.Adam(clone.parameters(), lr=0.01, betas=(0.0, 0.999))
            if start == "trained":
                optimizer.load_state_dict(copy.deepcopy(trained_state))
            take_steps(clone, optimizer, task, i, steps)
            for name, value in clone.named_parameters():
                torch.testing.assert_close(adapted[name][i], value.detach(), **tolerance)


def logged_losses(tmp_path, meta_batches: list[dict], log_every: int) -> list[list[float]]:
    """train/loss and train/loss_adapted as a CSV logger wrote them, logging every `log_every`."""
    torch.manual_seed(0)
    learner = MetaLearner(MLP(), Reptile(inner_lr=0.01, inner_steps=3, inner_batch_size=5), "mse")
    logger = pl.loggers.CSVLogger(tmp_path, name=f"every_{log_every}")
    trainer = quiet_trainer(max_steps=len(meta_batches), logger=logger, log_every_n_steps=log_every)
    trainer.fit(learner, train_dataloaders=DataLoader(meta_batches, batch_size=None))
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    return [[float(row["train/loss"]), float(row["train/loss_adapted"])] for row in rows]


def test_logged_losses_are_the_mean_over_the_log_interval(tmp_path) -> None:
    """Logged every 4 meta-iterations, each value is the mean of the 4 that one logged at every
    meta-iteration: none is left out, none is a single step's."""
    meta_batches = sine_meta_batches(8, tasks=2, steps=3)
    every_step = torch.tensor(logged_losses(tmp_path, meta_batches, 1))
    every_4 = torch.tensor(logged_losses(tmp_path, meta_batches, 4))
    assert every_step.shape == (8, 2) and every_4.shape == (2, 2)
    torch.testing.assert_close(every_4, every_step.view(2, 4, 2).mean(1))
    assert not torch.allclose(every_4, every_step[3::4])  # not the interval's last value


def fit(learner: MetaLearner, root, max_steps: int, ckpt_path=None) -> None:
    """Trains on sine tasks addressed by step, with the project's trainer settings for resuming."""
    trainer = quiet_trainer(
        max_steps=max_steps,
        max_epochs=-1,
        reload_dataloaders_every_n_epochs=1,
        default_root_dir=root,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True)],
    )
    tasks = SineWaves(meta_batch_size=2, train_schedule=InnerSchedule(3, 5), num_val_tasks=0)
    trainer.fit(learner, datamodule=TaskDataModule(tasks), ckpt_path=ckpt_path)


def test_meta_sgd_learns_its_rates_checkpoints_them_and_resumes_exactly(tmp_path) -> None:
    """The learned rates are meta-parameters like φ: the outer optimizer moves them, they are in
    the checkpoint with its optimizer state, and two steps + resume + two steps end where four
    uninterrupted steps end, for φ and rates alike."""
    from reptile.algorithms import MetaSGD

    algorithm = MetaSGD(
        inner_steps=3,
        inner_batch_size=5,
        inner_lr=0.02,
        meta_lr=0.001,
        meta_lr_final=0.001,  # ε does not depend on the length of the run
        outer_optimizer="adam",
    )

    def learner() -> MetaLearner:
        torch.manual_seed(0)
        return MetaLearner(MLP(hidden=(8,)), algorithm, loss="mse")

    whole = learner()
    start = {key: value.clone() for key, value in whole.state_dict().items()}
    fit(whole, tmp_path / "whole", max_steps=4)
    rates = [key for key in start if key.startswith("learned.inner_lr.")]
    assert len(rates) == 4 and all(not torch.equal(whole.state_dict()[k], start[k]) for k in rates)

    fit(learner(), tmp_path / "part", max_steps=2)
    resumed = learner()
    fit(resumed, tmp_path / "part", max_steps=4, ckpt_path=tmp_path / "part" / "last.ckpt")
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    # Evaluation and `reptile.adaptation` step at the learned rates: one step is φ − α ⊙ ∇L.
    from reptile.adaptation import adapt, load_learner

    learner_config = {"_target_": "reptile.algorithms.MetaSGD", **dataclasses.asdict(algorithm)}
    resumed.run_config = {"model": {"_target_": "reptile.models.mlp.MLP", "hidden": [8]}}
    resumed.run_config["algorithm"] = learner_config
    resumed.trainer.save_checkpoint(tmp_path / "final.ckpt")
    loaded = load_learner(tmp_path / "final.ckpt")
    x, y = torch.linspace(-3, 3, 5).unsqueeze(1), torch.linspace(-1, 1, 5).unsqueeze(1)
    adapted = adapt(loaded, x, y, steps=1)
    reference = copy.deepcopy(whole.model)
    torch.nn.functional.mse_loss(reference(x), y).backward()  # eval batch 5: all five points
    for name, p in reference.named_parameters():
        rate = whole.state_dict()[f"learned.inner_lr.{name.replace('.', '/')}"]
        torch.testing.assert_close(adapted.params[name][0], (p - rate * p.grad).detach())


@pytest.mark.parametrize(
    ("check_every", "checkpoint_every", "stopped_at"),
    [
        (None, 10, 0),  # CPU default: read at every meta-iteration, stops at the bad one
        (4, 10, 3),  # read every 4, as on an accelerator: stops in the 4th meta-iteration
        (4, 2, 2),  # … or earlier, when a checkpoint would be written first
    ],
)
def test_divergence_read_late_names_the_first_bad_meta_iteration(
    tmp_path, check_every: int | None, checkpoint_every: int, stopped_at: int
) -> None:
    """An inner lr of 1e30 overflows in meta-iteration 0; however late the device-side record is
    read, the error names meta-iteration 0 with its losses, and no checkpoint holds the
    non-finite φ."""
    from reptile.cli import DivergenceError

    algorithm = Reptile(inner_lr=1e30, inner_steps=3, inner_batch_size=5)
    learner = MetaLearner(
        MLP(hidden=(8,)), algorithm, loss="mse", divergence_check_every=check_every
    )
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=checkpoint_every, save_top_k=-1
    )
    trainer = quiet_trainer(max_steps=8, callbacks=[checkpoints])
    tasks = SineWaves(meta_batch_size=2, train_schedule=InnerSchedule(3, 5), num_val_tasks=0)
    with pytest.raises(DivergenceError) as error:
        trainer.fit(learner, datamodule=TaskDataModule(tasks))
    assert str(error.value) == "training diverged at meta-iteration 0: train/loss_adapted=nan"
    assert trainer.global_step == stopped_at
    assert not list(tmp_path.glob("*.ckpt"))
