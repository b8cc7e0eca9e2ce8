"""Optional clean-ups of generated user queries: small filters that fix or reject one instruction.

Some models leave recognisable debris in Magpie instructions. The official Magpie scripts clean it per
model family (``exp/str_utils.py``: ``instruction_post_process`` for Llama-3.x and Gemma-2, and a logits
processor that stops Llama-3.1 from opening a query with a markdown heading). Here each clean-up is a
tiny, composable :class:`InstructionFilter`: call it with the instruction and get back the (possibly
rewritten) text, or ``None`` to drop the row. The generation steps that take ``postprocess=`` count every
drop in their ``stats`` as ``dropped_<filter name>``.

Filters:

- :class:`NoMarkdownHeading` — drop a query that opens with ``#`` (Llama-3.1 likes ``## Step 1``). Engines
  that apply first-step logits rules (transformers, vLLM with ``EngineConfig(first_token_rules=True)``) ban
  the heading tokens (:func:`markdown_heading_token_ids`) as the official runs did; on the others
  (OpenAI-compatible servers) :class:`~magpie_hf.steps.MagpieInstructions` drops such a query with this
  filter and counts it: with sampling this keeps the queries a first-token mask would have allowed.
- :class:`StripTrailingRoleWord` — remove a role name left at the end by a leaking header
  (``"What is 2+2?\\nassistant"`` → ``"What is 2+2?"``).
- :class:`DropSystemPromptEcho` — drop a "query" that merely repeats the system prompt.
- :class:`StripEnumerator` — remove a leading ``1.`` or ``a)``.
- :class:`StripLabelPrefix` — remove a leading label such as ``Question:`` or ``Task 1:``.
- :class:`QueryEnd` — cut the sample where the user's query ends (the first question, the first line, or
  before an answer that follows it).

:func:`sanitize_filters` is ``--sanitize``: the official post-processing of Llama-3.x and Gemma-2 queries.

Example:
    >>> from magpie_hf.steps.postprocess import StripTrailingRoleWord, DropSystemPromptEcho, apply_filters
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
from typing import Any, Protocol, Sequence, runtime_checkable

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
    "task", "prompt", "original prompt", "question", "the problem", "problem", "scenario", "the scenario",
    "the senario", "situation", "the situation", "context", "challenge", "query", "request", "instructions",
    "instruction", "descriptions", "description", "user",
)


@dataclasses.dataclass(frozen=True)
class StripLabelPrefix:
    """Remove a leading label such as ``Question:``, ``**Task**:``, ``## Problem 2:``, ``Question 3.``,
    ``Part 2:`` or ``Q1.`` (the labels and forms of the official ``remove_prefix``, ``exp/str_utils.py``,
    which tries ``X:``, ``**X**`` and ``## X:`` for every label X, case-insensitively)."""

    labels: tuple[str, ...] = _LABELS
    name: str = dataclasses.field(default="label_prefix", init=False)

    def __post_init__(self) -> None:
        words = "|".join(re.escape(label) for label in sorted(self.labels, key=len, reverse=True))
        pattern = (
            rf"^\s*(?:#+\s*)?(?:\*\*)?(?:(?:{words})(?:\s*\d+)?\s*:|(?:q|question|part)\s*\d+\s*[:.])(?:\*\*)?\s*"
            rf"|^\s*\*\*(?:{words})\*\*\s*:?\s*"
        )
        object.__setattr__(self, "_pattern", re.compile(pattern, re.IGNORECASE))

    def __call__(self, instruction: str, *, system_prompt: str | None = None) -> str | None:
        text = self._pattern.sub("", instruction, count=1).strip()  # type: ignore[attr-defined]
        return text or None


@dataclasses.dataclass(frozen=True)
class StripEnumerator:
    """Remove a leading enumerator: ``1.``, ``12.``, ``a)``, ``iv)`` (the first step of the official
    ``remove_prefix``, ``^(\\d+\\.|\\w+\\))\\s*``; a number such as ``3.14`` is left alone)."""

    name: str = dataclasses.field(default="enumerator", init=False)

    def __call__(self, instruction: str, *, system_prompt: str | None = None) -> str | None:
        return _ENUMERATOR.sub("", instruction, count=1).strip() or None


_ENUMERATOR = re.compile(r"^\s*(?:\d+\.(?!\d)|\w+\))\s*")

#: where a model starts answering inside the sampled query (``exp/str_utils.py`` ``assistant_markers``). The
#: official pattern puts ``s?:`` after the alternation, so a marker counts only when a colon follows it
#: ("Correct answer:", "The answer is:"; "Answer:" only as "Answer::"): the same rule here, case-sensitive.
ANSWER_MARKERS = (
    "Answer:", "Answers:", "The answer is", "Correct answer", "The correct answer", "Answer is", "Explanation:",
    "Here are some", "Solution Approach:", "Solution:",
)
#: Llama-3 also starts step-by-step answers inside the query (``step_makers``; an optional colon follows)
STEP_MARKERS = ("# Step 1", "## Step 1", "### Step 1")


@dataclasses.dataclass(frozen=True)
class QueryEnd:
    """Cut a sampled query where the user's words end, as the official ``instruction_post_process`` does for
    Llama-3.x (``family="llama-3"``) and Gemma-2 (``family="gemma-2"``) queries (``exp/str_utils.py``).

    The first rule that applies decides:

    1. a query opening with ``*`` that has a ``?``: up to the first ``?``, without ``*``;
    2. a query opening with ``"``: up to the first ``?`` (without quotes), else its first line (without
       quotes and ``*``);
    3. a query opening with ``<b>``: without ``*``;
    4. an answer marker (:data:`ANSWER_MARKERS`): everything before it;
    5. (Llama-3 only) a ``# Step 1`` heading (:data:`STEP_MARKERS`): everything before it;
    6. a first line ending with ``:`` (a header): before the first ``#`` if there is one, else up to the
       first ``?``, else the first line (without ``*``);
    7. otherwise: up to the first ``?``, else the first line (without ``*``).

    Leading enumerators and labels are stripped after rule 1 and at the end (:class:`StripEnumerator`,
    :class:`StripLabelPrefix`), as the official code strips them again. A query left empty is dropped.
    Where the official code has a statement without effect (rule 3 computes a first line it never
    keeps) this does what it effectively does; its bold clean-up (``**`` removed only when found at
    index 1) is kept as it is.

    Example:
        >>> QueryEnd()("How do I sort a list in Python? Here is my code:\\nxs = [3, 1]")
        'How do I sort a list in Python?'
        >>> QueryEnd()("Write a haiku about autumn.\\n\\nHere is one:\\nLeaves fall")
        'Write a haiku about autumn.'
        >>> QueryEnd()("Solve for x:\\n2x + 3 = 7\\n## Step 1: Subtract 3") is None  # only a header before the step
        False
        >>> QueryEnd()("## Step 1: Understand the problem") is None
        True
    """

    family: str = "llama-3"
    name: str = dataclasses.field(default="query_end", init=False)

    def __post_init__(self) -> None:
        if self.family not in ("llama-3", "gemma-2"):
            raise ValueError(f"QueryEnd family must be 'llama-3' or 'gemma-2', got {self.family!r}")

    def __call__(self, instruction: str, *, system_prompt: str | None = None) -> str | None:
        text = instruction.strip()
        if text.startswith("*") and "?" in text:
            return _strip_prefix(_first_question(text).replace("*", "").strip())
        text = _strip_prefix(text) or ""
        marker = _ANSWER.search(text) or (_STEP.search(text) if self.family == "llama-3" else None)
        if text.startswith('"'):
            if "?" in text:
                text = _first_question(text).replace('"', "")
            else:
                text = _first_line(text).replace('"', "").replace("*", "")
        elif text.startswith("<b>"):
            text = text.replace("*", "")
        elif marker is not None:
            text = _unbold(text[: marker.start()])
        elif _first_line(text).endswith(":"):
            if "#" in text:
                text = _unbold(text.split("#")[0])
            elif "?" in text:
                text = _unbold(_first_question(text))
            else:
                text = _first_line(text).replace("*", "")
        elif "?" in text:
            text = _unbold(_first_question(text))
        else:
            text = _first_line(text).replace("*", "")
        return _strip_prefix(text.strip())


_ANSWER = re.compile("(?:" + "|".join(re.escape(m) for m in ANSWER_MARKERS) + ")s?:")
_STEP = re.compile("(?:" + "|".join(re.escape(m) for m in STEP_MARKERS) + "):?")


def _first_question(text: str) -> str:
    return text.split("?")[0].strip() + "?"


def _first_line(text: str) -> str:
    return text.split("\n")[0].strip()


def _unbold(text: str) -> str:
    text = text.strip()
    return text.replace("**", "").strip() if text.find("**") == 1 else text


def _strip_prefix(text: str) -> str | None:
    """The official ``remove_prefix``: a leading enumerator, then a leading label."""
    text = StripEnumerator()(text) or ""
    return StripLabelPrefix()(text) if text else None


#: filters by name, for command lines (``--instruction-filters markdown_heading,trailing_role_word``)
FILTERS: dict[str, type] = {
    "markdown_heading": NoMarkdownHeading,
    "trailing_role_word": StripTrailingRoleWord,
    "system_prompt_echo": DropSystemPromptEcho,
    "enumerator": StripEnumerator,
    "label_prefix": StripLabelPrefix,
    "query_end": QueryEnd,
}


def sanitize_family(model: str | None) -> str:
    """Which official post-processing a model's queries get: ``gemma-2`` for Gemma-2 models, else ``llama-3``
    (the official script refuses other models; here they get the Llama-3 rules).

    Example:
        >>> sanitize_family("google/gemma-2-9b-it"), sanitize_family("meta-llama/Llama-3.3-70B-Instruct")
        ('gemma-2', 'llama-3')
    """
    return "gemma-2" if model and "gemma-2" in model.lower() else "llama-3"


def sanitize_filters(family: str = "llama-3") -> tuple[InstructionFilter, ...]:
    """What ``--sanitize`` applies: the official ``instruction_post_process`` of Llama-3.x and Gemma-2 queries
    (``exp/str_utils.py``), as three counted filters: a leading enumerator, a leading label, then
    :class:`QueryEnd` (the first question or line, or what comes before an answer).

    Example:
        >>> apply_filters("1. **Question**: What is 2+2?\\n\\nAnswer is: 4", sanitize_filters())
        ('What is 2+2?', None)
        >>> apply_filters("## Step 1: Find the area", sanitize_filters("llama-3"))
        (None, 'query_end')
    """
    return (StripEnumerator(), StripLabelPrefix(), QueryEnd(family))


_HEADING_TOKEN = re.compile(r" ?#+")


def markdown_heading_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Every token id of ``tokenizer`` that decodes to a run of ``#`` with an optional leading space: the
    first tokens ``no_markdown_start`` bans (the official Llama-3.1 processor bans ``#``, ``##``, ``###``
    and ``####``, ids 2, 567, 14711 and 827 of that vocabulary; this finds those and the other runs,
    `` #`` included, in any vocabulary).

    Example:
        >>> ids = markdown_heading_token_ids(tokenizer)  # doctest: +SKIP
        >>> sorted({tokenizer.decode([i]) for i in ids})[:3]  # doctest: +SKIP
        [' #', ' ##', ' ###']
    """
    ids = set()
    for token, token_id in tokenizer.get_vocab().items():
        # a '#' in the token's own spelling, or a byte-fallback piece (<0x23> is '#')
        if ("#" in token or token == "<0x23>") and _HEADING_TOKEN.fullmatch(tokenizer.decode([token_id])):
            ids.add(int(token_id))
    return tuple(sorted(ids))


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
