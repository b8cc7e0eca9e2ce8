"""Optional clean-ups of generated user queries: small filters that fix or reject one instruction.

Some models leave recognisable debris in Magpie instructions. The official Magpie scripts clean it per
model family (``exp/str_utils.py``: ``instruction_post_process``, and a logits processor that stops
Llama-3.1 from opening a query with a markdown heading). Here each clean-up is a tiny, composable
:class:`InstructionFilter`: call it with the instruction and get back the (possibly rewritten) text, or
``None`` to drop the row. The generation steps that take ``postprocess=`` count every drop in their
``stats`` as ``dropped_<filter name>``.

Filters:

- :class:`NoMarkdownHeading` — drop a query that opens with ``#`` (Llama-3.1 likes ``## Step 1``). The engine
  interface has no per-position logits bias, so instead of masking the first token the row is dropped and
  counted; with sampling this keeps exactly the queries a first-token mask would have allowed.
- :class:`StripTrailingRoleWord` — remove a role name left at the end by a leaking header
  (``"What is 2+2?\\nassistant"`` → ``"What is 2+2?"``).
- :class:`DropSystemPromptEcho` — drop a "query" that merely repeats the system prompt.
- :class:`StripLabelPrefix` — remove a leading label such as ``Question:`` or ``Task 1:``.

Example:
    >>> from magpie_hf.postprocess import StripTrailingRoleWord, DropSystemPromptEcho, apply_filters
    >>> filters = (StripTrailingRoleWord(), DropSystemPromptEcho())
    >>> apply_filters("How do I sort a list?\\nassistant", filters)
    ('How do I sort a list?', None)
    >>> apply_filters("You are a math tutor.", filters, system_prompt="You are a math tutor who helps students.")
    (None, 'system_prompt_echo')
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Protocol, Sequence, runtime_checkable

_WORD = re.compile(r"[a-z0-9]+")


@runtime_checkable
class InstructionFilter(Protocol):
    """Turns one instruction into a cleaned instruction, or ``None`` to drop the row.

    ``name`` (a short snake_case word) names the drop counter: ``dropped_<name>``.
    """

    name: str

    def __call__(self, instruction: str, *, system_prompt: str | None = None) -> str | None: ...


@dataclasses.dataclass(frozen=True)
class NoMarkdownHeading:
    """Drop queries whose first character is a markdown heading mark (``#``, ``##``, ...).

    Llama-3.1-Instruct often starts a sampled "query" with a heading such as ``## Step 1:``, which is
    the start of an answer, not a user's request. The official scripts mask the heading tokens at the
    first position; rejecting such samples keeps the same set of queries (see the module docstring).
    """

    name: str = dataclasses.field(default="markdown_heading", init=False)

    def __call__(self, instruction: str, *, system_prompt: str | None = None) -> str | None:
        return None if instruction.lstrip().startswith("#") else instruction


@dataclasses.dataclass(frozen=True)
class StripTrailingRoleWord:
    """Remove a role name that a leaking chat header left at the end of the query.

    Only a role word on its own last line, or glued right after closing punctuation
    (``"...?assistant"``), is removed, so a query that legitimately ends in "user" ("How do I add a
    Linux user") is left alone. A query that is nothing but a role word is dropped.
    """

    roles: tuple[str, ...] = ("assistant", "user", "system", "model")
    name: str = dataclasses.field(default="trailing_role_word", init=False)

    def __post_init__(self) -> None:
        words = "|".join(re.escape(r) for r in self.roles)
        pattern = rf"(?:(?:^|\n)[ \t]*|(?<=[.?!:;)\]\"'`]))(?:{words})[ \t]*:?\s*$"
        object.__setattr__(self, "_pattern", re.compile(pattern, re.IGNORECASE))

    def __call__(self, instruction: str, *, system_prompt: str | None = None) -> str | None:
        text = instruction
        while True:
            stripped = self._pattern.sub("", text).rstrip()  # type: ignore[attr-defined]
            if stripped == text:
                break
            text = stripped
        return text or None


@dataclasses.dataclass(frozen=True)
class DropSystemPromptEcho:
    """Drop a query that mostly repeats the system prompt (common with task or multi-turn prompts).

    Words are lower-cased alphanumerics. The query is an echo when at least ``min_words`` of its words
    line up with the system prompt and they make up at least ``threshold`` of the query
    (``difflib.SequenceMatcher`` matching blocks over word sequences).
    """

    threshold: float = 0.8
    min_words: int = 4
    name: str = dataclasses.field(default="system_prompt_echo", init=False)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")

    def __call__(self, instruction: str, *, system_prompt: str | None = None) -> str | None:
        if not system_prompt:
            return instruction
        query = _WORD.findall(instruction.lower())
        prompt = _WORD.findall(system_prompt.lower())
        if len(query) < self.min_words:
            return instruction
        matcher = difflib.SequenceMatcher(None, query, prompt, autojunk=False)
        matched = sum(block.size for block in matcher.get_matching_blocks())
        return None if matched / len(query) >= self.threshold else instruction


_LABELS = (
    "task", "prompt", "original prompt", "question", "the problem", "problem", "scenario", "situation",
    "context", "challenge", "query", "request", "instructions", "instruction", "description", "user",
)


@dataclasses.dataclass(frozen=True)
class StripLabelPrefix:
    """Remove a leading label such as ``Question:``, ``**Task**:``, ``## Problem 2:`` or ``Q1.``."""

    labels: tuple[str, ...] = _LABELS
    name: str = dataclasses.field(default="label_prefix", init=False)

    def __post_init__(self) -> None:
        words = "|".join(re.escape(label) for label in sorted(self.labels, key=len, reverse=True))
        pattern = (
            rf"^\s*(?:#+\s*)?(?:\*\*)?(?:(?:{words})(?:\s*\d+)?\s*:|q\d+\s*[:.])(?:\*\*)?\s*"
            rf"|^\s*\*\*(?:{words})\*\*\s*:?\s*"
        )
        object.__setattr__(self, "_pattern", re.compile(pattern, re.IGNORECASE))

    def __call__(self, instruction: str, *, system_prompt: str | None = None) -> str | None:
        text = self._pattern.sub("", instruction, count=1).strip()  # type: ignore[attr-defined]
        return text or None


#: filters by name, for command lines (``--instruction-filters markdown_heading,trailing_role_word``)
FILTERS: dict[str, type] = {
    "markdown_heading": NoMarkdownHeading,
    "trailing_role_word": StripTrailingRoleWord,
    "system_prompt_echo": DropSystemPromptEcho,
    "label_prefix": StripLabelPrefix,
}


def sanitize_filters() -> tuple[InstructionFilter, ...]:
    """What ``--sanitize`` applies (the official runs' clean-up of Llama-3.x and Gemma-2 queries): strip a
    leading label such as ``**Question**:`` and a role word a leaking header left at the end."""
    return (StripLabelPrefix(), StripTrailingRoleWord())


def filters_from_names(names: str | Sequence[str] | None) -> tuple[InstructionFilter, ...]:
    """Build filters (default settings) from names, e.g. ``"trailing_role_word,system_prompt_echo"``.

    ``""``, ``None`` or ``"none"`` give no filters. Unknown names raise ``ValueError`` listing the known ones.
    """
    if names is None:
        return ()
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if items == ["none"]:
        return ()
    unknown = [n for n in items if n not in FILTERS]
    if unknown:
        raise ValueError(f"Unknown instruction filter(s) {unknown}; known: {', '.join(FILTERS)} (or 'none').")
    return tuple(FILTERS[n]() for n in dict.fromkeys(items))


def apply_filters(
    instruction: str, filters: Sequence[InstructionFilter], *, system_prompt: str | None = None
) -> tuple[str | None, str | None]:
    """Run ``filters`` in order. Returns ``(text, None)``, or ``(None, name_of_the_filter_that_dropped_it)``."""
    text: str | None = instruction
    for f in filters:
        text = f(text, system_prompt=system_prompt)
        if not text:
            return None, f.name
    return text, None
