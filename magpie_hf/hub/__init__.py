"""Versioned Magpie datasets on the Hugging Face Hub: Parquet folders, dataset cards with plots, tagged commits.

Example:
    >>> from magpie_hf.hub import save_dataset_folder, publish
    >>> folder = save_dataset_folder("runs/pro/dataset", {"raw": raw, "filtered": filtered}, run_info)  # doctest: +SKIP
    >>> publish(folder, "me/magpie-pro", "1.0.0")                                                     # doctest: +SKIP
    PublishResult(pushed=True, repo_id='me/magpie-pro', tag='v1.0.0', ...)
    >>> # datasets.load_dataset("me/magpie-pro", "filtered", revision="v1.0.0")

Heavy libraries (datasets, matplotlib, sentence-transformers) load only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "save_dataset_folder": "folder",
    "publish": "publishing",
    "PublishResult": "publishing",
    "PublishError": "publishing",
    "HubAuthError": "publishing",
    "TagExistsError": "publishing",
    "parse_version": "publishing",
    "push_later_hint": "publishing",
    "render_card": "card",
    "read_layout": "layout",
    "finish_recipe": "publishing",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the names as type checkers and IDEs see them (``X as X``: re-exported)
    from .card import render_card as render_card
    from .folder import save_dataset_folder as save_dataset_folder
    from .layout import read_layout as read_layout
    from .publishing import HubAuthError as HubAuthError
    from .publishing import PublishError as PublishError
    from .publishing import PublishResult as PublishResult
    from .publishing import TagExistsError as TagExistsError
    from .publishing import finish_recipe as finish_recipe
    from .publishing import parse_version as parse_version
    from .publishing import publish as publish
    from .publishing import push_later_hint as push_later_hint


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
