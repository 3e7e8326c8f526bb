"""Short ``repr`` for the diagnostics' result objects: numbers in full, arrays by shape."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray | torch.Tensor):
        return f"array{list(value.shape)}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {_describe(item)}" for key, item in value.items()) + "}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def short_repr(result: Any) -> str:
    """Return ``Name(field=value, ...)`` with arrays shown by shape and long values cut.

    Parameters
    ----------
    result : dataclass instance
        A result object.

    Returns
    -------
    str
        One line.

    Examples
    --------
    >>> @dataclasses.dataclass
    ... class Result:
    ...     total: float
    ...     per_point: np.ndarray
    >>> short_repr(Result(1.23456, np.zeros(3)))
    'Result(total=1.235, per_point=array[3])'
    """
    fields = ", ".join(
        f"{field.name}={_describe(getattr(result, field.name))}"
        for field in dataclasses.fields(result)
        if field.repr
    )
    return f"{type(result).__name__}({fields})"
