"""`reptile.cli`: the config resolvers that depend on the machine (the GPU of a sweep's job, the
default precision), and Hydra's composition errors as one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf
from train_process import ROOT

from reptile import cli

CONF = ROOT / "conf"


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


def test_bf16_is_called_emulated_only_on_a_device_without_bfloat16_units(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cli.emulated_bf16("bf16-mixed") == (
        "trainer.precision=bf16-mixed on a CPU without bfloat16 matrix units (AMX): "
        "bfloat16 is emulated there, several times slower than 32-true"
    )
    assert cli.emulated_bf16("32-true") is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert cli.emulated_bf16("bf16-mixed") is None
    # A GPU without bf16 beside a CPU with AMX: what counts is the device that trains.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert "on a GPU without bfloat16 matrix units (bf16" in cli.emulated_bf16("bf16-mixed", "gpu")
    assert cli.emulated_bf16("bf16-mixed", "cpu") is None


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


def composition_error(compose, *overrides: str) -> str:
    """The line for the error Hydra raises composing `overrides`, as train.py would print it."""
    with pytest.raises(Exception) as error:
        compose(*overrides)
    return cli.composition_error(error.value, list(overrides), cli.composer(CONF))


def test_a_key_the_config_lacks_is_named_with_the_closest_and_every_key_there(compose) -> None:
    # The keys listed are those of the config composed with the same group choices.
    maml_keys = [k for k in compose("algorithm=maml").algorithm if not k.startswith("_")]
    assert "task_chunk_size" in maml_keys  # MAML's own: the choice is honoured
    assert composition_error(compose, "algorithm=maml", "algorithm.inner_step=3") == (
        "algorithm.inner_step=3: algorithm has no key inner_step "
        "(did you mean algorithm.inner_steps?); "
        f"its keys: {', '.join(sorted(maml_keys))}; +algorithm.inner_step=3 adds it"
    )
    top = sorted(k for k in compose() if not k.startswith("_"))
    assert composition_error(compose, "learning_rat=0.5") == (
        f"learning_rat=0.5: the config has no key learning_rat; its keys: {', '.join(top)}; "
        "+learning_rat=0.5 adds it"
    )


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("algorithm.k=10", "algorithm.inner_steps or dataset.shots"),  # the paper's symbols
        # few-shot's K shots: the node's own key first
        ("dataset.k=10", "dataset.shots or algorithm.inner_steps"),
        ("dataset.n=10", "dataset.meta_batch_size or dataset.ways"),
        ("algorithm.epsilon=0.1", "algorithm.meta_lr"),
        ("algorithm.meta-step=0.1", "algorithm.meta_lr"),  # supervised-reptile's --meta-step
        ("meta_iters=100", "trainer.max_steps"),  # its --meta-iters, at the top level
        ("algorithm.meta_batch_size=10", "dataset.meta_batch_size"),  # the key of another group
        ("model.seed=1", "seed or dataset.seed"),  # every key of that name
    ],
)
def test_a_key_under_another_name_or_in_another_group_is_pointed_at(
    compose, override: str, meant: str
) -> None:
    line = composition_error(compose, "experiment=omniglot_5w1s", override)
    assert f" (did you mean {meant}?); its keys: " in line
    config = compose("experiment=omniglot_5w1s")
    for key in meant.split(" or "):  # a key the config has
        assert OmegaConf.select(config, key, default=KeyError) is not KeyError


def test_a_key_error_whose_config_cannot_be_composed_again_is_still_one_line() -> None:
    cause = KeyError("k")
    cause.full_key = "algorithm.k"  # as omegaconf's errors name the key
    error = Exception("Could not override 'algorithm.k'")
    error.__cause__ = cause
    line = cli.composition_error(error, ["dataset=omniglott", "algorithm.k=3"], cli.composer(CONF))
    assert line == "algorithm.k=3: algorithm has no key k; +algorithm.k=3 adds it"


def sweep_error(compose, *overrides: str) -> str:
    """The line for the error Hydra raises composing a multirun's own config: its overrides
    without the swept group choices, which it applies to each job's config later."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    with pytest.raises(Exception) as error:
        compose(*(o for o in overrides if not parser.parse_override(o).is_sweep_override()))
    return cli.composition_error(error.value, list(overrides), cli.composer(CONF), multirun=True)


def test_a_key_every_job_of_a_sweep_has_but_its_own_config_lacks_is_set_with_plus_plus(
    compose,
) -> None:
    sweep = ("dataset=omniglot,miniimagenet", "dataset.ways=3")
    assert sweep_error(compose, *sweep) == (
        "dataset.ways=3: every job of the sweep has dataset.ways, but Hydra applies the overrides "
        "a sweep does not vary before its swept choices (dataset=omniglot,miniimagenet), to a "
        "config without it; ++dataset.ways=3 sets it in each job"
    )
    compose("++dataset.ways=3")  # the remedy: the sweep's own config composes, and each job has it
    for dataset in ("omniglot", "miniimagenet"):
        assert compose(f"dataset={dataset}", "++dataset.ways=3").dataset.ways == 3


def test_a_key_some_jobs_of_a_sweep_lack_names_those_jobs_and_their_keys(compose) -> None:
    sine = ", ".join(sorted(k for k in compose().dataset if not k.startswith("_")))
    # Jobs in order: (omniglot, 1), (omniglot, 2), (sine, 1), (sine, 2), (mini, 1), (mini, 2).
    line = sweep_error(
        compose,
        "dataset=omniglot,sine,miniimagenet",
        "algorithm.inner_steps=1,2",
        "dataset.ways=5",
        "logger=none",
    )
    assert line == (
        f"dataset.ways=5: jobs 2, 3 of 6 (dataset=sine): dataset has no key ways; its keys: "
        f"{sine}; the other jobs have it"
    )


def test_a_missing_group_option_lists_the_groups_options(compose) -> None:
    assert composition_error(compose, "dataset=omniglott") == (
        "dataset=omniglott: expected one of imagefolder, miniimagenet, omniglot, sine"
    )


def test_an_override_hydra_cannot_parse_is_named(compose) -> None:
    line = composition_error(compose, "seed=1", "model.hidden=[40,40")
    assert line.startswith(
        "model.hidden=[40,40: expected an override Hydra can parse (no viable alternative at "
        "input '[40,40'; See https://hydra.cc/"
    )
    assert "\n" not in line
