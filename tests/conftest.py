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


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    """A recipe script of ``recipes/`` as a module (its ``main(argv)`` and ``Recipe``), imported as a script is."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the recipe look their module up
    spec.loader.exec_module(module)
    return module


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


class OpenAITestServer:
    """A running tests/openai_server.py process: its base URL, the key it requires, and its test controls."""

    #: the environment variable holding the key the server requires (and the engines send)
    key_env = "MAGPIE_TEST_SERVER_KEY"
    #: the key: it must never appear in a log, an error, a config record or a file
    secret = "sk-test-do-not-log-0123456789"

    def __init__(self, url: str) -> None:
        self.url = url
        self.base_url = f"{url}/v1"

    def call(self, path: str, payload: dict | None = None) -> dict:
        """GET ``path`` (POST ``payload`` when given) and return the JSON answer."""
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def requests_seen(self) -> int:
        return self.call("/test/stats")["requests_seen"]

    def bodies(self) -> list[dict]:
        """The generation request bodies the server saw since the last :meth:`reset`, oldest first."""
        return self.call("/test/requests")["requests"]

    def configure(self, **settings) -> None:
        """``ignore_n``, ``max_n``, ``max_prompt_tokens`` (see tests/openai_server.py); none: a normal server."""
        self.call("/test/config", settings)

    def reset(self) -> None:
        self.call("/test/config", {})
        self.call("/test/fail", {"count": 0})
        self.call("/test/reset", {})


@pytest.fixture(scope="session")
def openai_server():
    """tests/openai_server.py (an OpenAI-compatible server over the embedded model, /v1/completions and
    /v1/chat/completions) in its own process on 127.0.0.1, started once per session."""
    import subprocess
    import sys
    import threading

    env = dict(os.environ, **{OpenAITestServer.key_env: OpenAITestServer.secret}, OMP_NUM_THREADS="1")
    script = Path(__file__).with_name("openai_server.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--api-key-env", OpenAITestServer.key_env, "--max-model-len", "2048"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=300)
    if not line or not line[0].startswith("LISTENING"):
        proc.kill()
        pytest.fail(f"tests/openai_server.py did not start: {line}")
    yield OpenAITestServer(f"http://127.0.0.1:{line[0].split()[1]}")
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def server(openai_server, monkeypatch):
    """The session's test server, reset to a normal server, with its key in the environment."""
    monkeypatch.setenv(OpenAITestServer.key_env, OpenAITestServer.secret)
    openai_server.reset()
    yield openai_server
    openai_server.reset()
