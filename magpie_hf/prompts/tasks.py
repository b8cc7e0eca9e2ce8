"""Task-control system prompts: steer Magpie instructions towards a domain (paper, Appendix A.2).

A system prompt that names the assistant's domain and the kinds of requests users bring to it makes
the model's self-written user queries fall in that domain. This module holds:

- :data:`TASK_PROMPTS`, a registry of domain prompts (one per task category of the paper, minus "Others");
- :class:`TaskMix`, the choice of prompt per row: one key, a validated weighted mixture, or your own
  prompts; the key of each row is a pure function of (seed, row index) and is recorded as
  ``system_prompt_key``.

The step that uses them is :class:`magpie_hf.steps.task_control.TaskControlledInstructions`.

Example:
    >>> from magpie_hf.prompts.tasks import TaskMix
    >>> mix = TaskMix.from_spec("math=0.7,coding=0.3")
    >>> sorted(mix.weights.items())
    [('coding', 0.3), ('math', 0.7)]
    >>> mix.key_for_row(0, seed=0) in {"math", "coding"}
    True
    >>> TaskMix.from_spec("math=0.7,coding=0.2")
    Traceback (most recent call last):
    ...
    ValueError: Task weights must sum to 1 (got 0.9 for {'math': 0.7, 'coding': 0.2}); for example --task-mix math=0.5,coding=0.5.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
from collections.abc import Mapping
from typing import Sequence

#: Domain system prompts, keyed by a short name. Each says what the assistant is for and which range of
#: requests users bring to it; the model then writes a user query of that kind.
TASK_PROMPTS: dict[str, str] = {
    "math": (
        "You are an AI assistant that helps people with mathematics. Users come to you with all kinds of "
        "math problems, from arithmetic and word problems to algebra, geometry, probability, statistics "
        "and calculus, and ask you to solve equations, calculate quantities, prove statements or explain "
        "concepts. You work through each problem step by step and arrive at the correct answer."
    ),
    "coding": (
        "You are an AI assistant for programming. Users ask you to write, explain, review, optimise and "
        "debug code in languages such as Python, JavaScript, C++, Java, SQL and shell, to fix error "
        "messages, to design functions, classes and algorithms, and to use libraries and tools correctly. "
        "You answer with working code and clear explanations."
    ),
    "translation": (
        "You are an AI assistant that translates between languages. Users give you words, sentences, "
        "emails, documents or idioms and ask for a faithful, natural translation into another language, "
        "sometimes with a particular tone or register, and ask you to explain nuances of meaning and "
        "grammar between the two languages."
    ),
    "reasoning": (
        "You are an AI assistant for logical reasoning. Users bring you puzzles, riddles, logic problems, "
        "arguments to evaluate, cause-and-effect questions and tricky scenarios that need careful "
        "step-by-step thinking, and ask you to work out the answer and explain how you reached it."
    ),
    "creative_writing": (
        "You are an AI assistant for creative writing. Users ask you to write stories, poems, song lyrics, "
        "scripts, dialogue and descriptions, to invent characters and worlds, to continue a piece in a "
        "given style, and to give feedback on their own creative work."
    ),
    "data_analysis": (
        "You are an AI assistant for data analysis. Users share tables, numbers, survey results and "
        "datasets, or describe them, and ask you to summarise them, compute statistics, find trends and "
        "outliers, choose a method or chart, interpret results, and explain what the data shows."
    ),
    "information_seeking": (
        "You are an AI assistant that answers questions about the world. Users ask you for facts, "
        "definitions and explanations on any topic, such as history, science, geography, technology, "
        "health, culture and current practices, and you give accurate, well-organised information."
    ),
    "advice_seeking": (
        "You are an AI assistant that gives thoughtful advice. Users describe personal, professional, "
        "financial, health, relationship or study situations and ask what they should do, which option "
        "to choose, or how to handle a problem, and you give practical, balanced guidance."
    ),
    "planning": (
        "You are an AI assistant that helps people plan. Users ask you to organise trips, events, projects, "
        "schedules, study plans, budgets, workouts and business launches, to break goals into steps and "
        "timelines, and to weigh constraints and priorities."
    ),
    "editing": (
        "You are an AI assistant for editing text. Users give you their writing, such as essays, emails, "
        "reports, cover letters and posts, and ask you to proofread it, fix grammar and spelling, rephrase, "
        "shorten, change the tone or improve clarity and structure."
    ),
    "role_playing": (
        "You are an AI assistant that takes part in role play. Users ask you to act as a character, a "
        "historical figure, an interviewer, a customer, a game master or another persona, to set up a "
        "scenario, and to stay in character while the conversation unfolds."
    ),
    "brainstorming": (
        "You are an AI assistant for brainstorming. Users ask you to come up with ideas: names, themes, "
        "gift ideas, business concepts, marketing angles, story premises, solutions to problems and new "
        "ways to look at a topic, and you offer many varied and original options."
    ),
}

#: other spellings accepted for the registry keys (the paper's task-category names among them)
TASK_ALIASES: dict[str, str] = {
    "coding & debugging": "coding",
    "coding_and_debugging": "coding",
    "code": "coding",
    "debugging": "coding",
    "mathematics": "math",
    "creative": "creative_writing",
    "writing": "creative_writing",
    "data": "data_analysis",
    "information": "information_seeking",
    "advice": "advice_seeking",
    "role_play": "role_playing",
    "roleplay": "role_playing",
}

#: the paper's task-category name of each registry key (the label the task-category tagger uses)
TASK_PROMPT_CATEGORIES: dict[str, str] = {
    "math": "Math",
    "coding": "Coding & Debugging",
    "translation": "Information seeking",  # the paper has no translation category
    "reasoning": "Reasoning",
    "creative_writing": "Creative writing",
    "data_analysis": "Data analysis",
    "information_seeking": "Information seeking",
    "advice_seeking": "Advice seeking",
    "planning": "Planning",
    "editing": "Editing",
    "role_playing": "Role playing",
    "brainstorming": "Brainstorming",
}

WEIGHT_TOLERANCE = 1e-3


def normalize_key(key: str) -> str:
    """``"Coding & Debugging"`` -> ``"coding"``, ``"Creative writing"`` -> ``"creative_writing"``."""
    text = key.strip().lower()
    if text in TASK_ALIASES:
        return TASK_ALIASES[text]
    snake = "_".join(text.replace("-", " ").split())
    return TASK_ALIASES.get(snake, snake)


def _unknown_key_error(key: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(normalize_key(key), list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"Unknown task {key!r}.{hint} Known tasks: {', '.join(sorted(known))}. "
        "Add your own with prompts={'my_task': 'You are an AI assistant that ...'} (CLI: --task-prompts FILE.json)."
    )


@dataclasses.dataclass(frozen=True)
class TaskMix:
    """Which task system prompt each row gets: a validated weighted mixture over prompt keys.

    Use :meth:`from_spec` to build one from a key (``"math"``), a ``"k=w,k=w"`` string or a mapping of
    weights. ``prompts`` holds the system prompt of each key in ``weights``; by default they come from
    :data:`TASK_PROMPTS`, and ``from_spec(..., prompts={...})`` adds or replaces prompts with your own.

    Weights must be non-negative, finite, name known keys, and sum to 1 (within 1e-3). Keys with
    weight 0 are dropped. The key of row ``i`` depends only on ``(seed, i)``.
    """

    weights: Mapping[str, float]
    prompts: Mapping[str, str]

    def __post_init__(self) -> None:
        weights = dict(self.weights)
        if not weights:
            raise ValueError("A task mixture needs at least one task, e.g. TaskMix.from_spec('math').")
        for key, weight in weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise ValueError(f"Task weight for {key!r} must be a finite number, got {weight!r}.")
            if weight < 0:
                raise ValueError(f"Task weight for {key!r} must be >= 0, got {weight}.")
            if key not in self.prompts:
                raise _unknown_key_error(key, list(self.prompts))
            if not str(self.prompts[key]).strip():
                raise ValueError(f"The system prompt for task {key!r} is empty.")
        total = sum(weights.values())
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise ValueError(
                f"Task weights must sum to 1 (got {round(total, 6)} for {weights}); "
                "for example --task-mix math=0.5,coding=0.5."
            )
        kept = {k: float(w) for k, w in weights.items() if w > 0}
        object.__setattr__(self, "weights", kept)
        object.__setattr__(self, "prompts", {k: str(self.prompts[k]) for k in kept})

    @classmethod
    def from_spec(
        cls, spec: "str | Mapping[str, float] | TaskMix", prompts: Mapping[str, str] | None = None
    ) -> "TaskMix":
        """Build a mixture from ``"math"``, ``"math=0.5,coding=0.5"``, ``{"math": 1.0}`` or a TaskMix.

        ``prompts`` maps extra keys (or registry keys to replace) to system prompt text.
        """
        registry = {**TASK_PROMPTS, **{normalize_key(k): v for k, v in (prompts or {}).items()}}
        if isinstance(spec, TaskMix):
            return cls(spec.weights, {**registry, **spec.prompts})
        if isinstance(spec, str):
            weights = parse_task_mix(spec)
        elif isinstance(spec, Mapping):
            weights = {}
            for key, weight in spec.items():
                weights[normalize_key(key)] = weights.get(normalize_key(key), 0.0) + weight
        else:
            raise TypeError(f"A task spec is a key, a 'key=weight,...' string or a mapping, got {type(spec).__name__}.")
        return cls(weights, registry)

    @property
    def keys(self) -> list[str]:
        return sorted(self.weights)

    def key_for_row(self, row: int, seed: int) -> str:
        """The task key of row ``row`` in a run seeded with ``seed`` (independent of shards and row count)."""
        digest = hashlib.sha256(f"magpie_hf-task:{seed}:{row}".encode()).digest()
        u = int.from_bytes(digest[:8], "little") / 2**64
        cumulative = 0.0
        keys = self.keys
        for key in keys:
            cumulative += self.weights[key] / sum(self.weights.values())
            if u < cumulative:
                return key
        return keys[-1]


def parse_task_mix(text: str) -> dict[str, float]:
    """``"math=0.5, coding=0.5"`` -> ``{"math": 0.5, "coding": 0.5}``; a bare ``"math"`` -> ``{"math": 1.0}``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("Empty task spec; use e.g. 'math' or 'math=0.5,coding=0.5'.")
    if len(items) == 1 and "=" not in items[0]:
        return {normalize_key(items[0]): 1.0}
    weights: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Bad task mixture item {item!r}: write KEY=WEIGHT, e.g. math=0.5.")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"Bad weight {value.strip()!r} for task {key.strip()!r}: it must be a number.") from None
        k = normalize_key(key)
        if k in weights:
            raise ValueError(f"Task {k!r} appears twice in {text!r}.")
        weights[k] = weight
    return weights


# -------------------------------------------------------------------- a cheap check of steering
_MATH = re.compile(
    r"\d\s*[-+*/^=×÷<>]\s*[\d(a-z]"          # 3 + 4, 2x = 6, 5*(...)
    r"|[a-z]\s*[\^=]\s*\d"                     # x^2, y = 3
    r"|\$[^$]*\\(?:frac|sqrt|int|sum)"          # LaTeX
    r"|\b(?:solve|equations?|calculate|calculation|compute|arithmetic|algebra\w*|geometr\w*|calculus|"
    r"integral|derivative|probabilit\w*|fractions?|percent(?:age)?|square root|polynomial|quadratic|"
    r"triangle|circle|radius|area of|perimeter|volume of|theorem|prime numbers?|factorial|logarithm|"
    r"math\w*|sum of|product of|average of|mean of|variance|ratio|multiply|divided by|divide|subtract|"
    r"how many|how much)\b",
    re.IGNORECASE,
)


def looks_like_math(text: str) -> bool:
    """A deliberately simple keyword/regex test for math queries, to measure task steering.

    Math when the text has digits joined by an operator (``3 + 4``, ``2x = 6``), a variable with a power or
    equation sign, LaTeX math, or a math word (solve, equation, calculate, probability, fraction, how many,
    ...). It is a coarse proxy, good for comparing two runs, not a task-category tagger.
    """
    return bool(_MATH.search(text or ""))
