"""The paper's sine-wave regressor: a small fully connected network."""

from __future__ import annotations

from torch import nn

from reptile.config import require_choice, require_int

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """in_features → hidden[0] → … → hidden[-1] → out_features, `activation` between layers."""

    def __init__(
        self,
        in_features: int = 1,
        hidden: tuple[int, ...] = (64, 64),
        out_features: int = 1,
        activation: str = "relu",
    ) -> None:
        require_int("in_features", in_features, 1)
        require_int("out_features", out_features, 1)
        for width in hidden:
            require_int("hidden", width, 1)
        require_choice("activation", activation, tuple(ACTIVATIONS))
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), ACTIVATIONS[activation]()]
        super().__init__(*layers, nn.Linear(widths[-1], out_features))
