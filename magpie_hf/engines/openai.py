"""Client for the raw ``/v1/completions`` endpoint of an OpenAI-compatible server.

Magpie needs the raw completions endpoint (chat endpoints apply the template themselves, so they
cannot stop at the pre-query template). Works with ``vllm serve``, SGLang and the llama.cpp server.
Prompts are sent as token ids by default, so the server never adds a second BOS; set
``EngineConfig(extra=(("prompt_format", "text"),))`` for servers that only take text.

The API key is read from the environment variable named by ``EngineConfig.api_key_env`` and is
never logged. Requests run concurrently (``max_concurrency``) and are retried with exponential
backoff on 429, 5xx, timeouts and connection errors (``max_retries``).

Example:
    >>> from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
    >>> config = EngineConfig("meta-llama/Meta-Llama-3-8B-Instruct", backend="openai",
    ...                       base_url="http://127.0.0.1:8000/v1")
    >>> engine = load_engine(config)  # doctest: +SKIP
    >>> engine.generate(["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n"],
    ...                 SamplingConfig(max_tokens=64, n=2, seed=0))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from magpie_hf.engines.base import Completion, Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


@functools.lru_cache(maxsize=8)
def _load_tokenizer(name: str, gguf_file: str | None, revision: str | None, trust_remote_code: bool) -> Any:
    """Load (once per process) the tokenizer used to build prompts and count tokens."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(name, **kwargs)


class OpenAIServerError(RuntimeError):
    """The server rejected a request, or kept failing after every retry."""


class OpenAICompletionsEngine(Engine):
    """Generate through ``POST {base_url}/completions``.

    Options in ``EngineConfig.extra``: ``served_model_name`` (the ``model`` field sent; defaults to
    ``config.model``), ``prompt_format`` (``"token_ids"`` or ``"text"``), ``retry_base_s`` (first
    backoff delay, default 1 s), ``extra_body`` (a dict merged into every request).
    """

    name = "openai"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if not config.base_url:
            raise ValueError("The 'openai' engine needs EngineConfig.base_url, e.g. 'http://127.0.0.1:8000/v1'.")
        import requests

        options = dict(config.extra)
        self.url = config.base_url.rstrip("/") + "/completions"
        self.served_model_name = options.get("served_model_name", config.model)
        self.prompt_format = options.get("prompt_format", "token_ids")
        if self.prompt_format not in ("token_ids", "text"):
            raise ValueError(f"prompt_format must be 'token_ids' or 'text', got {self.prompt_format!r}")
        self.retry_base_s = float(options.get("retry_base_s", 1.0))
        self.extra_body = dict(options.get("extra_body", {}))

        self._tokenizer = _load_tokenizer(
            config.tokenizer or config.model,
            None if config.tokenizer else config.gguf_file,
            config.revision,
            config.trust_remote_code,
        )

        self._headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(config.api_key_env)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()
        self._requests = requests

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _session(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._requests.Session()
        return session

    def _body(self, prompt: str, sampling: SamplingConfig, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.served_model_name,
            "prompt": self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if self.prompt_format == "token_ids"
            else prompt,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "n": sampling.n,
        }
        if seed is not None:
            body["seed"] = seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        # server extensions (vLLM, SGLang, llama.cpp); only sent when used
        if sampling.stop_token_ids:
            body["stop_token_ids"] = list(sampling.stop_token_ids)
        if sampling.repetition_penalty != 1.0:
            body["repetition_penalty"] = sampling.repetition_penalty
        if sampling.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": sampling.json_schema}}
        body.update(self.extra_body)
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST one request, retrying transient failures with exponential backoff."""
        requests = self._requests
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            wait: float | None = None
            try:
                response = self._session().post(
                    self.url, json=body, headers=self._headers, timeout=self.config.timeout_s
                )
            except (requests.ConnectionError, requests.Timeout) as err:
                problem = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    return response.json()
                problem = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code not in RETRY_STATUS:
                    raise OpenAIServerError(f"{self.url} rejected the request ({problem}).")
                retry_after = response.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = float(retry_after)
            if attempt == attempts - 1:
                raise OpenAIServerError(f"{self.url} failed after {attempts} attempts; last error: {problem}")
            if wait is None:
                wait = min(self.retry_base_s * 2**attempt, 60.0) * (0.5 + random.random() / 2)
            logger.warning("Request to %s failed (%s); retry %d/%d in %.1fs", self.url, problem, attempt + 1, attempts - 1, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _completions(self, data: dict[str, Any], sampling: SamplingConfig) -> list[Completion]:
        choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != sampling.n:
            raise OpenAIServerError(f"{self.url} returned {len(choices)} choices, expected n={sampling.n}.")
        out = []
        for choice in choices:
            text = choice.get("text") or ""
            if choice.get("finish_reason") == "length":
                out.append(Completion(text, sampling.max_tokens, "length"))
            else:
                num_tokens = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
                out.append(Completion(text, num_tokens, "stop"))
        return out

    def _generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None, progress: Any
    ) -> list[list[Completion]]:
        # one seed per request: identical prompts (Magpie step 1) must not give identical samples
        bodies = [self._body(p, sampling, None if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
        results: list[list[Completion] | None] = [None] * len(bodies)
        workers = max(1, min(self.config.max_concurrency, len(bodies)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="magpie-openai") as pool:
            futures = {pool.submit(self._post, body): i for i, body in enumerate(bodies)}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = self._completions(future.result(), sampling)
                    if progress is not None:
                        for completion in results[i]:
                            progress(1, completion.num_tokens)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return results  # type: ignore[return-value]

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
