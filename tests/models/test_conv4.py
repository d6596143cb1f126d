"""The paper's Conv4 networks: shapes, batch statistics, and per-task gradients under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from reptile.config import ConfigValueError
from reptile.models.conv4 import Conv4, same_padding

OMNIGLOT = {"in_channels": 1, "num_classes": 5, "image_size": 28}
MINIIMAGENET = {
    "in_channels": 3,
    "num_classes": 5,
    "image_size": 84,
    "hidden": 32,
    "stride": 1,
    "max_pool": True,
}


@pytest.mark.parametrize(
    ("options", "features"),
    [
        (OMNIGLOT, 64 * 2 * 2),
        (MINIIMAGENET, 32 * 6 * 6),  # TensorFlow "same" pooling: 84 → 42 → 21 → 11 → 6
        ({**OMNIGLOT, "num_classes": 20, "hidden": 16, "layers": 3}, 16 * 4 * 4),
    ],
)
def test_output_shapes(options, features):
    model = Conv4(**options)
    assert model.classifier.in_features == features
    size, channels = options["image_size"], options["in_channels"]
    logits = model(torch.rand(7, channels, size, size))
    assert logits.shape == (7, options["num_classes"])


def test_layers_as_in_the_paper():
    model = Conv4(**MINIIMAGENET)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 4
    assert all(conv.bias is None and conv.kernel_size == (3, 3) for conv in convs)
    assert all(norm.affine and not norm.track_running_stats for norm in norms)
    assert list(model.buffers()) == []  # no running statistics anywhere
    assert [type(m).__name__ for m in model.features[0]] == [
        "ZeroPad2d",
        "Conv2d",
        "MaxPool2d",
        "BatchNorm2d",
        "ReLU",
    ]


def test_batch_norm_uses_batch_statistics_in_eval_mode():
    model = Conv4(**OMNIGLOT)
    images = torch.rand(10, 1, 28, 28)
    train_logits = model.train()(images)
    eval_logits = model.eval()(images)
    assert torch.allclose(train_logits, eval_logits)
    # The batch's own statistics: a sample's logits depend on the rest of its batch.
    assert not torch.allclose(model(images[:5]), eval_logits[:5])


def test_per_task_gradients_under_vmap_match_a_loop():
    model = Conv4(**{**OMNIGLOT, "hidden": 8})
    tasks, batch = 3, 10
    generator = torch.Generator().manual_seed(0)
    params = {
        name: value.detach() + 0.1 * torch.randn(tasks, *value.shape, generator=generator)
        for name, value in model.named_parameters()
    }
    inputs = torch.rand(tasks, batch, 1, 28, 28, generator=generator)
    targets = torch.randint(0, 5, (tasks, batch), generator=generator)

    def loss(task_params, task_inputs, task_targets):
        logits = functional_call(model, task_params, (task_inputs,))
        return F.cross_entropy(logits, task_targets)

    batched = vmap(grad(loss))(params, inputs, targets)
    for t in range(tasks):
        task_params = {name: value[t] for name, value in params.items()}
        looped = grad(loss)(task_params, inputs[t], targets[t])
        for name in params:
            assert torch.allclose(batched[name][t], looped[name], rtol=1e-4, atol=1e-6), name


def test_bad_widths_and_flags_fail_with_one_line():
    with pytest.raises(ConfigValueError, match="hidden=0: expected an integer >= 1"):
        Conv4(hidden=0)
    with pytest.raises(ConfigValueError, match="max_pool='yes': expected true or false"):
        Conv4(max_pool="yes")  # YAML 1.2 reads yes as a string: it was taken as true


def test_stride_two_convolutions_pad_as_tensorflow_same() -> None:
    """A 4×4 input, stride 2, all-ones 3×3 kernel: TensorFlow's "same" pads one row and column at
    the bottom and right only, so the first window sums rows 0–2 × columns 0–2 (0+1+2+4+5+6+8+9+10
    = 45) and the last sums rows 2–3 × columns 2–3 (10+11+14+15 = 50)."""
    assert same_padding(4, 2) == (0, 1, 0, 1)
    assert same_padding(28, 2) == (0, 1, 0, 1)
    assert same_padding(7, 2) == (1, 1, 1, 1)
    assert same_padding(84, 1) == (1, 1, 1, 1)
    model = Conv4(in_channels=1, num_classes=2, image_size=4, hidden=1, layers=1)
    pad, conv = model.features[0][:2]
    nn.init.ones_(conv.weight)
    image = torch.arange(16.0).view(1, 1, 4, 4)
    out = conv(pad(image))
    assert out.flatten().tolist() == [45.0, 39.0, 66.0, 50.0]
