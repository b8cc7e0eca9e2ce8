"""vLLM backend for GPUs: token-id prompts, prefix caching, ``n`` per prompt, tensor parallelism,
constrained JSON decoding.

Install with ``pip install magpie-hf[vllm]``. Written against vLLM 0.33 (``StructuredOutputsParams``);
older releases that only have ``GuidedDecodingParams`` are supported for JSON schemas too.

Example:
    >>> from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
    >>> engine = load_engine(EngineConfig("meta-llama/Meta-Llama-3-8B-Instruct", backend="vllm"))  # doctest: +SKIP
    >>> engine.generate(["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n"],
    ...                 SamplingConfig(max_tokens=64, n=4, seed=0))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from magpie_hf.engines.base import Completion, Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig

logger = logging.getLogger(__name__)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The 'vllm' engine needs vLLM and a CUDA GPU. Install it with: pip install 'magpie-hf[vllm]' "
            "(or choose backend='transformers' to run on CPU)."
        ) from err
    return vllm


class VLLMEngine(Engine):
    """Generate with ``vllm.LLM`` (offline batched inference on one or more GPUs)."""

    name = "vllm"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        vllm = _import_vllm()
        kwargs: dict[str, Any] = {
            "model": config.model,
            "tokenizer": config.tokenizer,
            "revision": config.revision,
            "dtype": config.dtype,
            "trust_remote_code": config.trust_remote_code,
            "tensor_parallel_size": config.tensor_parallel_size,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "enable_prefix_caching": config.enable_prefix_caching,
        }
        if config.max_model_len is not None:
            kwargs["max_model_len"] = config.max_model_len
        if config.quantization is not None:
            kwargs["quantization"] = config.quantization
        if config.gguf_file:
            # vLLM loads a local GGUF given as the model path; it needs the original tokenizer.
            from pathlib import Path

            kwargs["model"] = str(Path(config.model) / config.gguf_file)
        kwargs.update(dict(config.extra))
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        logger.info("Loading vLLM engine for %s (tensor_parallel_size=%d)", config.describe(), config.tensor_parallel_size)
        self.llm = vllm.LLM(**kwargs)
        self._tokenizer = self.llm.get_tokenizer()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

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
            kwargs.update(_structured_json(vllm, sampling.json_schema))
        return vllm.SamplingParams(**kwargs)

    def _generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None, progress: Any
    ) -> list[list[Completion]]:
        encoded = self._tokenizer(prompts, add_special_tokens=False)["input_ids"]
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        if seeds is None:
            params: Any = self.sampling_params(sampling)
        else:
            # one request per prompt with its own seed; vLLM seeds child j of a request with seed + j
            params = [self.sampling_params(sampling, seed) for seed in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=progress is None)
        results: list[list[Completion]] = []
        for request in outputs:
            completions = []
            for out in sorted(request.outputs, key=lambda o: o.index):
                num_tokens = len(out.token_ids)
                finish = "length" if out.finish_reason == "length" else "stop"
                # vLLM keeps the EOS / stop token id in token_ids (stop_reason None or int); we count text tokens
                if finish == "stop" and not isinstance(out.stop_reason, str) and num_tokens:
                    num_tokens -= 1
                completions.append(Completion(out.text, num_tokens, finish))
                if progress is not None:
                    progress(1, num_tokens)
            results.append(completions)
        return results

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        del llm
        try:  # free the GPU for the next stage's model
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # pragma: no cover - best effort, depends on the vLLM version
            logger.debug("vLLM cleanup failed", exc_info=True)


def _structured_json(vllm: Any, schema: dict) -> dict[str, Any]:
    """SamplingParams keyword for JSON-schema constrained decoding across vLLM versions."""
    params_cls = getattr(vllm.sampling_params, "StructuredOutputsParams", None)
    if params_cls is not None:  # vLLM >= 0.11
        return {"structured_outputs": params_cls(json=schema)}
    params_cls = getattr(vllm.sampling_params, "GuidedDecodingParams", None)
    if params_cls is not None:  # older vLLM
        return {"guided_decoding": params_cls(json=schema)}
    raise RuntimeError("This vLLM version has no structured-output support; upgrade vLLM.")
