"""Safety tags with Llama Guard (paper §3, App. C.2: Llama-Guard-2 over instruction + response).

The guard's own chat template turns a ``[user: instruction, assistant: response]`` conversation
into its moderation prompt; the guard answers ``safe`` or ``unsafe`` followed by a line of
category codes (``S1,S10``). The raw answer is kept in ``llama_guard_2`` (the column name of the
published Magpie datasets, whatever the guard version); the parsed verdict goes to ``is_safe``
(bool) and ``unsafe_categories`` (category names, empty when safe). A verdict that cannot be
parsed gives nulls, the reason in ``llama_guard_error``, and a count in ``step.stats``.

Example:
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.steps.safety import LlamaGuard, parse_guard_verdict
    >>> parse_guard_verdict("unsafe\\nS1,S10", "llama-guard-2")
    (False, ['Violent Crimes', 'Suicide & Self-Harm'])
    >>> step = LlamaGuard(engine=EngineConfig("meta-llama/Meta-Llama-Guard-2-8B"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from magpie_hf.engines.base import Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig
from magpie_hf.errors import VerdictError
from magpie_hf.seeds import row_seeds
from magpie_hf.steps.base import BOOL, STRING, STRINGS, Batch, Features, Step, batch_len, resolve_engine

PAPER_GUARD_MODEL = "meta-llama/Meta-Llama-Guard-2-8B"

#: Llama-Guard-2 hazard categories (MLCommons taxonomy; names as in the paper's Table 5)
LLAMA_GUARD_2_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Specialized Advice",
    "S6": "Privacy",
    "S7": "Intellectual Property",
    "S8": "Indiscriminate Weapons",
    "S9": "Hate",
    "S10": "Suicide & Self-Harm",
    "S11": "Sexual Content",
}
#: Llama-Guard-3 hazard categories
LLAMA_GUARD_3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
TAXONOMIES: dict[str, dict[str, str]] = {"llama-guard-2": LLAMA_GUARD_2_CATEGORIES, "llama-guard-3": LLAMA_GUARD_3_CATEGORIES}
Taxonomy = Literal["auto", "llama-guard-2", "llama-guard-3"]

_CODE = re.compile(r"^S\d{1,2}$")


def parse_guard_verdict(text: str, taxonomy: str = "llama-guard-2") -> tuple[bool, list[str]]:
    """``(is_safe, category names)`` from a Llama Guard answer; raises :class:`VerdictError`.

    Accepts the real output formats: ``"safe"``, ``"unsafe\\nS1"``, ``"unsafe\\nS1,S10"`` (surrounding
    whitespace and an end-of-turn tail are ignored).
    """
    categories = TAXONOMIES[taxonomy]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise VerdictError("empty verdict")
    head = lines[0].lower()
    if head == "safe":
        return True, []
    if head != "unsafe":
        raise VerdictError(f"verdict does not start with safe/unsafe: {text[:80]!r}")
    if len(lines) < 2:
        raise VerdictError("unsafe verdict without categories")
    codes = list(dict.fromkeys(c.strip().upper() for c in lines[1].split(",") if c.strip()))  # each once
    bad = [c for c in codes if not _CODE.match(c) or c not in categories]
    if not codes or bad:
        raise VerdictError(f"unknown {taxonomy} categories {bad or lines[1]!r}")
    return False, [categories[c] for c in codes]


def verdict_regex(taxonomy: str = "llama-guard-2") -> str:
    """The verdict format of ``taxonomy`` as a regex for constrained decoding: ``safe``, or ``unsafe``, a
    newline and a comma-separated list of that taxonomy's codes (each at most once in length; up to two
    leading spaces or newlines, which some guard templates leave to the model). Every text it matches
    parses with :func:`parse_guard_verdict`.

    Example:
        >>> verdict_regex("llama-guard-2")
        '[ \\\\n]{0,2}(?:safe|unsafe\\\\nS(?:1|2|3|4|5|6|7|8|9|10|11)(?:,S(?:1|2|3|4|5|6|7|8|9|10|11)){0,10})'
        >>> import re
        >>> bool(re.fullmatch(verdict_regex("llama-guard-3"), "unsafe\\nS14,S1")), bool(re.fullmatch(verdict_regex(), "unsafe\\nS14"))
        (True, False)
    """
    codes = sorted(TAXONOMIES[taxonomy], key=lambda code: int(code[1:]))
    code = "S(?:" + "|".join(c[1:] for c in codes) + ")"
    return rf"[ \n]{{0,2}}(?:safe|unsafe\n{code}(?:,{code}){{0,{len(codes) - 1}}})"


def verdict_max_chars(taxonomy: str = "llama-guard-2") -> int:
    """The longest text :func:`verdict_regex` matches, in characters: a constrained answer given this many
    tokens (and one for the end of turn) always ends inside the format, since every token is one
    character or more.

    Example:
        >>> verdict_max_chars("llama-guard-2"), verdict_max_chars("llama-guard-3")
        (52, 64)
    """
    codes = TAXONOMIES[taxonomy]
    longest = max(len(code) for code in codes)
    return 2 + len("unsafe\n") + len(codes) * longest + (len(codes) - 1)


def guess_taxonomy(model_name: str) -> str:
    """``llama-guard-3`` for Llama-Guard-3 models, ``llama-guard-2`` otherwise."""
    return "llama-guard-3" if re.search(r"guard[-_ ]?3", model_name, re.IGNORECASE) else "llama-guard-2"


@dataclasses.dataclass(kw_only=True)
class LlamaGuard(Step):
    """Moderate instruction + response with Llama Guard 2 or 3.

    Columns: ``llama_guard_2`` (raw verdict text), ``is_safe`` (bool or null), ``unsafe_categories``
    (list of names or null), ``llama_guard_error`` (reason or null). Rows with an empty instruction
    are not sent to the guard (null, counted as ``empty_input``).

    The guard's answer is constrained to its verdict format (:func:`verdict_regex`: ``safe``, or
    ``unsafe`` and codes of the taxonomy) on every engine, so a verdict that cannot be parsed is left
    only where the answer was cut by ``max_tokens`` or the row failed (counted as ``unparseable``,
    ``prompt_too_long``, ...). ``constrain=False`` leaves the answer free.
    """


    engine: Engine | EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(model=PAPER_GUARD_MODEL))
    instruction_column: str = "instruction"
    response_column: str = "response"
    #: which category codes the guard uses; ``auto`` guesses from the model name
    taxonomy: Taxonomy = "auto"
    max_tokens: int = 20
    #: constrain the answer to the verdict format (:func:`verdict_regex`; ``max_tokens`` is then raised to fit
    #: the longest verdict, :func:`verdict_max_chars`); False leaves it free
    constrain: bool = True
    batch_size: int = 64
    #: template variables for the guard's chat template (passed to every rendering)
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._engine: Engine | None = None

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.instruction_column, self.response_column)

    def output_features(self) -> Features:
        return {"llama_guard_2": STRING, "is_safe": BOOL, "unsafe_categories": STRINGS, "llama_guard_error": STRING}

    def load(self) -> None:
        self._engine = resolve_engine(self.engine)

    def unload(self) -> None:
        self._engine = None

    def resolved_taxonomy(self) -> str:
        if self.taxonomy != "auto":
            return self.taxonomy
        engine = self._engine or self.engine
        config = engine.config if isinstance(engine, Engine) else engine
        return guess_taxonomy(f"{config.model} {config.alias or ''}")

    @staticmethod
    def conversation(instruction: str, response: str | None) -> list[dict[str, Any]]:
        """The conversation the guard moderates: the instruction, and the response when there is one."""
        messages: list[dict[str, Any]] = [{"role": "user", "content": instruction}]
        if response:
            messages.append({"role": "assistant", "content": response})
        return messages

    def prompt(self, instruction: str, response: str | None) -> str:
        """The guard's moderation prompt as a raw-text engine sees it, built by the guard's own chat template.

        Llama Guard templates render the whole moderation prompt, the cue for the verdict included, and
        ignore ``add_generation_prompt`` (as in the model cards), so a chat endpoint that applies the same
        template to :meth:`conversation` builds the same prompt.
        """
        assert self._engine is not None
        return self._engine.chat_templates(self.chat_template_kwargs).response_prompt(self.conversation(instruction, response))

    def process(self, batch: Batch, *, seed: int) -> Batch:
        if self._engine is None:
            self.load()
        assert self._engine is not None
        n = batch_len(batch)
        instructions = batch[self.instruction_column]
        responses = batch.get(self.response_column, [None] * n)
        raw: list[str | None] = [None] * n
        safe: list[bool | None] = [None] * n
        cats: list[list[str] | None] = [None] * n
        errors: list[str | None] = [None] * n
        todo = [i for i, t in enumerate(instructions) if isinstance(t, str) and t.strip()]
        for i in set(range(n)) - set(todo):
            errors[i] = f"empty {self.instruction_column}"
            self.stats["empty_input"] += 1
        conversations = [self.conversation(instructions[i], responses[i]) for i in todo]
        taxonomy = self.resolved_taxonomy()
        # the answer is constrained to the verdict format on every engine (llguidance on transformers and
        # vLLM; each OpenAI-compatible server's regex/grammar field), so every row gets a verdict
        # (with room for the longest verdict, so a constrained answer is never cut inside the format)
        sampling = SamplingConfig(temperature=0.0, max_tokens=self.max_tokens)
        if self.constrain:
            sampling = sampling.replace(
                regex=verdict_regex(taxonomy), max_tokens=max(self.max_tokens, verdict_max_chars(taxonomy) + 1)
            )
        seeds = row_seeds(seed, n)  # one per row, as everywhere (greedy: they change nothing)
        outputs = (
            self._engine.generate_chat(conversations, sampling, templates=self._engine.chat_templates(self.chat_template_kwargs),
                                       seeds=[seeds[i] for i in todo], progress=self.progress_callback)
            if conversations
            else []
        )
        for i, completions in zip(todo, outputs):
            if completions[0].failure:  # not generated (prompt too long, a server's 400, aborted): null + reason
                errors[i] = completions[0].error or f"no verdict (finish reason {completions[0].finish_reason})"
                self.stats[completions[0].failure] += 1
                continue
            raw[i] = completions[0].text.strip()
            try:
                safe[i], cats[i] = parse_guard_verdict(raw[i], taxonomy)
            except VerdictError as err:
                errors[i] = str(err)
                self.stats["unparseable"] += 1
            else:
                self.stats["safe" if safe[i] else "unsafe"] += 1
        out = dict(batch)
        out.update(llama_guard_2=raw, is_safe=safe, unsafe_categories=cats, llama_guard_error=errors)
        return out
