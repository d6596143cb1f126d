"""Test-time adaptation from Python: a checkpoint plus a few labelled examples → a model.

learner = load_learner("outputs/runs/<run>/checkpoints/last.ckpt")
model = adapt(learner, images, labels)  # images [n, 1, 28, 28], labels [n] in 0..ways-1
model.predict(new_images)  # class indices (classification) or outputs (regression)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate

from reptile.algorithms.params import Params
from reptile.data.tasks import inner_batch_index
from reptile.lightning.module import MetaLearner


def load_learner(path: str | Path, map_location: str | torch.device = "cpu") -> MetaLearner:
    """The meta-learned φ of a checkpoint written by `train.py`, with its model and algorithm."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    config = checkpoint.get("run_config")
    if config is None:
        raise ValueError(f"{path}: no run config inside; was it written by train.py?")
    model = instantiate(config["model"], _convert_="all")
    algorithm = instantiate(config["algorithm"], _convert_="all")
    learner = MetaLearner(model, algorithm, **checkpoint["hyper_parameters"])
    learner.load_state_dict(checkpoint["state_dict"])
    learner.on_load_checkpoint(checkpoint)
    return learner.to(map_location).eval()


@dataclass
class AdaptedModel:
    """One task's adapted parameters; predicts the way the learner was evaluated."""

    learner: MetaLearner
    params: Params  # batched over one task
    support_inputs: torch.Tensor

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Raw outputs (logits for classification) for `inputs` [n, ...]."""
        task = {"support_inputs": self.support_inputs[None], "query_inputs": inputs[None]}
        with torch.no_grad():
            return self.learner.predict(self.params, task)[0]

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.learner.inner.objective.prediction(self(inputs))


def adapt(
    learner: MetaLearner,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int | None = None,
    seed: int = 0,
) -> AdaptedModel:
    """Adapt φ to the examples (`algorithm.eval_inner_steps` steps unless `steps` says), from the
    inner-optimizer state evaluation uses (`algorithm.eval_inner_state`)."""
    steps = learner.algorithm.eval_inner_steps if steps is None else steps
    schedule = learner.algorithm.eval_schedule(steps)
    index = inner_batch_index(len(targets), schedule, torch.Generator().manual_seed(seed))
    device = learner.device
    task = {
        "support_inputs": inputs[None].to(device),
        "support_targets": targets[None].to(device),
        "batch_index": index[None].to(device),
    }
    with torch.no_grad():
        params = learner.adapted_params(task, [steps])[steps]
    return AdaptedModel(learner, params, task["support_inputs"][0])
