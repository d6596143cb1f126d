"""Per-task scores accumulated across batches and ranks into a mean and its 95 % interval."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class MeanWithConfidence(Metric):
    """Mean over tasks and the half-width of its normal 95 % confidence interval, 1.96·s/√n."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        # float64 sums: 10,000 tasks of accuracies or squared errors lose nothing to rounding.
        for name in ("total", "total_squares", "count"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double()
        self.total += values.sum()
        self.total_squares += values.square().sum()
        self.count += values.numel()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        variance = (self.total_squares - self.count * mean.square()) / (self.count - 1).clamp(min=1)
        return mean, 1.96 * variance.clamp(min=0).sqrt() / math.sqrt(max(self.count.item(), 1))
