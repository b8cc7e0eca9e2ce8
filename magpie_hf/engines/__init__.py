"""Text-generation backends behind one interface.

Example:
    >>> from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
    >>> engine = load_engine(EngineConfig.embedded())  # doctest: +SKIP
    >>> engine.generate(["Hello"], SamplingConfig(max_tokens=8, temperature=0))  # doctest: +SKIP
"""

from __future__ import annotations

from magpie_hf.engines.base import Completion, Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig
from magpie_hf.engines.loading import (
    check_backend,
    engine_died,
    engine_resources,
    load_engine,
    loaded_engine_configs,
    release_engines,
    resolve_backend,
    vllm_batch_invariant,
)

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "SamplingConfig",
    "check_backend",
    "engine_died",
    "engine_resources",
    "load_engine",
    "loaded_engine_configs",
    "release_engines",
    "resolve_backend",
    "vllm_batch_invariant",
]
