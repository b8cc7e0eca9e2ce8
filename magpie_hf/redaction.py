"""Secrets never reach a file, card, log or config: one function that masks them in any value.

Masked: Hub tokens (``hf_...``), the value after ``--token`` / ``--hf_token`` / ``--api_key`` flags, the
user and password of a URL (``https://user:key@host``) and key-like query parameters (``?api_key=...``).

    >>> redact("python run.py --token hf_abcdefghijkl --base_url https://me:s3cret@host/v1?api_key=k1&x=2")
    'python run.py --token *** --base_url https://***@host/v1?api_key=***&x=2'
    >>> redact({"urls": ["http://127.0.0.1:8000/v1"]})
    {'urls': ['http://127.0.0.1:8000/v1']}
"""

from __future__ import annotations

import re
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
