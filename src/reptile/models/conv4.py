"""The paper's few-shot image classifiers: four 3×3 convolution blocks and a linear layer."""

from __future__ import annotations

import torch
from torch import nn

from reptile.config import require_bool, require_int


def same_padding(size: int, stride: int, kernel: int = 3) -> tuple[int, int, int, int]:
    """TensorFlow's "same" padding (left, right, top, bottom): ceil(size / stride) outputs, and an
    odd total puts the extra row and column at the bottom and right. PyTorch's `padding=1` pads
    both sides instead, which shifts every stride-2 window by one pixel against the reference's."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2) * 2


class Conv4(nn.Module):
    """`layers` × [3×3 conv → (2×2 max-pool) → batch norm → ReLU] → flatten → linear.

    The paper's two networks, as its reference implementation builds them:
    - Omniglot (the defaults): 64 filters, stride 2, no pooling; 1×28×28 → 64×2×2 = 256 features.
      The convolutions pad as TensorFlow's "same" does (`same_padding`).
    - Mini-ImageNet: `hidden=32, stride=1, max_pool=true`; 3×84×84 → 32×6×6 = 1152 features.
      The reference pools with TensorFlow's "same" padding, which keeps the odd row and column
      (84 → 42 → 21 → 11 → 6, not 5 as with PyTorch's default); like it, this pools before the
      batch norm.
    Batch norm always uses the statistics of the current batch (no running averages), at training
    and evaluation alike, as the reference does. The convolutions have no bias: the batch norm right
    after them subtracts it again, so its gradient would be rounding noise. Weights start
    Glorot-uniform and the linear bias at zero (the reference's TensorFlow defaults).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        hidden: int = 64,
        layers: int = 4,
        stride: int = 2,
        max_pool: bool = False,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        for key, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("hidden", hidden),
            ("layers", layers),
            ("stride", stride),
            ("image_size", image_size),
        ):
            require_int(key, value, 1)
        require_bool("max_pool", max_pool)
        blocks: list[nn.Module] = []
        size = image_size
        for layer in range(layers):
            block = [
                nn.ZeroPad2d(same_padding(size, stride)),
                nn.Conv2d(in_channels if layer == 0 else hidden, hidden, 3, stride, bias=False),
            ]
            size = (size - 1) // stride + 1
            if max_pool:
                block.append(nn.MaxPool2d(2, ceil_mode=True))  # = TensorFlow's "same" pooling
                size = (size + 1) // 2
            # eps as TensorFlow's default; no running statistics: always the batch's own.
            block += [nn.BatchNorm2d(hidden, eps=1e-3, track_running_stats=False), nn.ReLU()]
            blocks.append(nn.Sequential(*block))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(hidden * size * size, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [batch, in_channels, image_size, image_size] → logits [batch, num_classes]."""
        return self.classifier(self.features(images).flatten(1))
