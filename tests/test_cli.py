"""The config resolvers of `reptile.cli` that depend on the machine: the GPU of a sweep's job,
and the default precision."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hydra.types import RunMode

from reptile import cli


@pytest.fixture
def sweep_job(monkeypatch: pytest.MonkeyPatch):
    """Pretends to be job `num` of a multirun on a machine with `gpus` GPUs."""

    def job(num: int, gpus: int, mode: RunMode = RunMode.MULTIRUN) -> None:
        config = SimpleNamespace(mode=mode, job=SimpleNamespace(num=num))
        monkeypatch.setattr(cli.HydraConfig, "initialized", staticmethod(lambda: True))
        monkeypatch.setattr(cli.HydraConfig, "get", staticmethod(lambda: config))
        monkeypatch.setattr(cli, "gpu_count", lambda: gpus)

    return job


def test_jobs_of_a_sweep_take_the_gpus_in_turn(sweep_job) -> None:
    devices = []
    for num in range(5):
        sweep_job(num, gpus=2)
        devices.append(cli.job_gpu())
    assert devices == [[0], [1], [0], [1], [0]]
    sweep_job(3, gpus=2, mode=RunMode.RUN)
    assert cli.job_gpu() == 1  # a single run: one device, Lightning's choice


def test_precision_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, precision in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert cli.fastest_precision() == precision


def test_precision_follows_the_configured_accelerator_not_the_machines_gpu(
    monkeypatch: pytest.MonkeyPatch, compose
) -> None:
    """A bf16 GPU beside a CPU without AMX: a preset trained on that CPU stays in float32."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    precision = {
        trainer: compose("experiment=omniglot_5w1s", f"trainer={trainer}").trainer.precision
        for trainer in ("default", "ddp", "ddp_cpu")
    }
    assert precision == {"default": "bf16-mixed", "ddp": "bf16-mixed", "ddp_cpu": "32-true"}
    cpu = compose("experiment=omniglot_5w1s", "trainer.accelerator=cpu").trainer.precision
    assert cpu == "32-true"
