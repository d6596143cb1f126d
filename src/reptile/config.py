"""Input checking shared by every configurable object.

Objects check their own arguments with `require`; the entry point prefixes the config group, so a
user sees one line such as `algorithm.inner_steps=0: expected an integer >= 1`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class ConfigValueError(ValueError):
    """A configuration value outside what is accepted."""

    def __init__(self, key: str, value: Any, accepted: str) -> None:
        self.key, self.value, self.accepted = key, value, accepted
        super().__init__(f"{key}={value!r}: expected {accepted}")

    def under(self, prefix: str) -> ConfigValueError:
        return ConfigValueError(f"{prefix}.{self.key}", self.value, self.accepted)


def require(condition: bool, key: str, value: Any, accepted: str) -> None:
    if not condition:
        raise ConfigValueError(key, value, accepted)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(key: str, value: Any, minimum: int) -> None:
    require(is_int(value) and value >= minimum, key, value, f"an integer >= {minimum}")


def require_bool(key: str, value: Any) -> None:
    require(isinstance(value, bool), key, value, "true or false")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_positive(key: str, value: Any) -> None:
    finite = is_number(value) and value != float("inf")
    require(finite and value > 0, key, value, "a finite number > 0")


def require_non_negative(key: str, value: Any) -> None:
    finite = is_number(value) and value != float("inf")
    require(finite and value >= 0, key, value, "a finite number >= 0")


def require_range(key: str, value: Any) -> tuple[float, float]:
    """`value` is `[low, high]`, two finite numbers with low < high; returned as floats."""
    pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_number, value))
    finite = pair and all(abs(bound) != float("inf") for bound in value)
    require(finite and value[0] < value[1], key, value, "[low, high], finite numbers, low < high")
    return float(value[0]), float(value[1])


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, key, value, f"one of {', '.join(choices)}")


def require_writable(key: str, value: Any, folder: str | Path) -> None:
    """`folder` takes new files, or can be created: its nearest existing ancestor is a writable
    folder. Checked without creating anything: a run refused here leaves nothing behind."""
    folder = Path(folder).absolute()
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        problem = f"{existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise ConfigValueError(key, value, f"a folder it can write to, but {problem}")
