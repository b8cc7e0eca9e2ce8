"""Shared fixtures. Tests never download: HF_HUB_OFFLINE is set before anything imports the Hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import tempfile  # noqa: E402

# datasets keys its cache of a local folder by name and card metadata only: keep each test
# session's cache apart so one run's rows are never served for another's
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="magpie-hf-datasets-cache-")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

#: real chat templates of instruct models (see its README.md), kept in the repository
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"


@pytest.fixture(scope="session")
def embedded_engine():
    """The embedded chat model (SmolLM2-135M-Instruct), loaded once for the whole session."""
    from magpie_hf.engines import EngineConfig, load_engine

    return load_engine(EngineConfig.embedded())


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_engine):
    return embedded_engine.tokenizer


def chat_template_fixtures() -> dict[str, dict]:
    """The real chat templates in tests/fixtures/chat_templates, by file stem.

    Raises instead of returning nothing, so a moved or empty folder fails the tests that are
    parametrized over the fixtures rather than silently leaving them with zero cases.
    """
    fixtures = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(FIXTURES.glob("*.json"))}
    if not fixtures:
        raise FileNotFoundError(
            f"No chat-template fixtures (*.json) in {FIXTURES}; they are part of the repository, restore them "
            "with `git checkout -- tests/fixtures/chat_templates`."
        )
    return fixtures
