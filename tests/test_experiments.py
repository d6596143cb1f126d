"""The analysis presets compose and build with every algorithm they are swept over."""

from __future__ import annotations

import pytest
from conftest import ROOT
from data.real_data import SHARED_DATA, needs_omniglot

from reptile.algorithms import FOMAML, MAML, Reptile
from reptile.config import ConfigValueError
from reptile.train import build

ALGORITHMS = {"reptile": Reptile, "fomaml": FOMAML, "maml": MAML}


@pytest.mark.parametrize(
    ("experiment", "algorithm"),
    [
        ("sine_analysis", "reptile"),
        ("sine_analysis", "fomaml"),
        ("sine_analysis", "maml"),
        pytest.param("gradient_combinations", "reptile", marks=needs_omniglot),
        pytest.param("gradient_combinations", "fomaml", marks=needs_omniglot),
        pytest.param("gradient_combinations", "maml", marks=needs_omniglot),
        pytest.param("inner_iterations", "reptile", marks=needs_omniglot),
        pytest.param("inner_iterations", "fomaml", marks=needs_omniglot),
    ],
)
def test_presets_build_with_each_algorithm(compose, experiment: str, algorithm: str) -> None:
    overrides = (
        f"experiment={experiment}",
        f"algorithm={algorithm}",
        f"paths.data_dir={SHARED_DATA}",
    )
    cfg = compose(*overrides, "logger=none")
    _, module, _ = build(cfg)
    assert type(module.algorithm) is ALGORITHMS[algorithm]


def test_gradient_combinations_has_four_disjoint_batches_of_25() -> None:
    """g1 … g4 are gradients on different samples: 4 × 25 = 5 ways × 20 train shots."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=gradient_combinations"])
    batches = cfg.algorithm.inner_steps * cfg.algorithm.inner_batch_size
    assert batches == cfg.dataset.ways * cfg.dataset.train_shots == 100


def test_maml_on_an_adam_preset_is_one_line(compose) -> None:
    with pytest.raises(ConfigValueError) as error:
        build(compose("experiment=omniglot_5w5s", "algorithm=maml", "logger=none"))
    assert str(error.value) == (
        "algorithm.inner_optimizer='adam': expected sgd "
        "(MAML differentiates through plain SGD inner steps)"
    )
