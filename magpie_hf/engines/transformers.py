"""Transformers backend: CPU or GPU, batched with left padding, GGUF through ``gguf_file``.

Decoding runs in a small continuous-batching loop over a KV cache instead of ``model.generate``:
finished rows leave the batch at once and their slots are refilled with waiting prompts, each
distinct prompt text is prefilled once per admission and its cache copied to all rows that share it
(every Magpie step-1 prompt is the same pre-query template), and stop strings are checked on the
decoded tail of each row only. Models whose cache is not a plain full-attention ``DynamicCache``
(sliding-window or hybrid layers) fall back to batched ``model.generate``. A
``SamplingConfig.json_schema`` or ``SamplingConfig.regex`` constrains every row in both paths
(:mod:`magpie_hf.engines.constrained`, llguidance), and the first-step rules
(``first_token_banned_ids``, ``first_token_temperature_scale``) change the logits of each row's
first generated token only (:class:`_FirstTokenRule`).

Sampling is per completion in both paths: the ``j``-th sample of prompt ``i`` draws its noise from
its own ``torch.Generator`` seeded ``seeds[i] + j`` (:class:`_RowSampler`), so a row gives the same
text whichever rows share its batch, and a row can be re-drawn alone from its recorded seed. A
completion stops with ``"length"`` at ``max_tokens`` or where the model's context ends
(:meth:`TransformersEngine.context_length`, ``EngineConfig.max_model_len`` overrides it).

Example:
    >>> from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
    >>> engine = load_engine(EngineConfig.embedded())  # doctest: +SKIP
    >>> engine.generate(["<|im_start|>user\\n"], SamplingConfig(max_tokens=16, n=2, seed=0))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from transformers import LogitsProcessor

from magpie_hf.engines.base import Completion, Engine, SamplingConfig, count_text_tokens
from magpie_hf.engines.config import EngineConfig

logger = logging.getLogger(__name__)


def _truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class _Row:
    """One completion being decoded (a prompt index and its sample number)."""

    slot: int  # index into the flat list of requested completions
    prompt: int  # index into the list of distinct prompt token lists
    limit: int  # most tokens this completion may generate (max_tokens, or less near the context end)
    generator: Any = None  # the completion's own torch.Generator (seeds[i] + j), None when unseeded
    tokens: list[int] = field(default_factory=list)
    grammar: Any = None  # grammar state (GrammarRowState) when decoding is constrained (JSON schema, regex)


class _RowSampler:
    """Samples one token per row, each row from its own random stream.

    A seeded row draws its noise from its own ``torch.Generator`` (seeded ``seeds[i] + j``): one
    ``exponential_`` call per row and step on a preallocated buffer, so its tokens do not depend on
    which other rows share the batch (a row re-drawn alone gives the same text). Unseeded rows
    share one call on the global generator.
    """

    def __init__(self, sampling: SamplingConfig) -> None:
        from transformers.generation.logits_process import TopPLogitsWarper

        self.temperature = sampling.temperature
        self.top_p = TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1 else None
        self._noise: Any = None  # [rows, vocab] buffer, grown as needed

    def choose(self, scores: Any, generators: Sequence[Any]) -> Any:
        """Next token of every row of ``scores`` (float32 ``[rows, vocab]``, already penalised/masked)."""
        import torch

        scores = scores / self.temperature
        if self.top_p is not None:
            scores = self.top_p(None, scores)
        probs = torch.softmax(scores, dim=-1)
        rows, vocab = probs.shape
        if self._noise is None or self._noise.shape[0] < rows or self._noise.shape[1] != vocab:
            self._noise = torch.empty((rows, vocab), dtype=torch.float32, device=probs.device)
        noise = self._noise[:rows]
        if all(g is None for g in generators):
            noise.exponential_(1.0)
        else:
            for r, generator in enumerate(generators):
                noise[r].exponential_(1.0, generator=generator)
        # exponential race: argmax(p / E) with E ~ Exp(1) samples from p, faster than multinomial
        return (probs / noise).argmax(dim=-1)


class _FirstTokenRule:
    """``SamplingConfig``'s first-step rules, applied to the rows about to choose their first token.

    Banned ids get ``-inf`` and the row's logits are divided by ``first_token_temperature_scale``
    (the official Magpie generator's vLLM logits processors, ``exp/str_utils.py``
    ``de_md_logits_processor_for_llama3_1`` and ``flaming_tokens``, which ran before vLLM's penalties,
    temperature and top-p, as this does before :class:`_RowSampler`).
    """

    def __init__(self, sampling: SamplingConfig) -> None:
        self.banned = sorted(set(sampling.first_token_banned_ids))
        self.scale = float(sampling.first_token_temperature_scale)

    @classmethod
    def of(cls, sampling: SamplingConfig) -> _FirstTokenRule | None:
        return cls(sampling) if sampling.first_token_rules else None

    def apply(self, scores: Any, rows: Sequence[int]) -> Any:
        """Apply the rules, in place, to ``rows`` of ``scores`` (float ``[batch, vocab]``); returns ``scores``."""
        import torch

        if not rows:
            return scores
        index = torch.tensor(list(rows), device=scores.device)
        banned = [t for t in self.banned if t < scores.shape[-1]]
        if banned:
            scores[index[:, None], torch.tensor(banned, device=scores.device)[None, :]] = float("-inf")
        if self.scale != 1.0:
            scores[index] = scores[index] / self.scale
        return scores


class _FirstStepProcessor(LogitsProcessor):
    """:class:`_FirstTokenRule` inside ``model.generate``: every row of a call starts at the same step
    (left padding), the one where ``input_ids`` is still as wide as the prompts."""

    def __init__(self, rule: _FirstTokenRule, prompt_width: int) -> None:
        self.rule = rule
        self.prompt_width = prompt_width

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if input_ids.shape[1] == self.prompt_width:
            scores = self.rule.apply(scores, range(scores.shape[0]))
        return scores


def _generators(seeds: Sequence[int] | None, num_prompts: int, n: int, device: str) -> list[Any]:
    """One ``torch.Generator`` per completion (prompt-major), seeded ``seeds[i] + j``; None when unseeded."""
    import torch

    if seeds is None:
        return [None] * (num_prompts * n)
    return [torch.Generator(device=device).manual_seed(int(seed) + j) for seed in seeds for j in range(n)]


class TransformersEngine(Engine):
    """Generate with a Hugging Face ``transformers`` causal LM (CPU or GPU).

    ``config.batch_size`` is the number of sequences decoded at once.
    """

    name = "transformers"
    first_token_rules = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if config.quantization is not None:
            raise ValueError(
                f"quantization={config.quantization!r} is a vLLM option; the transformers engine loads the checkpoint "
                "as it is (a GGUF file through gguf_file, or an already quantized folder). Use backend='vllm' or drop it."
            )
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
        #: sequences decoded at once (from ``config.batch_size``)
        self.batch_size = config.batch_size
        self._eos_ids = self._default_eos_ids()
        self._supports_loop = self._plain_dynamic_cache()
        # transformers >= 5.24 renames forward's ``past_key_values`` to ``cache``
        self._cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if not self._supports_loop:
            logger.info("%s has sliding-window or hybrid cache layers; using model.generate", config.describe())

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    # ------------------------------------------------------------------ setup helpers
    def _default_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self._tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value is not None:
                ids.update(int(v) for v in value)
        return ids

    def _plain_dynamic_cache(self) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            cache = DynamicCache(config=self.model.config)
        except Exception:  # pragma: no cover - exotic configs
            return False
        return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)

    # ------------------------------------------------------------------ generation
    def context_length(self) -> int | None:
        """``config.max_model_len`` when given, else the model's ``max_position_embeddings``
        (the tokenizer's ``model_max_length`` is often a placeholder such as 1e30 and only counts
        when it is smaller)."""
        if self.config.max_model_len is not None:
            return int(self.config.max_model_len)
        limits = [
            getattr(self.model.config.get_text_config(), "max_position_embeddings", None),
            getattr(self._tokenizer, "model_max_length", None),
        ]
        usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 10_000_000]
        return min(usable) if usable else None

    def _generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None, progress: Any
    ) -> list[list[Completion]]:
        generators = _generators(seeds, len(prompts), sampling.n, self.device)
        if self._supports_loop:
            flat = self._generate_loop(prompts, sampling, generators, progress)
        else:
            flat = self._generate_hf(prompts, sampling, generators, progress)
        n = sampling.n
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _limits(self, prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> list[int]:
        """Per prompt, the most tokens it may generate: ``max_tokens``, or what is left of the context
        (vLLM stops there with "length" too: vllm 0.34 ``v1/core/sched/utils.py:114-119``)."""
        context = self.context_length()
        if context is None:
            return [max_tokens] * len(prompt_ids)
        return [max(1, min(max_tokens, context - len(ids))) for ids in prompt_ids]

    def _completion(self, tokens: list[int], stops: Sequence[str], stopped: bool) -> Completion:
        """The completion of generated ``tokens`` (end-of-turn token already left out): text cut at the
        first stop string, ``num_tokens`` counting only the tokens that make up that text."""
        text = self._tokenizer.decode(tokens, skip_special_tokens=False)
        text, hit = _truncate_at_stop(text, stops)
        num_tokens = count_text_tokens(self._tokenizer, tokens, text) if hit else len(tokens)
        return Completion(text, num_tokens, "stop" if (hit or stopped) else "length")

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]

    def _constraint(self, sampling: SamplingConfig) -> Any:
        """The compiled constraint of ``sampling`` (its JSON schema or regex, with llguidance), or None."""
        if sampling.json_schema is None and sampling.regex is None:
            return None
        from magpie_hf.engines.constrained import GrammarConstraint

        vocab_size = getattr(self.model.config, "vocab_size", None) or len(self._tokenizer)
        stops = sorted(self._eos_ids | set(sampling.stop_token_ids))
        return GrammarConstraint(self._tokenizer, json_schema=sampling.json_schema, regex=sampling.regex,
                                 vocab_size=vocab_size, stop_token_ids=stops)

    # ------------------------------------------------------------------ continuous batching loop
    def _generate_loop(
        self, prompts: list[str], sampling: SamplingConfig, generators: list[Any], progress: Any
    ) -> list[Completion]:
        import torch
        from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

        tok = self._tokenizer
        distinct = list(dict.fromkeys(prompts))
        index_of = {p: i for i, p in enumerate(distinct)}
        prompt_ids = self.prompt_token_ids(distinct)
        for text, ids in zip(distinct, prompt_ids):
            if not ids:
                raise ValueError(f"Prompt {text!r} tokenizes to nothing; give at least one token of text.")
        limits = self._limits(prompt_ids, sampling.max_tokens)
        n = sampling.n
        waiting = [
            _Row(slot=i * n + k, prompt=index_of[p], limit=limits[index_of[p]], generator=generators[i * n + k])
            for i, p in enumerate(prompts)
            for k in range(n)
        ]
        waiting.reverse()  # pop() from the end keeps the requested order
        results: list[Completion | None] = [None] * len(waiting)

        stop_ids = self._eos_ids | set(sampling.stop_token_ids)
        stops = [s for s in sampling.stop if s]
        # enough trailing tokens to contain any stop string (every token decodes to >= 1 char, plus slack
        # for tokens that decode to partial UTF-8)
        tail_tokens = max((len(s) for s in stops), default=0) + 4
        penalty = (
            RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty) if sampling.repetition_penalty != 1 else None
        )
        constraint = self._constraint(sampling)
        first_token_rule = _FirstTokenRule.of(sampling)
        batch_size = max(1, self.batch_size)
        sampler = None if sampling.greedy else _RowSampler(sampling)
        # refill when a quarter of the slots are free: prefill and cache merges are not free
        refill_at = max(1, batch_size // 4)
        device = self.device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

        active: list[_Row] = []
        cache = None
        mask = ids_seen = positions = logits = None

        def finish(row: _Row, reason: str) -> None:
            results[row.slot] = completion = self._completion(row.tokens, stops, reason == "stop")
            if progress is not None:
                progress(1, completion.num_tokens)

        with torch.inference_mode():
            while active or waiting:
                # ---- admit waiting rows into free slots
                free = batch_size - len(active)
                if waiting and (free >= refill_at or not active):
                    new_rows = [waiting.pop() for _ in range(min(free, len(waiting)))]
                    if constraint is not None:
                        for row in new_rows:
                            row.grammar = constraint.new_row()
                    new = self._prefill(new_rows, prompt_ids, pad_id)
                    if cache is None:
                        cache, mask, positions, logits, ids_seen = new
                    else:
                        cache, mask, positions, logits, ids_seen = _merge((cache, mask, positions, logits, ids_seen), new)
                    active.extend(new_rows)
                    if penalty is None:
                        ids_seen = None

                # ---- choose the next token of every active row
                scores = logits.float()
                if penalty is not None:
                    scores = penalty(ids_seen, scores)
                if constraint is not None:
                    scores = constraint.mask(scores, [row.grammar for row in active])
                if first_token_rule is not None:  # the rows about to choose their first token
                    scores = first_token_rule.apply(scores, [i for i, row in enumerate(active) if not row.tokens])
                if sampler is None:
                    next_tokens = scores.argmax(dim=-1)
                else:
                    next_tokens = sampler.choose(scores, [row.generator for row in active])
                chosen = next_tokens.tolist()

                keep: list[int] = []
                tails: list[list[int]] = []
                tail_rows: list[int] = []
                for i, (row, token) in enumerate(zip(active, chosen)):
                    if row.grammar is not None:
                        row.grammar.accept(token)
                    if token in stop_ids:
                        finish(row, "stop")
                        continue
                    row.tokens.append(token)
                    if stops:
                        tails.append(row.tokens[-tail_tokens:])
                        tail_rows.append(i)
                    keep.append(i)
                if tails:
                    stopped = {
                        i
                        for i, text in zip(tail_rows, tok.batch_decode(tails, skip_special_tokens=False))
                        if any(s in text for s in stops)
                    }
                    if stopped:
                        for i in stopped:
                            finish(active[i], "stop")
                        keep = [i for i in keep if i not in stopped]
                done_by_length = {i for i in keep if len(active[i].tokens) >= active[i].limit}
                for i in done_by_length:
                    finish(active[i], "length")
                if done_by_length:
                    keep = [i for i in keep if i not in done_by_length]

                # ---- drop finished rows from the batch
                if len(keep) < len(active):
                    if not keep:
                        active, cache = [], None
                        continue
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, positions, next_tokens = mask[index], positions[index], next_tokens[index]
                    if ids_seen is not None:
                        ids_seen = ids_seen[index]
                    active = [active[i] for i in keep]
                    mask, trimmed = _trim_left(mask)
                    if trimmed:
                        _slice_cache(cache, trimmed)
                        if ids_seen is not None:
                            ids_seen = ids_seen[:, trimmed:]

                # ---- one decoding step
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                if ids_seen is not None:
                    ids_seen = torch.cat([ids_seen, next_tokens[:, None]], dim=1)
                out = self.model(
                    input_ids=next_tokens[:, None],
                    attention_mask=mask,
                    position_ids=positions[:, None],
                    **{self._cache_kwarg: cache},
                    use_cache=True,
                    logits_to_keep=1,
                )
                positions = positions + 1
                logits = out.logits[:, -1, :]
        return results  # type: ignore[return-value]

    def _prefill(self, rows: list[_Row], prompt_ids: list[list[int]], pad_id: int):
        """Run the distinct prompts of ``rows`` once and expand the cache to one row per completion."""
        import torch
        from transformers import DynamicCache

        distinct = list(dict.fromkeys(row.prompt for row in rows))
        where = {p: i for i, p in enumerate(distinct)}
        seqs = [prompt_ids[p] for p in distinct]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            **{self._cache_kwarg: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :]
        positions = mask.sum(-1)
        expand = [where[row.prompt] for row in rows]
        if expand != list(range(len(distinct))):
            index = torch.tensor(expand, device=self.device)
            cache.batch_select_indices(index)
            mask, positions, logits, ids = mask[index], positions[index], logits[index], ids[index]
        # pad positions repeat the row's first real token, so the repetition penalty ignores padding
        first = ids.gather(1, (mask == 0).sum(-1, keepdim=True).clamp(max=width - 1))
        ids_seen = torch.where(mask.bool(), ids, first)
        return cache, mask, positions, logits, ids_seen

    # ------------------------------------------------------------------ fallback: model.generate
    def _generate_hf(
        self, prompts: list[str], sampling: SamplingConfig, generators: list[Any], progress: Any
    ) -> list[Completion]:
        """Batched ``model.generate`` with the same per-completion sampling as the loop.

        ``generate`` runs greedy over scores in which :class:`_SampledTokenProcessor` (the last
        processor, after the repetition penalty and the JSON mask) left only the token it sampled
        from each row's own generator. Completions are batched by how many tokens they may
        generate, so a prompt near the end of the context never shortens another one.
        """
        import torch

        n = sampling.n
        expanded = [p for p in prompts for _ in range(n)]
        limits = [limit for limit in self._limits(self.prompt_token_ids(prompts), sampling.max_tokens) for _ in range(n)]
        eos_ids = sorted(self._eos_ids | set(sampling.stop_token_ids))
        stops = [s for s in sampling.stop if s]
        results: list[Completion | None] = [None] * len(expanded)
        by_limit: dict[int, list[int]] = {}
        for slot, limit in enumerate(limits):
            by_limit.setdefault(limit, []).append(slot)
        bs = max(1, self.batch_size)
        chunks = [(limit, slots[i : i + bs]) for limit, slots in sorted(by_limit.items(), reverse=True) for i in range(0, len(slots), bs)]
        for limit, slots in chunks:
            enc = self._tokenizer([expanded[s] for s in slots], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self.device)
            processors: list[Any] = []
            constraint = self._constraint(sampling)
            if constraint is not None:
                from magpie_hf.engines.constrained import GrammarLogitsProcessor

                processors.append(GrammarLogitsProcessor(constraint))
            first_token_rule = _FirstTokenRule.of(sampling)
            if first_token_rule is not None:
                processors.append(_FirstStepProcessor(first_token_rule, enc["input_ids"].shape[1]))
            if not sampling.greedy:
                processors.append(_SampledTokenProcessor(_RowSampler(sampling), [generators[s] for s in slots]))
            gen_kwargs: dict[str, Any] = {
                "max_new_tokens": limit,
                "eos_token_id": eos_ids,
                "pad_token_id": self._tokenizer.pad_token_id,
                "repetition_penalty": sampling.repetition_penalty,
                "do_sample": False,
                "temperature": None,
                "top_p": None,
                "top_k": None,
                "logits_processor": processors,
            }
            if stops:
                gen_kwargs.update(stop_strings=stops, tokenizer=self._tokenizer)
            with torch.inference_mode():
                out = self.model.generate(**enc, **gen_kwargs)
            new = out[:, enc["input_ids"].shape[1] :]
            for slot, row in zip(slots, new.tolist()):
                tokens: list[int] = []
                stopped = False
                for t in row:
                    if t in eos_ids:
                        stopped = True
                        break
                    tokens.append(t)
                results[slot] = completion = self._completion(tokens, stops, stopped)
                if progress is not None:
                    progress(1, completion.num_tokens)
        return results  # type: ignore[return-value]


class _SampledTokenProcessor(LogitsProcessor):
    """A ``generate`` logits processor that samples each row with its own generator (:class:`_RowSampler`)
    and leaves only the sampled token finite, so greedy ``generate`` takes it."""

    def __init__(self, sampler: _RowSampler, generators: list[Any]) -> None:
        self.sampler = sampler
        self.generators = generators

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        chosen = self.sampler.choose(scores.float(), self.generators)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


# ---------------------------------------------------------------------- cache surgery
def _trim_left(mask):
    """Drop leading columns that are padding in every row; return the mask and how many were dropped."""
    used = mask.any(dim=0)
    first = int(used.int().argmax()) if bool(used.any()) else 0
    return (mask[:, first:], first) if first else (mask, 0)


def _slice_cache(cache, start: int) -> None:
    """Drop the first ``start`` columns of every layer of a plain ``DynamicCache``."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., start:, :]
        layer.values = layer.values[..., start:, :]


def _repeat_first(ids, extra: int):
    """Left-pad token ids by repeating each row's first id (neutral for the repetition penalty)."""
    import torch

    return torch.cat([ids[:, :1].expand(-1, extra), ids], dim=1) if extra else ids


def _merge(old, new):
    """Concatenate two batches of decoding state, left-padding the shorter cache."""
    import torch
    import torch.nn.functional as F

    cache_a, mask_a, pos_a, logits_a, seen_a = old
    cache_b, mask_b, pos_b, logits_b, seen_b = new
    width = max(mask_a.shape[1], mask_b.shape[1])

    def pad(t, extra):  # left-pad dim -2 (sequence) of a [B, H, T, D] tensor
        return F.pad(t, (0, 0, extra, 0)) if extra else t

    extra_a, extra_b = width - mask_a.shape[1], width - mask_b.shape[1]
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers):
        layer_a.keys = torch.cat([pad(layer_a.keys, extra_a), pad(layer_b.keys, extra_b)], dim=0)
        layer_a.values = torch.cat([pad(layer_a.values, extra_a), pad(layer_b.values, extra_b)], dim=0)
    mask = torch.cat([F.pad(mask_a, (extra_a, 0)), F.pad(mask_b, (extra_b, 0))], dim=0)
    seen = None
    if seen_a is not None and seen_b is not None:
        seen = torch.cat([_repeat_first(seen_a, extra_a), _repeat_first(seen_b, extra_b)], dim=0)
    return cache_a, mask, torch.cat([pos_a, pos_b]), torch.cat([logits_a, logits_b]), seen
