"""conf/algorithm/*.yaml against the dataclasses: each config instantiates to its class with the
class's own defaults, so the two places that state a default cannot drift apart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate

CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "algorithm"


def plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("name", sorted(path.stem for path in CONFIGS.glob("*.yaml")))
def test_config_states_the_class_defaults(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        config = compose(name)
    algorithm = instantiate(config, _convert_="object")
    defaults = get_class(config._target_)()
    assert type(algorithm) is type(defaults)
    for field in dataclasses.fields(defaults):
        assert plain(getattr(algorithm, field.name)) == plain(getattr(defaults, field.name)), (
            f"{name}.yaml: {field.name}"
        )
    assert set(config) - {"_target_"} == {f.name for f in dataclasses.fields(defaults)}
