"""The openai engine against a real HTTP server process (tests/openai_server.py) on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
from magpie_hf.engines.openai import OpenAICompletionsEngine, OpenAIServerError

SERVER = Path(__file__).with_name("openai_server.py")
KEY_ENV = "MAGPIE_TEST_SERVER_KEY"
SECRET = "sk-test-do-not-log-0123456789"
PROMPT = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server_url():
    env = dict(os.environ, **{KEY_ENV: SECRET})
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--port", "0", "--api-key-env", KEY_ENV],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    port: list[str] = []
    reader = threading.Thread(target=lambda: port.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=300)
    if not port or not port[0].startswith("LISTENING"):
        proc.kill()
        pytest.fail(f"test server did not start: {port}")
    yield f"http://127.0.0.1:{port[0].split()[1]}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def engine(server_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    config = EngineConfig.embedded(
        backend="openai",
        base_url=f"{server_url}/v1",
        api_key_env=KEY_ENV,
        max_concurrency=4,
        max_retries=3,
        extra=(("retry_base_s", 0.05),),
    )
    return OpenAICompletionsEngine(config)


def test_load_engine_picks_openai_for_base_url(server_url, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    config = EngineConfig.embedded(backend="auto", base_url=f"{server_url}/v1", api_key_env=KEY_ENV)
    with caplog.at_level(logging.INFO, logger="magpie_hf.engines"):
        engine = load_engine(config)
    assert isinstance(engine, OpenAICompletionsEngine)
    assert "chose openai" in caplog.text


def test_greedy_matches_local_engine(engine, embedded_engine):
    sampling = SamplingConfig(temperature=0, max_tokens=12, stop=("<|im_end|>",))
    remote = engine.generate([PROMPT], sampling)[0][0]
    local = embedded_engine.generate([PROMPT], sampling)[0][0]
    assert remote.text == local.text
    assert remote.finish_reason == local.finish_reason


def test_n_seed_length_and_order(engine):
    prompts = [PROMPT, "<|im_start|>user\n", "Once upon a time", "<|im_start|>user\nHi<|im_end|>\n"]
    sampling = SamplingConfig(temperature=1.0, max_tokens=6, n=2, seed=7)
    first = engine.generate(prompts, sampling)
    assert [len(c) for c in first] == [2, 2, 2, 2]
    assert first == engine.generate(prompts, sampling)  # same seed, same texts, in prompt order
    for completion in (c for cs in first for c in cs):
        assert completion.finish_reason in ("stop", "length")
        if completion.finish_reason == "length":
            assert completion.num_tokens == 6
    # identical prompts get distinct seeds, so Magpie step 1 does not repeat itself
    same = engine.generate([prompts[1]] * 3, SamplingConfig(max_tokens=8, seed=1))
    assert len({c[0].text for c in same}) > 1


def test_stop_string_excluded(engine):
    out = engine.generate([PROMPT], SamplingConfig(temperature=0, max_tokens=40, stop=(".",)))[0][0]
    assert "." not in out.text and out.finish_reason == "stop"


def test_retries_on_503_then_succeeds(engine, server_url):
    before = requests.get(f"{server_url}/test/stats").json()["requests_seen"]
    requests.post(f"{server_url}/test/fail", json={"count": 2, "status": 503})
    out = engine.generate([PROMPT], SamplingConfig(temperature=0, max_tokens=3))
    assert out[0][0].num_tokens >= 1
    assert requests.get(f"{server_url}/test/stats").json()["requests_seen"] - before == 3


def test_gives_up_after_max_retries(engine, server_url):
    requests.post(f"{server_url}/test/fail", json={"count": 10, "status": 429, "retry_after": 0})
    try:
        with pytest.raises(OpenAIServerError, match="failed after 4 attempts"):
            engine.generate([PROMPT], SamplingConfig(max_tokens=3))
    finally:
        requests.post(f"{server_url}/test/fail", json={"count": 0})


def test_client_errors_are_not_retried_and_key_never_logged(server_url, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-do-not-log")
    config = EngineConfig.embedded(backend="openai", base_url=f"{server_url}/v1", api_key_env=KEY_ENV)
    bad = OpenAICompletionsEngine(config)
    with caplog.at_level(logging.DEBUG), pytest.raises(OpenAIServerError, match="HTTP 401") as info:
        bad.generate([PROMPT], SamplingConfig(max_tokens=3))
    assert "sk-wrong-key" not in caplog.text and "sk-wrong-key" not in str(info.value)


def test_connection_refused_is_retried_then_reported():
    config = EngineConfig.embedded(
        backend="openai", base_url="http://127.0.0.1:9/v1", max_retries=1, extra=(("retry_base_s", 0.01),)
    )
    with pytest.raises(OpenAIServerError, match="failed after 2 attempts"):
        OpenAICompletionsEngine(config).generate([PROMPT], SamplingConfig(max_tokens=3))


def test_missing_base_url_is_a_clear_error():
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompletionsEngine(EngineConfig.embedded(backend="openai"))
