"""trainer.precision=bf16-mixed through the real Trainer: the inner loop's convolutions in
bfloat16, φ and every optimizer state in float32."""

from __future__ import annotations

import torch
from helpers import quiet_trainer
from torch.utils.data import DataLoader

from reptile.algorithms import Reptile
from reptile.lightning.module import MetaLearner
from reptile.models.conv4 import Conv4


def image_tasks(meta_batches: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(meta_batches):
        index = torch.stack([torch.randperm(10, generator=generator)[:5] for _ in range(6)])
        batches.append(
            {
                "support_inputs": torch.rand(2, 10, 1, 28, 28, generator=generator),
                "support_targets": torch.arange(5).repeat(2).expand(2, 10).clone(),
                "batch_index": index.view(2, 3, 5),
            }
        )
    return batches


def train(precision: str) -> MetaLearner:
    """Three meta-iterations with the inner Adam's moments carried (Reptile's defaults)."""
    torch.manual_seed(0)
    algorithm = Reptile(inner_steps=3, inner_batch_size=5)
    learner = MetaLearner(
        Conv4(1, 5, hidden=16), algorithm, loss="cross_entropy", score_after="acc"
    )
    trainer = quiet_trainer(
        max_steps=3,
        precision=precision,
    )
    trainer.fit(learner, train_dataloaders=DataLoader(image_tasks(3), batch_size=None))
    return learner


def test_bf16_mixed_keeps_phi_and_optimizer_states_in_float32() -> None:
    """The computation is bfloat16's (φ ends elsewhere than float32's), the state float32's.
    How close the two train is a question of accuracy, answered at full scale in the README
    (Omniglot 5-way 1-shot, 6,000 meta-iterations, 10,000 test tasks): on random tasks like
    these, bfloat16 changes a meta-gradient of the first layers by 20-30 %."""
    full, mixed = train("32-true"), train("bf16-mixed")
    reference = dict(full.model.named_parameters())
    for name, p in mixed.model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
        assert not torch.equal(p, reference[name]), f"{name}: bf16-mixed ran in float32"
    for slot in ("exp_avg", "exp_avg_sq"):
        assert all(t.dtype == torch.float32 for t in mixed.inner_state[slot].values())
