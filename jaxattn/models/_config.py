"""Checks shared by the model configs' ``__post_init__``."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def check_positive_ints(owner: Any, names: tuple[str, ...]) -> None:
    """Raise unless each field is an integer > 0 (bools, floats such as 2.5 and NaN fail).

    ``int(2.5)`` would pass and fail later, in ``init``, as a shape TypeError.
    """
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{type(owner).__name__}.{name} must be a positive int, got {value!r}")


def check_bools(owner: Any, names: tuple[str, ...]) -> None:
    """Raise unless each field is a bool or ``np.bool_`` (a string such as ``"no"`` would count
    as true)."""
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{type(owner).__name__}.{name} must be a bool, got {value!r}")


def check_positive(owner: Any, name: str) -> None:
    """Raise unless the field is a number > 0 (written ``not > 0`` so NaN fails too)."""
    value = getattr(owner, name)
    if not value > 0:
        raise ValueError(f"{type(owner).__name__}.{name} must be positive, got {value!r}")
