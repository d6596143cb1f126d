"""A model's forward pass for a batch of tasks at once, each with its own parameters, without vmap.

The tasks are folded into the layers themselves: a linear layer becomes one batched matrix product
over the tasks, a convolution one grouped convolution with a group per task (tasks side by side
in the channel dimension), batch norm a batch norm over tasks × channels (each task's channels
keep their own batch statistics). Because no value mixes two tasks, autograd of the summed task
losses gives every task its own gradient, in one backward pass of large kernels instead of many
small ones. The model is read with `torch.fx`, so any network built from the layers below works,
whatever its Python structure; `folded_forward` returns None for anything else and the inner loop
then keeps `vmap`.

Values flow in one of two layouts: "tasks" [tasks, batch, ...] (linear layers) and "channels"
[batch, tasks × channels, height, width] (convolution, pooling, batch norm), channels-last in
memory, which the CPU's convolution kernels run fastest on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from reptile.algorithms.params import Params

FoldedForward = Callable[[Params, torch.Tensor], torch.Tensor]

# Layers that act on each sample's channels alone, the same in either layout (H, W last).
PER_SAMPLE = (
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.Identity,
    nn.ZeroPad2d,
)
FLATTEN_CALLS = {("call_method", "flatten"), ("call_function", torch.flatten)}


class Value:
    """A tensor of activations with the layout it is in and, for images, the task count."""

    def __init__(self, tensor: torch.Tensor, layout: str, tasks: int) -> None:
        self.tensor, self.layout, self.tasks = tensor, layout, tasks

    def as_channels(self) -> torch.Tensor:
        if self.layout == "tasks":  # [tasks, batch, C, H, W] → [batch, tasks·C, H, W]
            t = self.tensor
            folded = t.transpose(0, 1).reshape(t.shape[1], -1, *t.shape[3:])
            self.tensor = folded.contiguous(memory_format=torch.channels_last)
            self.layout = "channels"
        return self.tensor

    def as_tasks(self) -> torch.Tensor:
        if self.layout == "channels":  # [batch, tasks·C, H, W] → [tasks, batch, C, H, W]
            t = self.tensor
            self.tensor = t.reshape(t.shape[0], self.tasks, -1, *t.shape[2:]).transpose(0, 1)
            self.layout = "tasks"
        return self.tensor


def linear(value: Value, params: Params, layer: nn.Linear, prefix: str) -> Value:
    x = value.as_tasks()
    weight = params[prefix + "weight"].transpose(1, 2)
    bias = params.get(prefix + "bias")
    out = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight)
    return Value(out, "tasks", value.tasks)


def conv2d(value: Value, params: Params, layer: nn.Conv2d, prefix: str) -> Value:
    bias = params.get(prefix + "bias")
    out = F.conv2d(
        value.as_channels(),
        params[prefix + "weight"].flatten(0, 1),
        None if bias is None else bias.flatten(),
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups * value.tasks,
    )
    return Value(out, "channels", value.tasks)


def batch_norm(value: Value, params: Params, layer: nn.BatchNorm2d, prefix: str) -> Value:
    weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
    out = F.batch_norm(
        value.as_channels(),
        None,
        None,
        None if weight is None else weight.flatten(),
        None if bias is None else bias.flatten(),
        True,
        0.0,
        layer.eps,
    )
    return Value(out, "channels", value.tasks)


def max_pool(value: Value, params: Params, layer: nn.MaxPool2d, prefix: str) -> Value:
    out = F.max_pool2d(
        value.as_channels(),
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.ceil_mode,
    )
    return Value(out, "channels", value.tasks)


def per_sample(value: Value, params: Params, layer: nn.Module, prefix: str) -> Value:
    return Value(layer(value.tensor), value.layout, value.tasks)


def flatten(value: Value) -> Value:
    """Per-sample flatten (`x.flatten(1)` in the model): channels, height, width in that order."""
    if value.layout == "channels":
        t = value.tensor
        out = t.reshape(t.shape[0], value.tasks, -1).transpose(0, 1)
    else:
        out = value.tensor.flatten(2)
    return Value(out, "tasks", value.tasks)


LAYERS: dict[type, Callable[[Value, Params, nn.Module, str], Value]] = {
    nn.Linear: linear,
    nn.Conv2d: conv2d,
    nn.BatchNorm2d: batch_norm,
    nn.MaxPool2d: max_pool,
    **{kind: per_sample for kind in PER_SAMPLE},
}


def supported(module: nn.Module) -> bool:
    if type(module) not in LAYERS:
        return False
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    if isinstance(module, nn.BatchNorm2d):
        # With running statistics the module would read and update buffers: not task-separable.
        return not module.track_running_stats
    return True


def is_flatten(node: fx.Node) -> bool:
    """`x.flatten(1)`, `torch.flatten(x, 1)` or `nn.Flatten()`: flattening each sample."""
    if (node.op, node.target) not in FLATTEN_CALLS:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def folded_forward(model: nn.Module) -> FoldedForward | None:
    """`forward(params, inputs [tasks, batch, ...]) → outputs [tasks, batch, ...]`, or None.

    None when the model holds anything but the layers above, per-sample flattens, and
    `nn.Sequential`/container modules: those need `vmap`.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # any model that fx cannot trace simply keeps vmap
        return None
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    for node in nodes:
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Flatten):
                if (module.start_dim, module.end_dim) != (1, -1):
                    return None
            elif not supported(module):
                return None
        elif node.op not in ("placeholder", "output") and not is_flatten(node):
            return None
    if sum(node.op == "placeholder" for node in nodes) != 1:
        return None

    def forward(params: Params, inputs: torch.Tensor) -> torch.Tensor:
        values: dict[fx.Node, Value] = {}
        for node in nodes:
            if node.op == "placeholder":
                values[node] = Value(inputs, "tasks", len(inputs))
            elif node.op == "output":
                return values[node.args[0]].as_tasks()
            elif node.op == "call_module" and not isinstance(modules[node.target], nn.Flatten):
                module = modules[node.target]
                values[node] = LAYERS[type(module)](
                    values[node.args[0]], params, module, node.target + "."
                )
            else:
                values[node] = flatten(values[node.args[0]])
        raise AssertionError("an fx graph always ends in an output node")

    return forward
