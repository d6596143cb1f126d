"""The Python API: a checkpoint plus a few examples → an adapted model that predicts."""

from __future__ import annotations

from pathlib import Path

import torch

from reptile.adaptation import adapt, load_learner
from reptile.data.sine import SineWaves
from reptile.data.tasks import task_generator


def test_adapted_model_fits_a_new_sine_better_than_phi(tiny_run: Path) -> None:
    learner = load_learner(tiny_run / "checkpoints" / "last.ckpt")
    task = SineWaves(shots=10).sample_eval_task("test", task_generator(123, "test", 0))
    model = adapt(learner, task["support_inputs"], task["support_targets"], steps=32)
    before = adapt(learner, task["support_inputs"], task["support_targets"], steps=0)
    error_after = (model.predict(task["query_inputs"]) - task["query_targets"]).square().mean()
    error_before = (before.predict(task["query_inputs"]) - task["query_targets"]).square().mean()
    assert model.predict(task["query_inputs"]).shape == task["query_targets"].shape
    assert error_after < error_before


def test_loaded_learner_holds_the_checkpointed_phi(tiny_run: Path) -> None:
    checkpoint = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=False)
    learner = load_learner(tiny_run / "checkpoints" / "last.ckpt")
    for name, value in learner.model.state_dict().items():
        torch.testing.assert_close(value, checkpoint["state_dict"][f"model.{name}"])
