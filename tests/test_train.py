"""`train.py` end to end through Hydra: outputs, sweeps, bad input, divergence, reproducibility,
folders it cannot write, W&B without its server, damaged data, --help and --cfg."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import warnings
from pathlib import Path

import pytest
from data.real_data import OMNIGLOT, needs_omniglot
from train_process import (
    TINY,
    environment,
    offline_runs,
    run,
    wandb_exit_code,
    wandb_run_record,
)

from reptile.config import ConfigValueError
from reptile.train import build

# Lightning's and W&B's noise, untrue or useless on these runs.
NOISE = ("litlogger", "Epoch 0/-2", "smaller than the logging interval", "v_num", "anonymous")


def test_single_run_writes_results_plot_checkpoint_and_offline_wandb(tiny_run: Path) -> None:
    results = json.loads((tiny_run / "results.json").read_text())
    assert set(results) == {
        "test/mse_before",
        "test/mse_before_ci95",
        "test/mse_after",
        "test/mse_after_ci95",
    }
    assert all(value > 0 for value in results.values())
    assert (tiny_run / "adaptation.png").stat().st_size > 10_000
    assert (tiny_run / "checkpoints" / "last.ckpt").is_file()
    assert (tiny_run / ".hydra" / "config.yaml").is_file()
    (wandb_run,) = offline_runs(tiny_run)
    assert wandb_run.parent == tiny_run / "wandb"
    assert wandb_exit_code(wandb_run) == 0


@pytest.mark.slow
def test_same_seed_gives_same_results(tiny_run: Path, tmp_path: Path) -> None:
    result = run(tmp_path, *TINY, "logger=none", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results.json").read_text() == (tiny_run / "results.json").read_text()


@pytest.mark.slow
def test_evaluating_the_checkpoint_reproduces_the_test_metrics_in_its_own_wandb_run(
    tiny_run: Path, tmp_path: Path
) -> None:
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    result = run(
        tmp_path, *TINY, "train=false", f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results.json").read_text() == (tiny_run / "results.json").read_text()
    # The evaluation is a W&B run of its own: the training run is not written into.
    (evaluation,) = offline_runs(tmp_path)
    (training,) = offline_runs(tiny_run)
    assert wandb_run_record(evaluation).run_id != wandb_run_record(training).run_id


@pytest.mark.slow
def test_multirun_gives_each_job_its_directory_and_results(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "-m",
        *TINY,
        "logger=csv",
        "algorithm.inner_steps=1,2",
        "dataset.meta_batch_size=1,2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [job.name for job in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert "test/mse_after" in json.loads((job / "results.json").read_text())


def refusal(compose, *overrides: str) -> str:
    """The one line `build` refuses the config of `overrides` with (W&B off)."""
    with pytest.raises(ConfigValueError) as error:
        build(compose(*overrides, "logger=none"))
    return str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.inner_steps=0", "algorithm.inner_steps=0: expected an integer >= 1"),
        ("algorithm.meta_lr=0", "algorithm.meta_lr=0: expected a finite number > 0"),
        ("algorithm.meta_lr=-1.5", "algorithm.meta_lr=-1.5: expected a finite number > 0"),
        ("algorithm.inner_lr=-0.1", "algorithm.inner_lr=-0.1: expected a finite number > 0"),
        ("dataset.meta_batch_size=0", "dataset.meta_batch_size=0: expected an integer >= 1"),
        ("dataset.shots=-3", "dataset.shots=-3: expected an integer >= 1"),
        ("dataset.num_test_tasks=-1", "dataset.num_test_tasks=-1: expected an integer >= 1"),
        (
            "algorithm.eval_inner_steps=-2",
            "algorithm.eval_inner_steps=-2: expected an integer >= 0",
        ),
        (
            "algorithm.inner_optimizer=rmsprop",
            "algorithm.inner_optimizer='rmsprop': expected one of sgd, adam",
        ),
        (
            "algorithm.outer_optimizer=lbfgs",
            "algorithm.outer_optimizer='lbfgs': expected one of sgd, adam",
        ),
        (
            "algorithm.inner_state=shared",
            "algorithm.inner_state='shared': expected one of carry, sequential, reset",
        ),
        (
            "algorithm.eval_inner_state=carry",
            "algorithm.eval_inner_state='carry': expected one of trained, fresh",
        ),
        ("model.activation=gelu", "model.activation='gelu': expected one of relu, tanh"),
        ("trainer.max_steps=0", "trainer.max_steps=0: expected an integer >= 1"),
        (
            "trainer.val_check_interval=0",
            "trainer.val_check_interval=0: expected an integer >= 1",
        ),
        (
            "trainer.val_check_interval=0.5",
            "trainer.val_check_interval=0.5: expected an integer >= 1",
        ),
        (
            "trainer.devices=0",
            "trainer.devices=0: expected an integer >= 1, -1 (every GPU), auto or a list of GPU "
            "indices",
        ),
        (
            "trainer.precision=16-mixed",
            "trainer.precision='16-mixed': expected 32-true or bf16-mixed",
        ),
        (
            "trainer.precision=bf16-true",
            "trainer.precision='bf16-true': expected 32-true or bf16-mixed",
        ),
        ("seed=-1", "seed=-1: expected an integer >= 0"),
        (
            "dataset.amplitude=[5,1]",
            "dataset.amplitude=[5, 1]: expected [low, high], finite numbers, low < high",
        ),
        (
            "dataset.x_range=5",
            "dataset.x_range=5: expected [low, high], finite numbers, low < high",
        ),
        ("algorithm.compile=1", "algorithm.compile=1: expected true or false"),
        ("train=maybe", "train='maybe': expected true or false"),
        (
            "trainer.accelerator=tpu",
            "trainer.accelerator='tpu': expected one of auto, cpu, gpu, cuda, mps",
        ),
    ],
)
def test_bad_input_is_one_line_naming_key_value_and_accepted(
    compose, override: str, message: str
) -> None:
    assert refusal(compose, override) == message


def keys_of(node) -> str:
    return ", ".join(sorted(key for key in node if not key.startswith("_")))


def test_a_key_its_target_takes_no_argument_for_is_one_line_with_the_nodes_keys(compose) -> None:
    """Added by mistake, or one that only another option of the group has (sine has no ways)."""
    for override, name, hint in (
        ("+dataset.shotz=1", "shotz", " (did you mean dataset.shots?)"),
        ("++dataset.ways=5", "ways", ""),
    ):
        line = refusal(compose, override)
        value = override.rpartition("=")[2]
        assert line == (
            f"dataset.{name}={value}: expected one of the keys reptile.data.sine.SineWaves takes"
            f"{hint}: {keys_of(compose().dataset)}"
        )
    # A node below the group: its full key.
    assert refusal(compose, "+callbacks.model_checkpoint.every_n=5").startswith(
        "callbacks.model_checkpoint.every_n=5: expected one of the keys "
        "pytorch_lightning.callbacks.ModelCheckpoint takes: "
    )


@pytest.mark.parametrize(
    ("override", "start"),
    [
        (
            "callbacks.model_checkpoint.every_n_train_steps=-1",
            "callbacks.model_checkpoint.every_n_train_steps=-1: expected what "
            "pytorch_lightning.callbacks.ModelCheckpoint accepts: Invalid value for "
            "every_n_train_steps=-1",
        ),
        (
            "trainer.strategy=fsdb",
            "trainer.strategy='fsdb': expected what pytorch_lightning.Trainer accepts: You "
            "selected an invalid strategy name",
        ),
    ],
)
def test_a_value_a_library_refuses_is_one_line_naming_its_key(compose, override, start) -> None:
    line = refusal(compose, override)
    assert line.startswith(start) and "\n" not in line


def test_an_error_of_this_packages_own_class_keeps_its_traceback() -> None:
    """Its classes check their values with `require`: anything else they raise is a bug."""
    from omegaconf import OmegaConf

    from reptile.job import refused_key

    node = OmegaConf.create({"_target_": "reptile.algorithms.Reptile", "inner_steps": 5})
    assert refused_key(ValueError("inner_steps went wrong"), node, "algorithm") is None
    library = OmegaConf.create({"_target_": "some.Library", "inner_steps": 5, "steps": 1})
    assert refused_key(ValueError("inner_steps and steps disagree"), library, "x") is None


def test_a_value_left_to_the_command_line_or_that_cannot_resolve_is_one_line(compose) -> None:
    assert refusal(compose, "dataset=imagefolder", "model=conv4_miniimagenet") == (
        "dataset.root='???': expected a value, which the config leaves to the command line "
        "(dataset.root=...)"
    )
    # A preset's model beside another dataset.
    assert refusal(compose, "experiment=omniglot_5w1s", "dataset=sine") == (
        "model.image_size='${dataset.image_size}': expected a value that resolves "
        "(Interpolation key 'dataset.image_size' not found)"
    )


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (
            ["dataset=omniglot", "dataset.download=true"],  # the default MLP
            "'MLP': expected a model that maps Omniglot's samples, [1, 28, 28], to 5 outputs, but "
            "MLP fails on them (mat1 and mat2 shapes cannot be multiplied (56x28 and 1x64))",
        ),
        (
            ["experiment=omniglot_5w1s", "model=conv4_miniimagenet", "dataset.download=true"],
            "'Conv4': expected a model that maps Omniglot's samples, [1, 28, 28], to 5 outputs, "
            "but Conv4 fails on them (Given groups=1, weight of size [32, 3, 3, 3], expected "
            "input[2, 1, 30, 30] to have 3 channels, but got 1 channels instead)",
        ),
        (
            ["model.out_features=3"],
            "'MLP': expected a model that maps SineWaves's samples, [1], to 1 output, but MLP "
            "gives outputs of shape [3]",
        ),
    ],
)
def test_a_model_that_does_not_fit_the_dataset_is_one_line_before_any_data_loads(
    compose, tmp_path: Path, overrides: list[str], problem: str
) -> None:
    # No data there, and none is downloaded: the check comes first.
    assert refusal(compose, *overrides, f"paths.data_dir={tmp_path}") == (
        f"model={problem} (each preset pairs a dataset with its model: `python train.py --help` "
        "lists them)"
    )


def test_no_validation_tasks_is_no_validation_loop_and_no_warning(compose) -> None:
    datamodule, module, trainer = build(
        compose("dataset.num_val_tasks=0", "trainer.max_steps=2", "logger=none", "test=false")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2 and not trainer.num_val_batches
    assert not [w for w in caught if "DataLoader" in str(w.message)], caught


@pytest.mark.parametrize("trainer", ["ddp", "gpu_per_job"])
def test_a_gpu_trainer_on_a_machine_without_gpus_is_bad_input(
    compose, monkeypatch: pytest.MonkeyPatch, trainer: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert refusal(compose, f"trainer={trainer}") == (
        "trainer.accelerator='gpu': expected cpu or auto: this machine has no CUDA GPU "
        "(trainer=ddp_cpu runs DDP in CPU processes)"
    )


def test_more_gpus_than_the_machine_has_is_bad_input(
    compose, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    # Checked before Lightning looks for the GPUs: none is touched.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert refusal(compose, "trainer=ddp", "trainer.devices=4", "dataset.meta_batch_size=4") == (
        "trainer.devices=4: expected at most 2, the GPUs of this machine, or -1 for all of them"
    )


def test_bf16_on_a_cpu_without_bfloat16_units_is_a_warning_before_training(
    compose, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for amx, warned in ((False, True), (True, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="reptile.job"):
            build(compose("trainer.precision=bf16-mixed", "logger=none"))
        assert ("bfloat16 is emulated there" in caplog.text) == warned


@pytest.mark.slow
def test_bad_input_exits_nonzero_before_training_with_one_line(tmp_path: Path) -> None:
    result = run(tmp_path, "algorithm.inner_steps=0", "hydra.run.dir=outputs/day/time")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: algorithm.inner_steps=0: expected an integer >= 1"
    ]
    assert not (tmp_path / "outputs").exists()  # the folders it made, holding only .hydra/
    # A folder that was there before (a run resumed in place) is kept, with this try's record.
    again = run(tmp_path, "algorithm.inner_steps=0", f"hydra.run.dir={tmp_path}")
    assert again.returncode == 2
    assert (tmp_path / ".hydra/overrides.yaml").read_text() == "- algorithm.inner_steps=0\n"
    assert not (tmp_path / "checkpoints").exists()
    assert not offline_runs(tmp_path)  # no empty W&B run for `wandb sync` to upload


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["trainer.max_step=5"],
            "error: trainer.max_step=5: trainer has no key max_step "
            "(did you mean trainer.max_steps?); ",
        ),
        (["-m", "dataset=sine,omniglott"], "error: dataset=sine,omniglott: expected one of "),
        (  # a swept key that no job has: one line, the override as typed
            ["-m", "algorithm.inner_stepz=1,2"],
            "error: algorithm.inner_stepz=1,2: algorithm has no key inner_stepz (did you mean "
            "algorithm.inner_steps?); ",
        ),
    ],
)
def test_hydras_composition_errors_are_one_line_and_bad_inputs_exit_code(
    tmp_path: Path, overrides: list[str], line: str
) -> None:
    result = run(tmp_path, *overrides)
    assert result.returncode == 2
    (printed,) = result.stderr.strip().splitlines()
    assert printed.startswith(line)
    assert not (tmp_path / "outputs").exists()
    # HYDRA_FULL_ERROR=1 asks for Hydra's own report, with its exit code.
    hydras = run(tmp_path, *overrides, env=environment(tmp_path) | {"HYDRA_FULL_ERROR": "1"})
    assert hydras.returncode == 1 and "Traceback" in hydras.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "printed"),
    [
        ("algorithm.inner_steps=0", "algorithm.inner_steps=0"),
        ("model.hidden=[0]", "model.hidden=0"),
        ("dataset.meta_batch_size=0", "dataset.meta_batch_size=0"),
        ("ckpt_path=missing.ckpt", "ckpt_path='missing.ckpt'"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("+dataset.shotz=1", "dataset.shotz=1"),
        ("model.out_features=3", "model='mlp'"),  # the option's name, from Hydra
    ],
)
def test_config_errors_come_before_lightning_is_imported(tmp_path: Path, override, printed) -> None:
    """What makes them appear within about a second: torch's import is the only wait (Lightning's
    took several seconds more). Python's own import log shows what the process imported."""
    env = {**environment(tmp_path), "PYTHONPROFILEIMPORTTIME": "1"}
    result = run(tmp_path, override, f"hydra.run.dir={tmp_path}", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    assert "torch" in imported
    assert not imported & {"pytorch_lightning", "lightning_fabric", "torchmetrics", "wandb"}
    assert [line for line in lines if not line.startswith("import time:")][-1].startswith(
        f"error: {printed}: "
    )


@pytest.mark.slow
def test_divergence_stops_with_the_meta_iteration(tmp_path: Path) -> None:
    result = run(tmp_path, *TINY, "algorithm.inner_lr=1e30", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 3
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: training diverged at meta-iteration ")
    assert "train/loss" in last_line
    (wandb_run,) = offline_runs(tmp_path)
    assert wandb_exit_code(wandb_run) == 3  # failed, not "finished"
    output = result.stdout + result.stderr
    assert not [noise for noise in NOISE if noise in output]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["callbacks.model_checkpoint.dirpath", "hydra.run.dir"])
def test_an_unwritable_folder_is_one_line_before_training(tmp_path: Path, key: str) -> None:
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "inside"  # cannot be created, even by root
    run_dir = [] if key == "hydra.run.dir" else ["hydra.run.dir=run"]
    result = run(tmp_path, *TINY, f"{key}={folder}", *run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: {key}='{folder}': expected a folder it can write to, but {folder.parent} is a file"
    ]
    assert not offline_runs(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_is_one_line_before_training(tmp_path: Path) -> None:
    (tmp_path / "read-only").mkdir(mode=0o555)
    folder = tmp_path / "read-only" / "checkpoints"
    result = run(tmp_path, *TINY, f"callbacks.model_checkpoint.dirpath={folder}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: callbacks.model_checkpoint.dirpath='{folder}': expected a folder it can write "
        f"to, but {folder.parent} is not writable"
    ]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # free, and closed again once the socket is


@pytest.mark.slow
def test_wandb_online_without_its_server_fails_at_once_with_the_offline_hint(
    tmp_path: Path,
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    env = environment(tmp_path) | {"WANDB_BASE_URL": url, "WANDB_API_KEY": "x" * 40}
    del env["WANDB_MODE"]
    result = run(tmp_path, *TINY, "logger.wandb.offline=false", "hydra.run.dir=run", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "error: logger.wandb.offline=False: expected true (log offline, the default, and upload "
        f"later with `wandb sync`) or a reachable W&B server, but {url} cannot be reached ("
    )
    assert not (tmp_path / "run/wandb").exists()


@pytest.mark.slow
@needs_omniglot
def test_a_truncated_omniglot_archive_is_one_line_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "data/omniglot"
    root.mkdir(parents=True)
    official = OMNIGLOT
    shutil.copy(official / "images_evaluation.zip", root)
    data = (official / "images_background.zip").read_bytes()
    (root / "images_background.zip").write_bytes(data[: len(data) // 2])  # an interrupted copy
    result = run(
        tmp_path,
        "experiment=omniglot_5w1s",
        f"paths.data_dir={tmp_path / 'data'}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "hydra.run.dir=run",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: dataset.root='{root}': expected ")
    assert str(root / "images_background.zip") in line and "truncated" in line
    assert not offline_runs(tmp_path)  # the run stopped before its W&B run started


@pytest.mark.slow
def test_cfg_job_resolve_prints_the_resolved_config(tmp_path: Path) -> None:
    result = run(tmp_path, "--cfg", "job", "--resolve")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "group: null" in result.stdout  # `${sweep_group:}`, resolved for a single run
    assert "${" not in result.stdout


@pytest.mark.slow
def test_help_lists_the_knobs_and_hides_the_internal_configs(tmp_path: Path) -> None:
    result = run(tmp_path, "experiment=omniglot_5w1s", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    knobs = {line.split()[0]: line for line in lines if line.startswith(("algorithm.", "dataset."))}
    assert knobs["algorithm.inner_steps"].endswith("[5]")  # the preset's value, as composed
    assert knobs["dataset.meta_batch_size"].endswith("[5]")
    assert "callbacks.model_checkpoint.save_top_k" in result.stdout
    groups = {line.split(":")[0]: line for line in lines if ": " in line}
    assert groups["dataset"] == "dataset: imagefolder, miniimagenet, omniglot, sine"
    assert "_fewshot" not in groups["experiment"]


@pytest.mark.slow
@pytest.mark.parametrize("group", ["dataset", "experiment"])
def test_shell_completion_offers_no_internal_config(tmp_path: Path, group: str) -> None:
    env = environment(tmp_path) | {"COMP_LINE": f"python train.py {group}="}
    result = run(tmp_path, "-sc", "query=bash", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    options = result.stdout.split()
    assert f"{group}=sine" in options and not [o for o in options if "=_" in o]
