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


@dataclass
class _LoopRun:
    """One call of the continuous-batching loop: its queue, its results and what every step uses."""

    prompt_ids: list[list[int]]  # token ids of each distinct prompt (``_Row.prompt`` indexes it)
    waiting: list[_Row]  # rows not admitted yet, the next one last
    results: list[Completion | None]  # one per requested completion, filled as rows finish
    progress: Any  # the progress callback, or None
    stop_ids: set[int]  # token ids that end a row (eos and ``stop_token_ids``), left out of its text
    stops: list[str]  # stop strings, looked for in the decoded tail of each row
    tail_tokens: int  # how many trailing tokens are decoded to look for them
    penalty: Any  # RepetitionPenaltyLogitsProcessor, or None
    constraint: Any  # GrammarConstraint (JSON schema, regex), or None
    first_token_rule: _FirstTokenRule | None
    sampler: _RowSampler | None  # None when greedy
    batch_size: int
    refill_at: int  # admit waiting rows once this many slots are free
    pad_id: int


@dataclass
class _Batch:
    """The rows being decoded and their decoding state, one row of each tensor per row."""

    rows: list[_Row] = field(default_factory=list)
    cache: Any = None  # DynamicCache, None while the batch is empty
    mask: Any = None  # attention mask [rows, width], left padded
    positions: Any = None  # position of each row's next token [rows]
    logits: Any = None  # logits of each row's next token [rows, vocab]
    ids_seen: Any = None  # prompt and generated ids [rows, width] for the repetition penalty; None without one

    def add(self, rows: list[_Row], prefilled: tuple, track_ids: bool) -> None:
        """Append ``rows`` with their ``prefilled`` state (:meth:`TransformersEngine._prefill`)."""
        if self.cache is None:
            self.cache, self.mask, self.positions, self.logits, self.ids_seen = prefilled
        else:
            old = (self.cache, self.mask, self.positions, self.logits, self.ids_seen)
            self.cache, self.mask, self.positions, self.logits, self.ids_seen = _merge(old, prefilled)
        self.rows.extend(rows)
        if not track_ids:
            self.ids_seen = None

    def keep(self, keep: list[int], next_tokens: Any) -> Any:
        """Drop the rows not in ``keep`` (non-empty) and the padding columns no row needs any more;
        returns the ``next_tokens`` of the rows kept."""
        import torch

        if len(keep) == len(self.rows):
            return next_tokens
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, next_tokens = self.mask[index], self.positions[index], next_tokens[index]
        if self.ids_seen is not None:
            self.ids_seen = self.ids_seen[index]
        self.rows = [self.rows[i] for i in keep]
        self.mask, trimmed = _trim_left(self.mask)
        if trimmed:
            _slice_cache(self.cache, trimmed)
            if self.ids_seen is not None:
                self.ids_seen = self.ids_seen[:, trimmed:]
        return next_tokens


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
        """Decode every completion of ``prompts``; each iteration admits waiting rows into free slots,
        chooses the next token of every row, retires the rows that finished, and runs one decoding step."""
        import torch

        run = self._plan_loop(prompts, sampling, generators, progress)
        batch = _Batch()
        with torch.inference_mode():
            while batch.rows or run.waiting:
                self._admit(run, batch)
                next_tokens = self._retire(run, batch, self._choose(run, batch))
                if next_tokens is not None:
                    self._step(batch, next_tokens)
        return run.results  # type: ignore[return-value]

    def _plan_loop(
        self, prompts: list[str], sampling: SamplingConfig, generators: list[Any], progress: Any
    ) -> _LoopRun:
        """Tokenize the distinct prompts, queue one :class:`_Row` per completion, and fix what every step uses."""
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

        stops = [s for s in sampling.stop if s]
        batch_size = max(1, self.batch_size)
        return _LoopRun(
            prompt_ids=prompt_ids,
            waiting=waiting,
            results=[None] * len(waiting),
            progress=progress,
            stop_ids=self._eos_ids | set(sampling.stop_token_ids),
            stops=stops,
            # enough trailing tokens to contain any stop string (every token decodes to >= 1 char, plus slack
            # for tokens that decode to partial UTF-8)
            tail_tokens=max((len(s) for s in stops), default=0) + 4,
            penalty=(
                RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
                if sampling.repetition_penalty != 1
                else None
            ),
            constraint=self._constraint(sampling),
            first_token_rule=_FirstTokenRule.of(sampling),
            sampler=None if sampling.greedy else _RowSampler(sampling),
            batch_size=batch_size,
            # refill when a quarter of the slots are free: prefill and cache merges are not free
            refill_at=max(1, batch_size // 4),
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )

    def _admit(self, run: _LoopRun, batch: _Batch) -> None:
        """Admit waiting rows into the free slots of ``batch`` (prefilled, then merged into its cache)."""
        free = run.batch_size - len(batch.rows)
        if not run.waiting or (free < run.refill_at and batch.rows):
            return
        new_rows = [run.waiting.pop() for _ in range(min(free, len(run.waiting)))]
        if run.constraint is not None:
            for row in new_rows:
                row.grammar = run.constraint.new_row()
        batch.add(new_rows, self._prefill(new_rows, run.prompt_ids, run.pad_id), track_ids=run.penalty is not None)

    def _choose(self, run: _LoopRun, batch: _Batch) -> Any:
        """The next token of every row of ``batch`` (a ``[rows]`` tensor)."""
        scores = batch.logits.float()
        if run.penalty is not None:
            scores = run.penalty(batch.ids_seen, scores)
        if run.constraint is not None:
            scores = run.constraint.mask(scores, [row.grammar for row in batch.rows])
        if run.first_token_rule is not None:  # the rows about to choose their first token
            scores = run.first_token_rule.apply(scores, [i for i, row in enumerate(batch.rows) if not row.tokens])
        if run.sampler is None:
            return scores.argmax(dim=-1)
        return run.sampler.choose(scores, [row.generator for row in batch.rows])

    def _retire(self, run: _LoopRun, batch: _Batch, next_tokens: Any) -> Any:
        """Record ``next_tokens``, finish the rows that are done and drop them from ``batch``.

        Returns the next tokens of the rows left, or None when none is left (the batch is then empty).
        """
        keep = self._unfinished(run, batch.rows, next_tokens.tolist())
        if not keep:
            batch.rows, batch.cache = [], None
            return None
        return batch.keep(keep, next_tokens)

    def _unfinished(self, run: _LoopRun, rows: list[_Row], chosen: list[int]) -> list[int]:
        """Append each row's ``chosen`` token and finish the rows that stopped or reached their limit;
        returns the indices of the rows that go on."""
        keep: list[int] = []
        tails: list[list[int]] = []
        tail_rows: list[int] = []
        for i, (row, token) in enumerate(zip(rows, chosen)):
            if row.grammar is not None:
                row.grammar.accept(token)
            if token in run.stop_ids:
                self._finish(run, row, "stop")
                continue
            row.tokens.append(token)
            if run.stops:
                tails.append(row.tokens[-run.tail_tokens :])
                tail_rows.append(i)
            keep.append(i)
        if tails:
            stopped = {
                i
                for i, text in zip(tail_rows, self._tokenizer.batch_decode(tails, skip_special_tokens=False))
                if any(s in text for s in run.stops)
            }
            if stopped:
                for i in stopped:
                    self._finish(run, rows[i], "stop")
                keep = [i for i in keep if i not in stopped]
        done_by_length = {i for i in keep if len(rows[i].tokens) >= rows[i].limit}
        for i in done_by_length:
            self._finish(run, rows[i], "length")
        if done_by_length:
            keep = [i for i in keep if i not in done_by_length]
        return keep

    def _finish(self, run: _LoopRun, row: _Row, reason: str) -> None:
        run.results[row.slot] = completion = self._completion(row.tokens, run.stops, reason == "stop")
        if run.progress is not None:
            run.progress(1, completion.num_tokens)

    def _step(self, batch: _Batch, next_tokens: Any) -> None:
        """One decoding step: feed ``next_tokens`` (one per row) and keep the logits of the token after them."""
        import torch

        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        if batch.ids_seen is not None:
            batch.ids_seen = torch.cat([batch.ids_seen, next_tokens[:, None]], dim=1)
        out = self.model(
            input_ids=next_tokens[:, None],
            attention_mask=batch.mask,
            position_ids=batch.positions[:, None],
            **{self._cache_kwarg: batch.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        batch.positions = batch.positions + 1
        batch.logits = out.logits[:, -1, :]

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
