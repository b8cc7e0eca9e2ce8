"""Text-generation backends behind one interface.

Example:
    >>> from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
    >>> engine = load_engine(EngineConfig.embedded())  # doctest: +SKIP
    >>> engine.generate(["Hello"], SamplingConfig(max_tokens=8, temperature=0))  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import importlib.util
import logging
from typing import Iterable

from magpie_hf.engines.base import Completion, Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Completion", "Engine", "EngineConfig", "SamplingConfig", "check_backend", "load_engine", "loaded_engine_configs",
    "resolve_backend", "release_engines",
]

# Engines stay loaded while consecutive pipeline stages use the same config.
_LOADED: dict[EngineConfig, Engine] = {}


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def check_backend(config: EngineConfig, backend: str) -> None:
    """Refuse, before anything loads, a config that ``backend`` cannot run.

    vLLM (0.34) has no GGUF loader any more (``vllm/model_executor/model_loader/__init__.py:33-66``
    lists the load formats; ``gguf`` is not one), so a GGUF file with ``backend="vllm"`` would fail
    deep inside vLLM's config parsing.
    """
    if backend == "vllm" and config.gguf_file:
        raise ValueError(
            f"vLLM cannot load GGUF weights ({config.gguf_file}): it has no GGUF loader. Use the transformers "
            "engine (backend='transformers', CLI --engine transformers), which dequantizes GGUF, or give vLLM "
            "a folder of safetensors weights (the original model, or the GGUF dequantized with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir, gguf_file=...).save_pretrained(out))."
        )


def resolve_backend(config: EngineConfig) -> str:
    """The concrete backend ``config`` asks for; ``auto`` picks vLLM when CUDA and vllm exist and the
    weights are not GGUF. This is the one place the ``auto`` rule lives.

    Raises:
        ValueError: the config asks for a backend that cannot run it (GGUF with vLLM).
    """
    if config.backend != "auto":
        check_backend(config, config.backend)
        return config.backend
    if config.base_url:
        choice, why = "openai", "a base_url was given"
    elif config.gguf_file is None and _cuda_available() and importlib.util.find_spec("vllm") is not None:
        choice, why = "vllm", "CUDA and vllm are available"
    else:
        reasons = []
        if not _cuda_available():
            reasons.append("no CUDA device")
        if importlib.util.find_spec("vllm") is None:
            reasons.append("vllm not installed")
        if config.gguf_file is not None:
            reasons.append("GGUF weights")
        choice, why = "transformers", ", ".join(reasons) or "default"
    logger.info("engine 'auto' chose %s for %s (%s)", choice, config.describe(), why)
    return choice


def load_engine(config: EngineConfig) -> Engine:
    """Load (or reuse an already loaded) engine for ``config``."""
    if config in _LOADED:
        return _LOADED[config]
    backend = resolve_backend(config)
    if backend == "transformers":
        from magpie_hf.engines.transformers import TransformersEngine as cls
    elif backend == "vllm":
        from magpie_hf.engines.vllm import VLLMEngine as cls
    elif backend == "openai":
        from magpie_hf.engines.openai import OpenAICompletionsEngine as cls
    else:
        raise ValueError(f"Unknown engine backend {config.backend!r}; choose auto, transformers, vllm or openai.")
    engine = cls(config)
    _LOADED[config] = engine
    return engine


def loaded_engine_configs() -> frozenset[EngineConfig]:
    """Configs of the engines loaded now."""
    return frozenset(_LOADED)


def release_engines(configs: Iterable[EngineConfig]) -> None:
    """Close the cached engines of ``configs``, freeing their memory."""
    for config in configs:
        engine = _LOADED.pop(config, None)
        if engine is not None:
            logger.info("releasing engine %s", config.describe())
            engine.close()
    gc.collect()
    if _cuda_available():
        import torch

        torch.cuda.empty_cache()
