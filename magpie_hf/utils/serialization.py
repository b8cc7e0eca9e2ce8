"""Settings as plain data, for the JSON and YAML files a run writes (``pipeline.json``, a recipe's config)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` as JSON/YAML-friendly data: dataclasses and mappings as dicts, sequences as lists, paths
    as strings, anything else as its ``repr``.

    Example:
        >>> import pathlib
        >>> jsonable({"a": (1, pathlib.Path("x")), 2: None})
        {'a': [1, 'x'], '2': None}
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)
