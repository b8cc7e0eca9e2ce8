"""The one interface every text-generation backend implements.

Example:
    >>> from magpie_hf.engines import EngineConfig, load_engine, SamplingConfig
    >>> engine = load_engine(EngineConfig.embedded())          # doctest: +SKIP
    >>> out = engine.generate(["<|im_start|>user\\n"], SamplingConfig(max_tokens=32, n=2, seed=0))  # doctest: +SKIP
    >>> out[0][0].text, out[0][0].num_tokens, out[0][0].finish_reason  # doctest: +SKIP

Steps that answer or judge conversations call :meth:`Engine.generate_chat` with messages; engines that
complete raw text render them with the model's chat template, a chat endpoint (``openai-chat``) sends
them as they are:

    >>> engine.generate_chat([[{"role": "user", "content": "Name a fruit."}]], SamplingConfig(max_tokens=8))  # doctest: +SKIP
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence

if TYPE_CHECKING:
    from magpie_hf.engines.config import EngineConfig
    from magpie_hf.templates import ChatTemplates

#: why a completion ended: an end-of-turn/stop string ("stop"), ``max_tokens`` ("length"), the backend
#: gave up on it ("abort"), or it was never generated because its request failed ("error": a prompt
#: longer than the model's context, a server's 400 for that prompt); the last two carry ``error``
FinishReason = Literal["stop", "length", "abort", "error"]

#: the highest temperature every backend accepts (vLLM and OpenAI-compatible servers: [0, 2])
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class SamplingConfig:
    """How to decode. ``temperature == 0`` means greedy.

    ``stop`` strings and ``stop_token_ids`` end a completion (finish reason ``"stop"``);
    reaching ``max_tokens`` ends it with ``"length"``. ``n`` completions are sampled per
    prompt. ``seed`` makes a call reproducible on the same engine, prompts and settings.

    Constrained decoding (one at a time): ``json_schema`` (a JSON schema) or ``regex`` (the whole
    completion must match it; the model may end it only where the pattern is complete). The
    transformers engine compiles both with llguidance, vLLM with its llguidance (guidance) structured outputs, the
    OpenAI-compatible engines send them in each server's own field.

    First-step rules (the official Magpie generator's per-model logits processors; engines with
    :attr:`Engine.first_token_rules`, others refuse them): ``first_token_banned_ids`` may not be the
    first generated token (Llama-3.1's markdown headings), and ``first_token_temperature_scale``
    divides the logits of the first step only (Qwen2.5-Math's 1.2: the first token is sampled at
    1.2x the temperature). Both apply before the repetition penalty, temperature and top-p, where
    the official code's vLLM logits processors ran.

    Example:
        >>> SamplingConfig(temperature=0.6, first_token_banned_ids=[2, 567]).first_token_rules
        True
        >>> SamplingConfig(json_schema={"type": "object"}, regex="yes|no")
        Traceback (most recent call last):
        ...
        ValueError: Give either json_schema or regex (one constraint per request), not both.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 512
    n: int = 1
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    json_schema: dict | None = field(default=None, hash=False, compare=False)
    #: the completion must match this regular expression (llguidance's regex dialect, full match)
    regex: str | None = None
    #: token ids the first generated token may not be
    first_token_banned_ids: tuple[int, ...] = ()
    #: the first step's logits are divided by this (1.0: no change)
    first_token_temperature_scale: float = 1.0

    def __post_init__(self) -> None:
        # vLLM's SamplingParams refuses temperatures outside [0, 2] (vllm 0.34 sampling_params.py:660-677),
        # and so do OpenAI-compatible servers: refuse them here, before any model loads
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be between 0 and {MAX_TEMPERATURE:g} (the range every backend accepts), "
                f"got {self.temperature}; 0 means greedy."
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.json_schema is not None and self.regex is not None:
            raise ValueError("Give either json_schema or regex (one constraint per request), not both.")
        if self.regex is not None and not self.regex:
            raise ValueError("regex must be a non-empty pattern (or None for no constraint).")
        if not self.first_token_temperature_scale > 0:
            raise ValueError(
                f"first_token_temperature_scale must be > 0, got {self.first_token_temperature_scale}; 1.0 changes nothing."
            )
        # accept lists from callers but keep the object hashable
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "first_token_banned_ids", tuple(int(i) for i in self.first_token_banned_ids))

    @property
    def first_token_rules(self) -> bool:
        """Whether a first-step logits rule is asked for (banned first tokens or a hotter first token)."""
        return bool(self.first_token_banned_ids) or self.first_token_temperature_scale != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)

    def to_record(self) -> dict[str, Any]:
        """The settings worth recording in a row's provenance (no stop lists)."""
        return {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "max_tokens": int(self.max_tokens),
            "repetition_penalty": float(self.repetition_penalty),
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    ``num_tokens`` counts the generated tokens that make up ``text`` (not an end-of-turn token, not
    the tokens of a stop string that was cut off). A completion whose ``finish_reason`` is
    ``"abort"`` or ``"error"`` says why in ``error``; steps turn it into a null value plus that
    reason for its row, and the rest of the batch goes on.
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the model actually produced this text (finished by a stop or by the length limit)."""
        return self.finish_reason in ("stop", "length")

    @classmethod
    def failed(cls, reason: str, *, finish_reason: FinishReason = "error") -> "Completion":
        """A completion that was not generated, and why."""
        return cls("", 0, finish_reason, reason)

    @property
    def failure(self) -> str | None:
        """The ``step.stats`` key that counts this completion when it failed, else None:
        ``prompt_too_long`` (its prompt did not fit in the model's context), ``aborted`` or ``failed``.

        Example:
            >>> Completion.failed(too_long_reason(9000, 8192)).failure
            'prompt_too_long'
            >>> Completion("Hi", 1, "stop").failure is None
            True
        """
        if self.ok:
            return None
        if (self.error or "").startswith(_TOO_LONG):
            return "prompt_too_long"
        return "aborted" if self.finish_reason == "abort" else "failed"


_TOO_LONG = "prompt is "


def too_long_reason(prompt_tokens: int, context: int) -> str:
    """The reason recorded for a prompt that does not fit in the model's context."""
    return (
        f"{_TOO_LONG}{prompt_tokens} tokens, the model's context is {context}; shorten the prompt "
        "(fewer turns, a lower max_tokens upstream) or raise the context (max_model_len)"
    )


def count_text_tokens(tokenizer: Any, token_ids: Sequence[int], text: str) -> int:
    """How many of ``token_ids`` make up ``text``, a completion cut before a stop string or a stop token.

    The tokens at the end that only complete a stop string (or are the end-of-turn token) do not
    count: the result is the shortest prefix of ``token_ids`` that decodes to at least ``len(text)``
    characters. A token that is partly text and partly stop string counts.

    Example:
        >>> class Chars:  # a toy tokenizer: one token per character
        ...     def decode(self, ids, skip_special_tokens=False): return "".join(map(chr, ids))
        >>> count_text_tokens(Chars(), [ord(c) for c in "Hi!<END>"], "Hi!")
        3
    """
    k = len(token_ids)
    while k > 0 and len(tokenizer.decode(list(token_ids[: k - 1]), skip_special_tokens=False)) >= len(text):
        k -= 1
    return k


class Engine(abc.ABC):
    """A loaded text-generation backend.

    Prompts are complete raw text (chat template already applied, BOS included where the
    model needs it); engines tokenize them **without** adding special tokens.

    :meth:`generate` does what every backend shares, once: it checks the arguments, answers a
    greedy request for ``n > 1`` samples with one completion reused ``n`` times (vLLM refuses
    greedy with ``n > 1``), and fails, for that prompt only, every prompt that does not fit in
    :meth:`context_length`. Backends implement :meth:`_generate` for the rest.
    """

    #: short backend name recorded in provenance ("transformers", "vllm", "openai", "openai-chat")
    name: str = "base"
    #: whether the engine completes raw text prompts; False for a chat endpoint, which applies the
    #: model's chat template itself (it can answer conversations, not continue a pre-query template)
    raw_prompts: ClassVar[bool] = True
    #: whether the engine applies :class:`SamplingConfig`'s first-step rules (``first_token_banned_ids``,
    #: ``first_token_temperature_scale``); :meth:`generate` refuses them on an engine that cannot
    first_token_rules: bool = False
    #: token ids of the prompts of the generate() call in progress (see prompt_token_ids)
    _call_token_ids: dict[str, list[int]] | None = None

    def __init__(self, config: "EngineConfig") -> None:
        self.config = config

    @property
    def model_id(self) -> str:
        return self.config.model

    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (used for chat-template arithmetic); None for a chat
        endpoint that runs a model we have no tokenizer for (a hosted API)."""

    def require_raw_prompts(self, step: str, why: str) -> None:
        """Refuse (with the way out) a step that needs raw text completions on a chat-only engine."""
        if self.raw_prompts:
            return
        raise ValueError(
            f"{step} needs raw text completions: {why}. The engine {self.config.describe()!r} "
            f"(backend={self.name!r}) talks to a /v1/chat/completions endpoint, which applies the chat "
            "template itself and cannot do that. Use the completions engine for this step: "
            f"EngineConfig(model=..., backend='openai', base_url={self.config.base_url or 'http://HOST:PORT/v1'!r}) "
            "against the same server's /v1/completions (vllm serve, SGLang, llama-server), or backend='vllm' "
            "or 'transformers'."
        )

    def chat_templates(self, chat_template_kwargs: dict[str, Any] | None = None) -> "ChatTemplates | None":
        """The chat-template pieces derived from :attr:`tokenizer` with ``chat_template_kwargs`` (once per
        engine and options); None for a chat endpoint, which applies its template itself."""
        if not self.raw_prompts:
            return None
        import json

        key = json.dumps(chat_template_kwargs or {}, sort_keys=True)
        cache = self.__dict__.setdefault("_derived_templates", {})
        if key not in cache:
            from magpie_hf.templates import derive_templates

            if self.tokenizer is None:
                raise ValueError(
                    f"The engine {self.config.describe()!r} has no tokenizer to render chat prompts with; "
                    "set EngineConfig.tokenizer to the model's Hugging Face tokenizer."
                )
            cache[key] = derive_templates(self.tokenizer, chat_template_kwargs=chat_template_kwargs)
        return cache[key]

    def generate_chat(
        self,
        conversations: Sequence[Sequence[dict[str, str]]],
        sampling: SamplingConfig,
        *,
        templates: "ChatTemplates | None" = None,
        seeds: Sequence[int] | None = None,
        progress: Any = None,
    ) -> list[list[Completion]]:
        """Answer each conversation (a list of ``{role, content}`` messages) as the assistant.

        Same contract as :meth:`generate` (``n`` completions per conversation, one seed each). Engines
        that complete raw text render every conversation with ``templates.response_prompt`` (the
        step's templates, carrying its system prompt; without them, the ones derived from the engine's
        tokenizer) and call :meth:`generate`; a chat endpoint sends the messages as they are.
        """
        if templates is None:
            templates = self.chat_templates()
        prompts = [templates.response_prompt(list(conversation)) for conversation in conversations]
        return self.generate(prompts, sampling, seeds=seeds, progress=progress)

    def context_length(self) -> int | None:
        """Tokens the model can attend to (prompt plus generated text), or None when unknown.

        :meth:`generate` fails a prompt of ``context_length()`` tokens or more, and backends stop a
        completion with ``"length"`` when prompt plus completion reach it (what vLLM does:
        ``vllm/v1/core/sched/utils.py:114-119``). None skips the check (a hosted API that says nothing).
        """
        return None

    def prompt_token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of ``prompts`` as the engine sends them (tokenized without special tokens).

        Inside :meth:`generate` the ids counted for the context check are reused, so a backend
        that calls this from :meth:`_generate` does not tokenize a prompt twice.
        """
        cache = getattr(self, "_call_token_ids", None)
        if cache is None:  # outside generate(): nothing to reuse
            cache = {}
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            cache.update(zip(missing, self.tokenizer(missing, add_special_tokens=False)["input_ids"]))
        return [cache[p] for p in prompts]

    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingConfig,
        *,
        seeds: Sequence[int] | None = None,
        progress: Any = None,
    ) -> list[list[Completion]]:
        """Return, for every prompt, ``sampling.n`` completions in order.

        ``seeds`` gives every prompt its own seed: the ``j``-th sample of prompt ``i`` draws from
        ``seeds[i] + j`` (the rule vLLM applies to the children of a request), so prompts whose seeds
        are :data:`magpie_hf.seeds.SEEDS_PER_ROW` apart never share a sample's seed. Without
        ``seeds``, prompt ``i`` gets ``sampling.seed + i * n`` (or no seed when ``sampling.seed`` is
        None).

        A prompt of :meth:`context_length` tokens or more gets ``n`` failed completions
        (``finish_reason="error"``, the reason in ``error``) and the other prompts are generated.
        A greedy request (``temperature=0``) for ``n > 1`` samples is generated once and its
        completion repeated ``n`` times.

        ``progress`` is an optional callback ``progress(num_finished_completions, num_new_tokens)``
        the engine calls as completions finish, for progress bars.
        """
        if isinstance(prompts, str):
            raise TypeError("generate() takes a list of prompts, not a single string")
        if sampling.first_token_rules and not self.first_token_rules:
            raise ValueError(
                f"The engine {self.config.describe()!r} (backend={self.name!r}) cannot apply first-step logits rules "
                "(first_token_banned_ids, first_token_temperature_scale): an OpenAI-compatible server takes no "
                "per-position logits rule. Use backend='transformers', or backend='vllm' with "
                "EngineConfig(first_token_rules=True), which loads magpie_hf's vLLM logits processor."
            )
        if not prompts:
            return []
        n = sampling.n
        if seeds is None:
            seeds = None if sampling.seed is None else [sampling.seed + i * n for i in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise ValueError(f"generate() got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt.")
        prompts = list(prompts)
        seeds = None if seeds is None else [int(s) for s in seeds]
        if sampling.greedy and n > 1:
            # every greedy sample is the same; vLLM refuses greedy with n > 1 (vllm 0.34
            # sampling_params.py:773-777), so ask once and reuse the answer
            once = self.generate(prompts, sampling.replace(n=1), seeds=seeds, progress=progress)
            if progress is not None:
                progress(len(prompts) * (n - 1), 0)
            return [[c] * n for (c,) in once]
        self._call_token_ids = {}
        try:
            # a chat endpoint counts its own tokens (it applies the template): its 400 is the row's error
            limit = self.context_length() if self.raw_prompts else None
            fits = list(range(len(prompts)))
            results: list[list[Completion] | None] = [None] * len(prompts)
            if limit is not None:
                lengths = [len(ids) for ids in self.prompt_token_ids(prompts)]
                fits = [i for i, length in enumerate(lengths) if length < limit]
                for i in set(range(len(prompts))) - set(fits):
                    # vLLM raises for the whole call on such a prompt (prompt_len >= max_model_len:
                    # vllm 0.34 v1/engine/input_processor.py:583-600) and aborts what it had added
                    results[i] = [Completion.failed(too_long_reason(lengths[i], limit))] * n
                if progress is not None and len(fits) < len(prompts):
                    progress((len(prompts) - len(fits)) * n, 0)
            if fits:
                done = self._generate(
                    [prompts[i] for i in fits], sampling, None if seeds is None else [seeds[i] for i in fits], progress
                )
                for i, completions in zip(fits, done):
                    results[i] = completions
            return results  # type: ignore[return-value]
        finally:
            self._call_token_ids = None

    @abc.abstractmethod
    def _generate(
        self, prompts: list[str], sampling: SamplingConfig, seeds: list[int] | None, progress: Any
    ) -> list[list[Completion]]:
        """:meth:`generate` for a non-empty list of prompts that fit in the context, with one seed per
        prompt (or none): what each backend implements. Greedy requests come with ``n == 1``."""

    def close(self) -> None:  # noqa: B027  (an optional hook: server-backed engines hold no model)
        """Free the model and any accelerator memory it holds."""

