"""DDP on CPU (gloo, 2 real processes started by Lightning's launcher) against one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_process import (
    TINY,
    checkpoint,
    offline_runs,
    results,
    train,
    wandb_run_record,
)

# Adam in the inner loop, its moments carried from meta-iteration to meta-iteration: the moments
# must be all-reduced too. (The outer optimizer stays SGD: Adam's first steps are ±lr whatever the
# gradient's size, so the float rounding of a near-zero entry would decide an entire step.)
STATEFUL = (
    "dataset.meta_batch_size=4",
    "algorithm.inner_optimizer=adam",
    "algorithm.inner_state=carry",
    "algorithm.inner_lr=0.01",
)


def assert_trees_close(actual: object, expected: object, where: str = "") -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            assert_trees_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_trees_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=where)
    else:
        assert actual == expected, where


def test_two_ranks_with_m_tasks_each_match_one_process_with_2m(tmp_path: Path) -> None:
    train(tmp_path, *TINY, *STATEFUL, "logger=csv", "hydra.run.dir=one")
    train(tmp_path, *TINY, *STATEFUL, "trainer=ddp_cpu", "logger=wandb", "hydra.run.dir=ddp")
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").exists()  # rank 1 really ran

    one = checkpoint(tmp_path / "one/checkpoints/last.ckpt")
    ddp = checkpoint(tmp_path / "ddp/checkpoints/last.ckpt")
    assert ddp["global_step"] == one["global_step"] == 6
    # φ, the outer optimizer and the carried inner Adam moments (all-reduced every step).
    for key in ("state_dict", "optimizer_states", "inner_state", "lr_schedulers"):
        assert_trees_close(ddp[key], one[key], key)
    # Test tasks are sharded over the ranks and the scores gathered: the same 6 tasks are scored.
    assert results(tmp_path / "ddp") == pytest.approx(results(tmp_path / "one"), rel=1e-5)

    # Rank 0 alone logs: one W&B run, though both ranks built the logger.
    (run,) = offline_runs(tmp_path)
    assert run.parent == tmp_path / "ddp/wandb"


def test_multirun_with_ddp_runs_each_job_once_in_its_own_directory(tmp_path: Path) -> None:
    """Hydra + DDP pitfall: the launcher re-runs the command line, which is the whole sweep."""
    sweep = ("trainer=ddp_cpu", "dataset.meta_batch_size=4", "algorithm.inner_steps=1,2")
    output = train(tmp_path, "-m", *TINY, *sweep)

    (sweep,) = (tmp_path / "outputs/multiruns").iterdir()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["outputs"]
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["multiruns"]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert output.count("Launching 2 jobs locally") == 1
    for job, inner_steps in (("0", 1), ("1", 2)):
        assert (sweep / job / "train_ddp_rank1.log").exists()  # each job had its own rank 1
        assert set(results(sweep / job)) >= {"test/mse_after", "test/mse_before"}
        step = checkpoint(sweep / job / "checkpoints/last.ckpt")["global_step"]
        assert step == 6
        # One W&B run per job, from rank 0, in the sweep's group.
        (run,) = offline_runs(sweep / job)
        record = wandb_run_record(run)
        assert record.run_group == f"train-{sweep.name}"
        assert (
            f"algorithm.inner_steps={inner_steps}"
            in (sweep / job / ".hydra/overrides.yaml").read_text()
        )
