"""OpenAI-compatible servers through the official ``openai`` SDK: raw ``/v1/completions`` and ``/v1/chat/completions``.

Two backends share one request machinery:

- ``openai`` (:class:`OpenAICompletionsEngine`): raw ``/v1/completions``. Magpie step 1 needs it: the
  model continues the raw pre-query template, which a chat endpoint cannot do (it applies the template
  itself). Prompts go out as token ids by default, so the server never adds a second BOS; set
  ``EngineConfig(extra=(("prompt_format", "text"),))`` for servers that only take text.
- ``openai-chat`` (:class:`OpenAIChatEngine`): ``/v1/chat/completions`` for the steps that answer or judge
  conversations (:meth:`~magpie_hf.engines.base.Engine.generate_chat`): responses, judges, guards,
  rewards. Works with hosted APIs and with models we have no tokenizer for (``tokenizer`` is None unless
  ``EngineConfig.tokenizer`` names one).

Written against ``vllm serve`` (vLLM 0.34), SGLang and llama.cpp's ``llama-server``; see the README's
"Engines" section for how to start each. What the engines do for you:

- **Retries, timeouts, Retry-After**: the SDK's (``max_retries``, ``timeout_s``; 408/409/429/5xx, timeouts
  and connection errors are retried with backoff, a ``Retry-After``/``retry-after-ms`` header is
  honoured). A server that still fails stops the call with :class:`OpenAIServerError` naming the URL.
- **One row's failure is that row's**: a 400/422 for one request (a prompt longer than the context, say)
  becomes :meth:`Completion.failed` with the server's message for that prompt's samples; the other
  prompts proceed. When *every* request of a call is refused, the settings are wrong, not the rows, and
  the call fails.
- **n split over requests**: ``n`` samples of a prompt are asked ``max_n_per_request`` at a time; a request
  starting at sample ``j`` carries ``seed + j`` (the contract: sample ``j`` of a prompt draws from
  ``seed + j``, the rule vLLM applies to the children of a request). A server that answers ``n > 1``
  with fewer choices (it ignores ``n``) or refuses it (llama.cpp: "Only one completion choice is
  allowed", or more than its ``-np`` slots) is detected, logged once, and asked one sample per request
  from then on.
- **Every sampling field is sent**: temperature, top_p, presence/frequency penalty 0, seed, stop and
  max_tokens, and (``sampling_extensions=True``) top_k disabled, min_p 0, repetition_penalty and
  stop_token_ids through the SDK's ``extra_body``, so no server default (vLLM's model
  ``generation_config``, llama.cpp's top_k=40/min_p=0.05) changes the sampling silently.
- **Regex constraints** (``SamplingConfig.regex``, the guard's verdict format) go out in every server's own
  field at once, and each server reads its own and ignores the others: ``structured_outputs: {"regex": ...}``
  (vLLM 0.34: ``vllm/entrypoints/openai/completion/protocol.py:133``; its old ``guided_regex`` is
  ignored now, ``vllm/entrypoints/serve/engine/protocol.py:21-34``), ``regex`` (SGLang's
  ``CompletionRequest``/``ChatCompletionRequest``, ``python/sglang/srt/entrypoints/openai/protocol.py``)
  and ``grammar``, the pattern written as GBNF (llama.cpp's server and llama-cpp-python's;
  :func:`magpie_hf.engines.constrained.regex_to_gbnf`). A hosted API (``sampling_extensions=False``) takes none
  of them, and the request is refused before it is sent.
- **First-step logits rules** (``SamplingConfig.first_token_banned_ids``/``first_token_temperature_scale``)
  have no request field on any of these servers: :meth:`Engine.generate` refuses them here, and
  :class:`~magpie_hf.steps.MagpieInstructions` turns ``no_markdown_start`` into a filter that drops and
  counts queries opening with ``#`` on these engines.
- **The API key** is read from the environment variable named by ``EngineConfig.api_key_env`` and is never
  logged or stored; without it a placeholder is sent (servers started without a key ignore it).
- **Concurrency**: at most ``max_concurrency`` requests in flight.

Options in ``EngineConfig.extra``: ``served_model_name`` (the ``model`` field sent; defaults to
``config.model``), ``prompt_format`` (``"token_ids"`` or ``"text"``, completions only), ``extra_body`` (a
dict merged into every request, last, so it can also override a field we send: e.g.
``{"chat_template_kwargs": {"enable_thinking": False}}`` for vLLM/SGLang chat servers, ``{"top_k": 0}`` for
llama-cpp-python's server, which refuses ``top_k=-1``), ``response_format`` (``"json_schema"``, the
default, or ``"json_object"`` for llama-cpp-python's server).

Example:
    >>> from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
    >>> config = EngineConfig("meta-llama/Meta-Llama-3-8B-Instruct", backend="openai",
    ...                       base_url="http://127.0.0.1:8000/v1", max_n_per_request=8)
    >>> engine = load_engine(config)  # doctest: +SKIP
    >>> engine.generate(["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n"],
    ...                 SamplingConfig(max_tokens=64, n=2, seed=0))  # doctest: +SKIP
    >>> chat = load_engine(EngineConfig("gpt-4o-mini", backend="openai-chat", base_url="https://api.openai.com/v1",
    ...                                 sampling_extensions=False))  # doctest: +SKIP
    >>> chat.generate_chat([[{"role": "user", "content": "Name a fruit."}]], SamplingConfig(max_tokens=16))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from magpie_hf.engines.base import Completion, Engine, FinishReason, SamplingConfig
from magpie_hf.engines.config import EngineConfig
from magpie_hf.errors import OpenAIServerError
from magpie_hf.utils.redaction import redact

if TYPE_CHECKING:
    from magpie_hf.templates import ChatTemplates

logger = logging.getLogger(__name__)

#: sent as the API key when its environment variable is unset: the SDK needs one, and servers started
#: without ``--api-key`` ignore it (vLLM's docs use the same placeholder)
NO_KEY = "EMPTY"
#: how much of a server's error message a failed completion keeps
MAX_REASON_CHARS = 300
#: ``top_k`` that means "disabled" to vLLM (vLLM 0.34 vllm/sampling_params.py:684 "quietly accept -1 as
#: disabled"), SGLang (-1 = whole vocabulary in python/sglang/srt/sampling/sampling_params.py
#: ``SamplingParams.__post_init__``; its ``verify`` refuses 0) and llama.cpp (src/llama-sampler.cpp
#: ``llama_sampler_top_k_impl`` returns at once for ``k <= 0``)
TOP_K_DISABLED = -1
_UNKNOWN = object()


#: query parameters of a base URL that hold a key (moved to the Authorization header)
_KEY_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token", "auth"})
#: how much of an unexpected body an error quotes
BODY_START_CHARS = 200


def split_credentials(url: str) -> tuple[str, str | None, dict[str, str]]:
    """``url`` without credentials, the key it carried (``user:KEY@host``, ``KEY@host`` or ``?api_key=KEY``),
    and its other query parameters (sent with every request).

    Example:
        >>> split_credentials("http://me:sk-123@127.0.0.1:8000/v1?api_key=sk-456&team=a")
        ('http://127.0.0.1:8000/v1', 'sk-123', {'team': 'a'})
        >>> split_credentials("http://127.0.0.1:8000/v1")
        ('http://127.0.0.1:8000/v1', None, {})
    """
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(url)
    key = None
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower() in _KEY_PARAMS:
            key = key or value
        else:
            query[name] = value
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        key = password or user or key
    return urlunsplit((parts.scheme, netloc, parts.path, "", parts.fragment)), key, query


def _start(text: str) -> str:
    text = " ".join(text.split())
    return repr(text[:BODY_START_CHARS] + ("..." if len(text) > BODY_START_CHARS else ""))


def _check_json(response: Any, url: str) -> Any:
    """The JSON body of a reply; one that is not JSON (an HTML login page, a proxy's error text) is refused,
    naming the URL and the start of the body."""
    import json

    text = response.text
    try:
        return json.loads(text)
    except ValueError:
        kind = response.headers.get("content-type", "no content type")
        raise OpenAIServerError(
            f"{url} answered HTTP {response.status_code} with something that is not JSON ({kind}): {_start(text)}. "
            "Is --base_url the OpenAI-compatible address of the server (e.g. http://HOST:8000/v1)?"
        ) from None


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


@dataclass(frozen=True)
class _Part:
    """One request: samples ``start .. start + n - 1`` of item ``item`` (a prompt or a conversation)."""

    item: int
    start: int
    n: int


@dataclass(frozen=True)
class _Choice:
    text: str
    finish_reason: str | None


def _finish(reason: str | None) -> tuple[FinishReason, str | None]:
    """Our finish reason for a server's: ``stop`` and ``length`` are themselves; anything else (OpenAI's
    ``content_filter``, vLLM/SGLang's ``abort``, ``tool_calls``) is not a normal end: ``abort`` + why."""
    if reason in ("stop", "length"):
        return reason, None  # type: ignore[return-value]
    return "abort", f"the server ended this completion with finish_reason={reason!r}"


def _share(total: int, weights: list[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder; equal shares when all are 0)."""
    if not weights:
        return []
    if sum(weights) == 0:
        weights = [1] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])[: total - sum(shares)]:
        shares[i] += 1
    return shares


class _OpenAIEngine(Engine):
    """What the completions and chat engines share: the SDK client, request planning, errors, counts."""

    #: path under ``base_url`` the engine posts to
    endpoint: str = ""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if not config.base_url:
            raise ValueError(
                f"The {self.name!r} engine needs EngineConfig.base_url, e.g. 'http://127.0.0.1:8000/v1'."
            )
        try:
            import openai
        except ImportError as err:  # pragma: no cover - a dependency of magpie-hf
            raise ImportError("The OpenAI-compatible engines need the openai SDK: pip install 'openai>=1.55.3'") from err
        self._errors = openai
        # credentials written into the URL (user:key@host, ?api_key=...) go to the Authorization header, so the
        # URL the HTTP client sends and logs carries none
        base_url, url_key, query = split_credentials(config.base_url)
        self.base_url = base_url
        self.url = base_url.rstrip("/") + "/" + self.endpoint
        self.shown_url = redact(self.url)  # what messages and logs name (no credentials in a URL)
        self.served_model_name = config.option("served_model_name", config.model)
        extra_body = config.option("extra_body") or {}
        if not isinstance(extra_body, dict):
            raise TypeError(f"EngineConfig extra option 'extra_body' must be a dict, got {type(extra_body).__name__}.")
        self.extra_body: dict[str, Any] = dict(extra_body)
        self.response_format = config.option("response_format", "json_schema")
        if self.response_format not in ("json_schema", "json_object"):
            raise ValueError(f"response_format must be 'json_schema' or 'json_object', got {self.response_format!r}")
        # the key goes to the SDK client only: never to a log, a config record or an error message
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=url_key or os.environ.get(config.api_key_env) or NO_KEY,
            default_query=query or None,
            max_retries=config.max_retries,
            timeout=config.timeout_s,
        )
        self._tokenizer: Any = None
        #: samples per request; lowered to 1 (once, logged) when the server shows it cannot serve n > 1
        self._n_limit: int | None = config.max_n_per_request
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._context_length: Any = _UNKNOWN
        #: the server's ``/models`` answer (None when it has none), read once by :meth:`_check_server`
        self._models: dict[str, Any] | None = None
        self._check_server()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    #: seconds the start-up check waits for ``GET {base_url}/models`` (twice at most)
    PROBE_TIMEOUT_S = 30.0

    def _check_server(self) -> None:
        """Ask the server for ``/models`` once at start, so a wrong URL, a server that is down or silent, or one
        that answers with something other than JSON (a proxy's HTML page) fails now, in a minute at most,
        naming the URL; an HTTP error status is left to the requests (some servers have no ``/models``)."""
        url = redact(self.base_url.rstrip("/") + "/models")
        client = self._client.with_options(max_retries=1, timeout=min(self.PROBE_TIMEOUT_S, self.config.timeout_s))
        try:
            raw = client.models.with_raw_response.list()
        except self._errors.APIStatusError as err:
            logger.debug("%s answered HTTP %s; the requests will tell", url, err.status_code)
            return
        except self._errors.APIConnectionError as err:  # APITimeoutError included
            raise OpenAIServerError(
                f"{url} did not answer ({type(err).__name__}: {err}) after 2 attempts. Is the server running and "
                f"reachable at --base_url {redact(self.base_url)}? (A slow server: raise --request_timeout.)"
            ) from None
        body = _check_json(raw.http_response, url)
        self._models = body if isinstance(body, dict) else None

    def _parsed(self, raw: Any) -> Any:
        """The SDK object of a raw response, after checking that the body is JSON (else an error naming the URL
        and the start of the body, instead of the SDK handing back a string)."""
        _check_json(raw.http_response, self.shown_url)
        response = raw.parse()
        if not hasattr(response, "choices"):
            raise OpenAIServerError(f"{self.shown_url} answered with JSON that is no completion: "
                                    f"{_start(raw.http_response.text)}")
        return response

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ server facts
    def context_length(self) -> int | None:
        """``max_model_len`` from the server's ``/v1/models`` (vLLM 0.34 vllm/entrypoints/serve/engine/protocol.py:112
        ``ModelCard.max_model_len``; SGLang's ``ModelCard`` has it too), else None."""
        if self._context_length is _UNKNOWN:
            value = None
            cards = [c for c in (self._models or {}).get("data") or [] if isinstance(c, dict)]
            for card in cards:
                if card.get("id") == self.served_model_name or len(cards) == 1:
                    value = card.get("max_model_len")
                    break
            self._context_length = int(value) if isinstance(value, int) and value > 0 else None
        return self._context_length

    # ------------------------------------------------------------------ request bodies
    def _sampling_fields(self, sampling: SamplingConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """(standard OpenAI fields, ``extra_body``) for ``sampling``: every field explicit.

        A field a request leaves out takes the server's default: vLLM fills it from the model's
        ``generation_config.json`` (vLLM 0.34 vllm/entrypoints/openai/completion/protocol.py:372, "user ->
        server default -> OpenAI default"), llama.cpp from its command line (top_k 40, min_p 0.05 unless
        ``--top-k``/``--min-p``; tools/server/server-task.cpp ``params_from_json_cmpl``).
        """
        fields: dict[str, Any] = {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "stop": list(sampling.stop) or None,
        }
        extra: dict[str, Any] = {}
        if self.config.sampling_extensions:
            extra = {
                "top_k": TOP_K_DISABLED,
                "min_p": 0.0,
                # vLLM and SGLang name it repetition_penalty (vLLM 0.34
                # vllm/entrypoints/openai/completion/protocol.py:80, chat_completion/protocol.py:291; SGLang
                # python/sglang/srt/entrypoints/openai/protocol.py CompletionRequest), llama.cpp
                # repeat_penalty (tools/server/server-task.cpp params_from_json_cmpl); each server ignores
                # the other's name (vLLM's OpenAIBaseModel has extra="allow" and only logs extra fields at
                # debug level, vllm/entrypoints/serve/engine/protocol.py:39; SGLang's pydantic models ignore
                # them; llama.cpp copies unknown fields through, server-common.cpp
                # oaicompat_completion_params_parse)
                "repetition_penalty": sampling.repetition_penalty,
                "repeat_penalty": sampling.repetition_penalty,
                "stop_token_ids": list(sampling.stop_token_ids),
            }
        elif sampling.repetition_penalty != 1.0:
            raise ValueError(
                f"repetition_penalty={sampling.repetition_penalty} is a server extension, and this engine has "
                "sampling_extensions=False (a hosted API refuses it). Use repetition_penalty=1.0, or "
                "EngineConfig(sampling_extensions=True) for vLLM, SGLang or llama.cpp."
            )
        elif sampling.stop_token_ids:
            self._warn_once(
                "stop_token_ids",
                "%s: sampling_extensions=False, so stop_token_ids %s are not sent; the server's own end of "
                "turn and the stop strings end completions",
                self.shown_url,
                list(sampling.stop_token_ids),
            )
        return fields, {**extra, **self.extra_body}

    def _regex_fields(self, regex: str) -> dict[str, Any]:
        """The regex constraint in the fields vLLM, SGLang and llama.cpp read (see the module docstring)."""
        if not self.config.sampling_extensions:
            raise ValueError(
                f"A regex constraint is a server extension, and the engine {self.config.describe()!r} has "
                "sampling_extensions=False (a hosted API takes none). Use vLLM, SGLang or llama.cpp with "
                "EngineConfig(sampling_extensions=True), or backend='transformers'/'vllm'."
            )
        from magpie_hf.engines.constrained import regex_to_gbnf

        return {"structured_outputs": {"regex": regex}, "regex": regex, "grammar": regex_to_gbnf(regex)}

    def _response_format(self, schema: dict) -> dict[str, Any]:
        """How a JSON schema is asked for: OpenAI's ``json_schema`` form (OpenAI, vLLM, SGLang, llama-server),
        or ``{"type": "json_object", "schema": ...}`` (llama-cpp-python's server takes only this form; the
        llama.cpp server reads it too, server-common.cpp ``oaicompat_chat_params_parse``)."""
        if self.response_format == "json_object":
            return {"type": "json_object", "schema": schema}
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}

    # ------------------------------------------------------------------ the request machinery
    def _run(
        self, items: Sequence[Any], sampling: SamplingConfig, seeds: list[int] | None, progress: Any
    ) -> list[list[Completion]]:
        """Sample ``sampling.n`` completions of every item, ``_n_limit`` per request, in item order."""
        n = sampling.n
        if sampling.regex is not None:
            self._regex_fields(sampling.regex)  # a regex the servers cannot take is refused before any request
        results: list[list[Completion | None]] = [[None] * n for _ in items]

        def run(part: _Part) -> list[Completion]:
            seed = None if seeds is None else seeds[part.item] + part.start
            return self._sample(items[part.item], part.n, seed, sampling)

        workers = max(1, min(self.config.max_concurrency, len(items) * n))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"magpie-{self.name}") as pool:
            pending: dict[Future, _Part] = {}

            def submit(item: int, start: int, stop: int) -> None:
                for part in self._plan(item, start, stop):
                    pending[pool.submit(run, part)] = part

            for i in range(len(items)):
                submit(i, 0, n)
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        part = pending.pop(future)
                        got = future.result()
                        results[part.item][part.start : part.start + len(got)] = got
                        if progress is not None:
                            for completion in got:
                                progress(1, completion.num_tokens)
                        if len(got) < part.n:  # the server gave fewer: ask for the rest at the new limit
                            submit(part.item, part.start + len(got), part.start + part.n)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
        flat = [c for row in results for c in row]
        if len(items) > 1 and all(c is not None and c.finish_reason == "error" for c in flat):
            raise OpenAIServerError(
                f"{self.shown_url} refused every request of this call, so the engine settings are at fault, not the "
                f"rows. First refusal: {flat[0].error}. Check the model name (served_model_name), and for a "
                "server that refuses top_k/min_p/repetition_penalty/stop_token_ids set "
                "EngineConfig(sampling_extensions=False)."
            )
        return results  # type: ignore[return-value]

    def _plan(self, item: int, start: int, stop: int) -> list[_Part]:
        """Requests for samples ``start .. stop - 1`` of ``item``, at most ``_n_limit`` samples each."""
        limit = self._n_limit or (stop - start)
        return [_Part(item, s, min(limit, stop - s)) for s in range(start, stop, limit)]

    def _sample(self, item: Any, n: int, seed: int | None, sampling: SamplingConfig) -> list[Completion]:
        """Up to ``n`` completions of one item (the first ones, in order) from one request.

        Fewer than ``n`` means the server cannot serve ``n`` at once: the caller asks for the rest.
        """
        try:
            choices, usage_tokens = self._request(item, n, seed, sampling)
        except (self._errors.BadRequestError, self._errors.UnprocessableEntityError) as err:
            reason = self._reason(err)
            if n == 1:
                return [Completion.failed(reason)]
            # refused n > 1 (llama.cpp: one choice per request, or more than its -np slots), or the prompt
            # itself: one sample alone tells which
            first = self._sample(item, 1, seed, sampling)
            if first[0].finish_reason == "error":
                return [Completion.failed(first[0].error or reason)] * n
            self._lower_n_limit(f"refused a request for n={n} ({reason})")
            return first
        except self._errors.APIStatusError as err:
            raise OpenAIServerError(self._fatal_message(err, n)) from None
        except self._errors.APIConnectionError as err:
            raise OpenAIServerError(
                f"{self.shown_url} failed after {self.config.max_retries + 1} attempts; last error: "
                f"{type(err).__name__}: {err}. Is the server running and reachable at base_url="
                f"{redact(self.config.base_url)!r}?"
            ) from None
        if len(choices) > n:
            raise OpenAIServerError(f"{self.shown_url} returned {len(choices)} choices for n={n}.")
        if not choices:
            raise OpenAIServerError(f"{self.shown_url} returned no choices for a request of n={n}.")
        if len(choices) < n:
            self._lower_n_limit(f"returned {len(choices)} choice(s) for n={n}")
        return self._completions(choices, usage_tokens, sampling)

    def _lower_n_limit(self, what: str) -> None:
        with self._lock:
            first = self._n_limit != 1
            self._n_limit = 1
        if first:
            logger.warning(
                "%s %s: it does not serve n > 1 per request, so every sample is now asked for in its own "
                "request (seed + j for sample j). Set EngineConfig(max_n_per_request=N) to the server's "
                "parallel slots (llama-server -np N) to skip this probe.",
                self.shown_url,
                what,
            )

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message, *args)

    def _reason(self, err: Any) -> str:
        """``HTTP 400 from URL: <the server's message>`` (truncated) for a refused request."""
        body = err.body
        message = body.get("message") if isinstance(body, dict) else body if isinstance(body, str) else None
        text = str(message or err.message)
        if len(text) > MAX_REASON_CHARS:
            text = text[:MAX_REASON_CHARS] + "..."
        return f"HTTP {err.status_code} from {self.shown_url}: {text}"

    def _fatal_message(self, err: Any, n: int) -> str:
        status = err.status_code
        reason = self._reason(err)
        if status in (408, 409, 429) or status >= 500:
            message = f"{self.shown_url} failed after {self.config.max_retries + 1} attempts; last error: {reason}"
            if n > 1:
                message += (
                    f" (the request asked for n={n}; a server that cannot serve that many at once needs "
                    "EngineConfig(max_n_per_request=...))"
                )
            return message
        hint = {
            401: f"check the API key in the environment variable {self.config.api_key_env!r}",
            403: f"check the API key in the environment variable {self.config.api_key_env!r}",
            404: f"check base_url={redact(self.config.base_url)!r} and the model name {self.served_model_name!r}",
        }.get(status, "check the engine settings")
        return f"{self.shown_url} rejected the request ({reason}); {hint}."

    def _completions(self, choices: list[_Choice], usage_tokens: int | None, sampling: SamplingConfig) -> list[Completion]:
        counts = self._token_counts(choices, usage_tokens, sampling.max_tokens)
        out = []
        for choice, count in zip(choices, counts):
            finish, error = _finish(choice.finish_reason)
            out.append(Completion(choice.text, count, finish, error))
        return out

    def _token_counts(self, choices: list[_Choice], usage_tokens: int | None, max_tokens: int) -> list[int]:
        """Generated tokens per choice: the tokenizer's count of its text when there is a tokenizer, else
        the response's ``usage`` (a choice cut by ``max_tokens`` has ``max_tokens``; the other choices of a
        multi-choice response share the rest of ``usage.completion_tokens`` by text length, as the API
        reports only the total)."""
        if self._tokenizer is not None:
            with self._lock:  # requests finish on worker threads; a fast tokenizer is not safe to share
                return [
                    max_tokens if c.finish_reason == "length" else len(self._tokenizer(c.text, add_special_tokens=False)["input_ids"])
                    for c in choices
                ]
        counts = [max_tokens if c.finish_reason == "length" else None for c in choices]
        if usage_tokens is None:
            self._warn_once("usage", "%s reports no usage; token counts of its completions are 0", self.shown_url)
            return [c or 0 for c in counts]
        rest = [i for i, c in enumerate(counts) if c is None]
        left = max(usage_tokens - sum(c for c in counts if c is not None), 0)
        for i, share in zip(rest, _share(left, [len(choices[i].text) for i in rest])):
            counts[i] = share
        return counts  # type: ignore[return-value]

    def _request(self, item: Any, n: int, seed: int | None, sampling: SamplingConfig) -> tuple[list[_Choice], int | None]:
        """Send one request for ``n`` samples of ``item``; return its choices (by index) and usage tokens."""
        raise NotImplementedError

    @staticmethod
    def _usage_tokens(response: Any) -> int | None:
        usage = getattr(response, "usage", None)
        value = getattr(usage, "completion_tokens", None)
        return int(value) if isinstance(value, int) else None


class OpenAICompletionsEngine(_OpenAIEngine):
    """Generate through ``POST {base_url}/completions`` (raw text: every step, Magpie step 1 included)."""

    name = "openai"
    endpoint = "completions"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.prompt_format = config.option("prompt_format", "token_ids")
        if self.prompt_format not in ("token_ids", "text"):
            raise ValueError(f"prompt_format must be 'token_ids' or 'text', got {self.prompt_format!r}")
        self._tokenizer = _load_tokenizer(
            config.tokenizer or config.model,
            None if config.tokenizer else config.gguf_file,
            config.revision,
            config.trust_remote_code,
        )
        from magpie_hf.templates import tokenizer_adds_bos

        #: the BOS text a text prompt starts with that the server adds again itself (None: nothing to drop)
        self._server_bos = self._tokenizer.bos_token if tokenizer_adds_bos(self._tokenizer) else None

    def _generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None, progress: Any
    ) -> list[list[Completion]]:
        if self.prompt_format == "token_ids":
            # token ids: the server adds no BOS of its own (llama.cpp adds one to string prompts only,
            # tools/server/README.md `prompt`; vLLM's add_special_tokens applies to text)
            payloads: list[Any] = list(self._tokenizer(prompts, add_special_tokens=False)["input_ids"])
        else:
            # servers tokenize text with the model's special tokens: vLLM's add_special_tokens=True default
            # (completion/protocol.py:118), llama-cpp-python's BOS when the GGUF's add_bos_token says so
            # (llama_cpp/llama.py:1243-1248 in 0.3.36), so the BOS text our prompts carry would come twice
            bos = self._server_bos
            payloads = [p[len(bos) :] if bos and p.startswith(bos) else p for p in prompts]
        return self._run(payloads, sampling, seeds, progress)

    def _request(self, item: Any, n: int, seed: int | None, sampling: SamplingConfig) -> tuple[list[_Choice], int | None]:
        fields, extra_body = self._sampling_fields(sampling)
        if sampling.json_schema is not None:
            # vLLM and SGLang take response_format on /v1/completions too (vLLM 0.34
            # vllm/entrypoints/openai/completion/protocol.py:125; SGLang CompletionRequest.response_format);
            # llama.cpp reads it on /v1/chat/completions only (server-common.cpp oaicompat_chat_params_parse)
            extra_body = {"response_format": self._response_format(sampling.json_schema), **extra_body}
        elif sampling.regex is not None:
            extra_body = {**self._regex_fields(sampling.regex), **extra_body}
        response = self._parsed(self._client.completions.with_raw_response.create(
            model=self.served_model_name,
            prompt=item,
            max_tokens=sampling.max_tokens,
            n=n,
            seed=seed,
            extra_body=extra_body,
            **fields,
        ))
        choices = sorted(response.choices or [], key=lambda c: c.index or 0)
        return [_Choice(c.text or "", c.finish_reason) for c in choices], self._usage_tokens(response)


class OpenAIChatEngine(_OpenAIEngine):
    """Answer conversations through ``POST {base_url}/chat/completions``; the server applies the template.

    Only :meth:`generate_chat` is available: raw prompts (Magpie step 1, base-model prompts) need
    :class:`OpenAICompletionsEngine`. ``tokenizer`` is the one ``EngineConfig.tokenizer`` names (used to
    count tokens), else None.
    """

    name = "openai-chat"
    endpoint = "chat/completions"
    raw_prompts = False

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if config.tokenizer:
            self._tokenizer = _load_tokenizer(config.tokenizer, None, config.revision, config.trust_remote_code)

    def generate_chat(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        sampling: SamplingConfig,
        *,
        templates: "ChatTemplates | None" = None,
        seeds: Sequence[int] | None = None,
        progress: Any = None,
    ) -> list[list[Completion]]:
        """Send each conversation's messages as they are (with ``templates.system_prompt`` put first when
        the step has one and the conversation has no system message)."""
        system = getattr(templates, "system_prompt", None)
        messages = []
        for conversation in conversations:
            conversation = [dict(m) for m in conversation]
            if system is not None and not (conversation and conversation[0].get("role") == "system"):
                conversation.insert(0, {"role": "system", "content": system})
            messages.append(conversation)
        return self.generate(messages, sampling, seeds=seeds, progress=progress)  # type: ignore[arg-type]

    def _generate(
        self, prompts: list[Any], sampling: SamplingConfig, seeds: list[int] | None, progress: Any
    ) -> list[list[Completion]]:
        if any(isinstance(p, str) for p in prompts):
            raise TypeError(
                "The 'openai-chat' engine answers conversations (generate_chat with lists of messages); raw "
                "text prompts need the completions engine: EngineConfig(backend='openai') against /v1/completions."
            )
        return self._run(prompts, sampling, seeds, progress)

    def _request(self, item: Any, n: int, seed: int | None, sampling: SamplingConfig) -> tuple[list[_Choice], int | None]:
        fields, extra_body = self._sampling_fields(sampling)
        if self.config.sampling_extensions:
            # llama.cpp reads max_tokens (or n_predict), not max_completion_tokens (server-task.cpp
            # params_from_json_cmpl); vLLM takes either (chat_completion/protocol.py:246-251)
            fields["max_tokens"] = sampling.max_tokens
        else:
            # hosted APIs: max_tokens is deprecated there and refused by reasoning models
            fields["max_completion_tokens"] = sampling.max_tokens
        if sampling.json_schema is not None:
            fields["response_format"] = self._response_format(sampling.json_schema)
        elif sampling.regex is not None:
            extra_body = {**self._regex_fields(sampling.regex), **extra_body}
        response = self._parsed(self._client.chat.completions.with_raw_response.create(
            model=self.served_model_name,
            messages=item,
            n=n,
            seed=seed,
            extra_body=extra_body,
            **fields,
        ))
        choices = sorted(response.choices or [], key=lambda c: c.index or 0)
        return [_Choice((c.message.content if c.message else None) or "", c.finish_reason) for c in choices], (
            self._usage_tokens(response)
        )
