"""Transformers backend: CPU or GPU, batched with left padding, GGUF through ``gguf_file``.

Example:
    >>> from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
    >>> engine = load_engine(EngineConfig.embedded())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from magpie_hf.engines.base import Completion, Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig

logger = logging.getLogger(__name__)


def _truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
        if config.revision:
            kwargs["revision"] = config.revision
        tok_kwargs = dict(kwargs)
        if config.gguf_file:
            kwargs["gguf_file"] = config.gguf_file
            if not config.tokenizer:
                tok_kwargs["gguf_file"] = config.gguf_file
        self._tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, **tok_kwargs)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = config.dtype
        if dtype == "auto":
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, **kwargs).to(device).eval()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def generate(
        self, prompts: Sequence[str], sampling: SamplingConfig, *, progress: Any = None
    ) -> list[list[Completion]]:
        import torch

        expanded = [p for p in prompts for _ in range(sampling.n)]
        eos_ids = list(sampling.stop_token_ids) or [self._tokenizer.eos_token_id]
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        results: list[Completion] = []
        bs = self.config.batch_size
        for start in range(0, len(expanded), bs):
            chunk = expanded[start : start + bs]
            enc = self._tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            gen_kwargs: dict[str, Any] = {
                "max_new_tokens": sampling.max_tokens,
                "eos_token_id": eos_ids,
                "pad_token_id": self._tokenizer.pad_token_id,
                "repetition_penalty": sampling.repetition_penalty,
            }
            if sampling.greedy:
                gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if sampling.stop:
                gen_kwargs.update(stop_strings=list(sampling.stop), tokenizer=self._tokenizer)
            with torch.inference_mode():
                out = self.model.generate(**enc, **gen_kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            for row in new.tolist():
                tokens: list[int] = []
                stopped = False
                for t in row:
                    if t in eos_ids:
                        stopped = True
                        break
                    tokens.append(t)
                text = self._tokenizer.decode(tokens, skip_special_tokens=False)
                text, hit = _truncate_at_stop(text, sampling.stop)
                stopped = stopped or hit
                results.append(Completion(text, len(tokens), "stop" if stopped else "length"))
                if progress is not None:
                    progress(1, len(tokens))
        return [results[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
