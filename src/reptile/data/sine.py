"""Sine-wave regression (the paper's toy problem): f(x) = a sin(x + b)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from reptile.config import require_int, require_range
from reptile.data.distribution import TaskDistribution
from reptile.data.tasks import Task


class SineWaves(TaskDistribution):
    """a ~ U[amplitude], b ~ U[0, 2π], x ~ U[x_range]; evaluation is scored on a dense grid.

    Training tasks carry `shots` random points (plus a tail of `tail_size`); evaluation tasks adapt
    on `shots` random points and are scored by the mean squared error over `grid_points` evenly
    spaced points, which approximates the loss integrated over the x range.
    """

    loss = "mse"
    score_before = "mse_before"
    score_after = "mse_after"
    input_shape = (1,)
    num_outputs = 1

    def __init__(
        self,
        shots: int = 10,
        amplitude: tuple[float, float] = (0.1, 5.0),
        x_range: tuple[float, float] = (-5.0, 5.0),
        grid_points: int = 1000,
        **loader_options: Any,
    ) -> None:
        super().__init__(**loader_options)
        require_int("shots", shots, 1)
        require_int("grid_points", grid_points, 2)
        self.shots = shots
        self.amplitude = require_range("amplitude", amplitude)
        self.x_range = require_range("x_range", x_range)
        self.grid = torch.linspace(*self.x_range, grid_points).unsqueeze(-1)

    def sample_wave(self, generator: torch.Generator) -> tuple[float, float]:
        low, high = self.amplitude
        amplitude = low + (high - low) * torch.rand((), generator=generator).item()
        phase = 2 * math.pi * torch.rand((), generator=generator).item()
        return amplitude, phase

    def sample_x(self, count: int, generator: torch.Generator) -> torch.Tensor:
        low, high = self.x_range
        return low + (high - low) * torch.rand(count, 1, generator=generator)

    def sample_train_task(self, generator: torch.Generator, tail_size: int) -> Task:
        return self.task(generator, query_x=None, tail_size=tail_size)

    def sample_eval_task(self, split: str, generator: torch.Generator) -> Task:
        return self.task(generator, query_x=self.grid, tail_size=0)

    def task(
        self, generator: torch.Generator, query_x: torch.Tensor | None, tail_size: int
    ) -> Task:
        """`shots` support points; queries on `query_x` or, if None, `tail_size` random points."""
        amplitude, phase = self.sample_wave(generator)
        support_x = self.sample_x(self.shots, generator)
        if query_x is None:
            query_x = self.sample_x(tail_size, generator)
        return {
            "support_inputs": support_x,
            "support_targets": amplitude * torch.sin(support_x + phase),
            "query_inputs": query_x,
            "query_targets": amplitude * torch.sin(query_x + phase),
        }

    def plot_adaptation(self, predictions: dict[int, torch.Tensor], task: Task, path: Path) -> bool:
        """The paper's sine figure: true curve, support points, fits after 0, 1 and k steps."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        task = {key: value.cpu() for key, value in task.items()}
        num_tasks = len(task["query_inputs"])
        figure, axes = plt.subplots(1, num_tasks, figsize=(4 * num_tasks, 3.2), squeeze=False)
        for i, axis in enumerate(axes[0]):
            grid = task["query_inputs"][i, :, 0]
            axis.plot(grid, task["query_targets"][i, :, 0], "k", label="true function")
            axis.scatter(
                task["support_inputs"][i, :, 0],
                task["support_targets"][i, :, 0],
                c="k",
                marker="^",
                zorder=3,
                label="support points",
            )
            for steps, prediction in predictions.items():
                label = (
                    "before adaptation" if steps == 0 else f"after {steps} step{'s' * (steps > 1)}"
                )
                axis.plot(grid, prediction[i, :, 0].cpu(), label=label)
            axis.set_xlabel("x")
        axes[0][0].legend(fontsize="small")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return True
