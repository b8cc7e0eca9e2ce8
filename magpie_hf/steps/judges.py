"""LLM-judge taggers: task category, input quality and difficulty of each instruction (paper §3, App. F).

An instruct model (the paper uses Llama-3-8B-Instruct) reads the instruction inside a rubric,
written in its own chat template, and answers in JSON. Where the engine can, decoding is
constrained to the answer's JSON schema (``SamplingConfig.json_schema``: vLLM structured outputs,
or :mod:`magpie_hf.engines.constrained` for transformers). The answer is parsed and validated: labels are
always inside their published sets. A row whose answer cannot be parsed, or whose label falls
outside the set, gets nulls and the reason in ``<label>_error`` (``task_category_error``,
``input_quality_error``, ``difficulty_error``; null when the row parsed), and is counted in
``step.stats``; the run never stops for it.

Example:
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.steps.judges import TaskCategory, InputQuality, Difficulty
    >>> judge = EngineConfig("meta-llama/Meta-Llama-3-8B-Instruct")
    >>> tags = TaskCategory(engine=judge) >> InputQuality(engine=judge) >> Difficulty(engine=judge)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, ClassVar, Sequence

from magpie_hf.engines.base import Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig
from magpie_hf.errors import JudgeError
from magpie_hf.prompts.labels import DIFFICULTIES, INPUT_QUALITIES, TASK_CATEGORIES
from magpie_hf.seeds import row_seeds
from magpie_hf.steps.base import STRING, STRINGS, Batch, Features, Step, batch_len, resolve_engine

logger = logging.getLogger(__name__)

PAPER_JUDGE_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


# --------------------------------------------------------------------------------------------
# chat prompts and JSON answers (shared with the safety and reward steps)
# --------------------------------------------------------------------------------------------
def extract_json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (models often wrap it in prose or code fences), else None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def match_label(value: Any, labels: Sequence[str]) -> str | None:
    """``value`` as one of ``labels`` (case and surrounding space/punctuation ignored), else None."""
    if not isinstance(value, str):
        return None
    key = value.strip().strip("[]\"'.").strip().lower()
    for label in labels:
        if key == label.lower():
            return label
    return None


# --------------------------------------------------------------------------------------------
# the judge step
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True)
class JudgeStep(Step):
    """Base for steps where an instruct model answers a rubric about one text column in JSON.

    Subclasses set the class variables and implement :meth:`prompt`, :meth:`schema` and
    :meth:`parse` (which returns the output values or raises :class:`JudgeError`).
    """

    #: the column that holds the instruction's judge model name
    generator_column: ClassVar[str]
    #: the column that holds the reason a row could not be tagged (null when it could)
    error_column: ClassVar[str]
    #: the value columns (without generator/error columns)
    value_columns: ClassVar[tuple[str, ...]]

    engine: Engine | EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(model=PAPER_JUDGE_MODEL))
    #: the column to judge
    input_column: str = "instruction"
    #: ask the engine to constrain decoding to the answer's JSON schema
    constrained: bool = True
    #: longest free-text field (characters) the schema allows; keeps answers inside max_tokens
    max_field_chars: int = 300
    #: ask for the free-text fields (quality explanation, intent, knowledge); without them the judge
    #: answers with the label alone (a few tokens) and those columns are null
    explanations: bool = True
    max_tokens: int = 192
    batch_size: int = 64
    #: template variables for the judge's chat template, e.g. {"enable_thinking": False} for a Qwen3 judge
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._engine: Engine | None = None

    def load(self) -> None:
        self._engine = resolve_engine(self.engine)

    def unload(self) -> None:
        self._engine = None

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.input_column,)

    def output_features(self) -> Features:
        """The value columns (text unless a subclass says otherwise), the judge's name and the error."""
        return {
            **{column: STRING for column in self.value_columns},
            self.generator_column: STRING,
            self.error_column: STRING,
        }

    @property
    def judge_name(self) -> str:
        engine = self._engine or self.engine
        config = engine.config if isinstance(engine, Engine) else engine
        return config.describe()

    # -- to implement --------------------------------------------------------------------------
    def judged_items(self, batch: Batch) -> list[Any]:
        """What each row's prompt is about (default: ``input_column``); None or blank = not judged."""
        return list(batch[self.input_column])

    def prompt(self, item: Any) -> str:
        """The user message that asks the rubric about one judged item."""
        raise NotImplementedError

    def schema(self) -> dict:
        """JSON schema of the answer."""
        raise NotImplementedError

    def parse(self, answer: dict) -> dict[str, Any]:
        """Values for :attr:`value_columns` from a decoded answer, or raise :class:`JudgeError`."""
        raise NotImplementedError

    # -- work ----------------------------------------------------------------------------------
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=0.0,
            max_tokens=self.max_tokens,
            json_schema=self.schema() if self.constrained else None,
        )

    def process(self, batch: Batch, *, seed: int) -> Batch:
        return self.judge(batch, row_seeds(seed, batch_len(batch)))

    def judge(self, batch: Batch, seeds: Sequence[int]) -> Batch:
        """:meth:`process` with each row's seed given (row ``i``'s samples draw from ``seeds[i] + j``)."""
        if self._engine is None:
            self.load()
        assert self._engine is not None
        items = self.judged_items(batch)
        n = batch_len(batch)
        values: list[dict[str, Any]] = [dict.fromkeys(self.value_columns) for _ in range(n)]
        errors: list[str | None] = [None] * n
        todo = [i for i, t in enumerate(items) if t is not None and (not isinstance(t, str) or t.strip())]
        for i in set(range(n)) - set(todo):
            errors[i] = "empty or missing input"
            self.stats["empty_input"] += 1
        # the rubric as one user message, rendered with the judge's chat template (or sent as a message to a chat endpoint)
        conversations = [[{"role": "user", "content": self.prompt(items[i])}] for i in todo]
        outputs = self._engine.generate_chat(
            conversations, self.sampling(), templates=self._engine.chat_templates(self.chat_template_kwargs),
            seeds=[seeds[i] for i in todo], progress=self.progress_callback,
        ) if conversations else []
        for i, completions in zip(todo, outputs):
            parsed, problems = [], []
            for completion in completions:
                if not completion.ok:  # never generated (a server's 400 for this prompt): its reason
                    problems.append(completion.error or f"no answer (finish reason {completion.finish_reason})")
                    continue
                try:
                    parsed.append(self._parse_completion(completion))
                except JudgeError as err:
                    problems.append(str(err))
            if parsed:
                values[i] = self.combine(parsed)
                self.stats["parsed"] += 1
            elif completions[0].failure:  # not generated (prompt too long, aborted): null + reason
                errors[i] = completions[0].error
                self.stats[completions[0].failure] += 1
            else:
                errors[i] = problems[0]
                self.stats["failed" if not any(c.ok for c in completions) else "unparseable"] += 1
        out = dict(batch)
        for column in self.value_columns:
            out[column] = [v[column] for v in values]
        out[self.generator_column] = [self.judge_name] * n
        out[self.error_column] = errors
        return out

    def combine(self, parsed: list[dict[str, Any]]) -> dict[str, Any]:
        """One row's values from the parsed answers of its samples (default: the first)."""
        return parsed[0]

    def _parse_completion(self, completion: Any) -> dict[str, Any]:
        if completion.failure:
            raise JudgeError(completion.error or completion.failure)
        answer = extract_json_object(completion.text)
        if answer is None:
            suffix = " (hit max_tokens)" if completion.finish_reason == "length" else ""
            raise JudgeError(f"no JSON object in the answer{suffix}: {completion.text[:120]!r}")
        return self.parse(answer)

    # -- helpers for subclasses ----------------------------------------------------------------
    def _text_field(self) -> dict:
        return {"type": "string", "maxLength": self.max_field_chars}

    def _label(self, answer: dict, key: str, labels: Sequence[str]) -> str:
        if key not in answer:
            raise JudgeError(f"answer has no {key!r}: {json.dumps(answer)[:120]}")
        label = match_label(answer[key], labels)
        if label is None:
            self.stats["out_of_set"] += 1
            shown = list(labels) if len(labels) <= 5 else f"the {len(labels)} {key} labels"
            raise JudgeError(f"{key} {str(answer[key])[:80]!r} is not one of {shown}")
        return label

    def _text(self, answer: dict, key: str) -> str | None:
        value = answer.get(key)
        return value.strip() if isinstance(value, str) else None


def quote_text(text: str) -> str:
    return text.replace("```", "'''")


# --------------------------------------------------------------------------------------------
# task category
# --------------------------------------------------------------------------------------------
_CATEGORY_GUIDE = """\
- Information seeking: the user wants facts, explanations or details about a topic.
- Reasoning: the user needs logical thinking, problem solving or the weighing of arguments.
- Planning: the user wants a plan, schedule, strategy or organised set of steps.
- Editing: the user wants existing text rewritten, proofread, shortened or reformatted.
- Coding & Debugging: the user wants code written, reviewed, explained or fixed.
- Math: the user asks a mathematical question, calculation or proof.
- Role playing: the user asks the assistant to act as a character or take on a persona.
- Data analysis: the user wants data, statistics or tables interpreted or processed.
- Creative writing: the user wants a story, poem, script or other imaginative text.
- Advice seeking: the user wants guidance or recommendations about a personal or practical matter.
- Brainstorming: the user wants many ideas or options generated.
- Others: none of the above fits."""


@dataclasses.dataclass(kw_only=True)
class TaskCategory(JudgeStep):
    """Tag ``task_category`` (one of :data:`TASK_CATEGORIES`) and ``other_task_category`` (a list).

    Example:
        >>> step = TaskCategory(engine=EngineConfig.embedded(), max_tokens=64)  # doctest: +SKIP
    """

    value_columns: ClassVar[tuple[str, ...]] = ("task_category", "other_task_category")
    generator_column: ClassVar[str] = "task_category_generator"
    error_column: ClassVar[str] = "task_category_error"

    max_tokens: int = 64
    #: at most this many secondary categories
    max_other: int = 3

    def output_features(self) -> Features:
        return {**super().output_features(), "other_task_category": STRINGS}

    def prompt(self, text: str) -> str:
        return (
            "# Task\nClassify the user query below by the kind of task it asks for. Choose the main "
            "category, then any other categories that also apply, from this list:\n\n"
            f"{_CATEGORY_GUIDE}\n\n"
            f"## User query\n```\n{quote_text(text)}\n```\n\n"
            "## Answer format\nReply with JSON only:\n"
            '{"task_category": "<main category>", "other_task_category": ["<category>", ...]}'
        )

    def schema(self) -> dict:
        return {
            "type": "object",
            "properties": {
                "task_category": {"type": "string", "enum": list(TASK_CATEGORIES)},
                "other_task_category": {
                    "type": "array",
                    "items": {"type": "string", "enum": list(TASK_CATEGORIES)},
                    "maxItems": self.max_other,
                },
            },
            "required": ["task_category", "other_task_category"],
        }

    def parse(self, answer: dict) -> dict[str, Any]:
        primary = self._label(answer, "task_category", TASK_CATEGORIES)
        raw_other = answer.get("other_task_category") or []
        if isinstance(raw_other, str):
            raw_other = [raw_other]
        other: list[str] = []
        for item in raw_other if isinstance(raw_other, list) else []:
            label = match_label(item, TASK_CATEGORIES)
            if label is None:
                self.stats["other_out_of_set"] += 1  # dropped, the main label still stands
            elif label != primary and label not in other:
                other.append(label)
        return {"task_category": primary, "other_task_category": other[: self.max_other]}


# --------------------------------------------------------------------------------------------
# input quality
# --------------------------------------------------------------------------------------------
_QUALITY_GUIDE = """\
- very poor: unclear, vague or incoherent; essential information and context are missing.
- poor: somewhat unclear or missing important details; needs a lot of clarification.
- average: moderately clear and specific; some extra information may be needed.
- good: clear, specific and mostly well formed; enough context to understand the intent.
- excellent: very clear, specific and well articulated; everything needed for a full answer is there."""


@dataclasses.dataclass(kw_only=True)
class InputQuality(JudgeStep):
    """Tag ``input_quality`` (one of :data:`INPUT_QUALITIES`) with a ``quality_explanation``.

    Example:
        >>> step = InputQuality(engine=EngineConfig.embedded(), max_tokens=96)  # doctest: +SKIP
    """

    value_columns: ClassVar[tuple[str, ...]] = ("input_quality", "quality_explanation")
    generator_column: ClassVar[str] = "quality_generator"
    error_column: ClassVar[str] = "input_quality_error"

    def prompt(self, text: str) -> str:
        answer = (
            "First explain briefly the strengths and weaknesses of the query, then give the rating. Reply with "
            'JSON only:\n{"explanation": "<short assessment>", "input_quality": "<very poor/poor/average/good/excellent>"}'
            if self.explanations
            else 'Reply with JSON only:\n{"input_quality": "<very poor/poor/average/good/excellent>"}'
        )
        return (
            "# Task\nJudge how well the user query below is written: its clarity, specificity and "
            "coherence. Use this scale:\n\n"
            f"{_QUALITY_GUIDE}\n\n"
            f"## User query\n```\n{quote_text(text)}\n```\n\n"
            f"## Answer format\n{answer}"
        )

    def schema(self) -> dict:
        properties = {"explanation": self._text_field()} if self.explanations else {}
        properties["input_quality"] = {"type": "string", "enum": list(INPUT_QUALITIES)}
        return {"type": "object", "properties": properties, "required": list(properties)}

    def parse(self, answer: dict) -> dict[str, Any]:
        return {
            "input_quality": self._label(answer, "input_quality", INPUT_QUALITIES),
            "quality_explanation": self._text(answer, "explanation"),
        }


# --------------------------------------------------------------------------------------------
# difficulty
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True)
class Difficulty(JudgeStep):
    """Tag ``difficulty`` (one of :data:`DIFFICULTIES`) with the user's ``intent`` and the ``knowledge`` needed.

    Example:
        >>> step = Difficulty(engine=EngineConfig.embedded(), max_tokens=96)  # doctest: +SKIP
    """

    value_columns: ClassVar[tuple[str, ...]] = ("intent", "knowledge", "difficulty")
    generator_column: ClassVar[str] = "difficulty_generator"
    error_column: ClassVar[str] = "difficulty_error"

    max_field_chars: int = 200

    def prompt(self, text: str) -> str:
        if self.explanations:
            task = ("State the user's intent, the knowledge a model needs to solve the task, and then rate the "
                    "difficulty as very easy, easy, medium, hard or very hard.")
            answer = ('{"intent": "The user wants to ...", "knowledge": "To solve this, a model needs to know ...", '
                      '"difficulty": "<very easy/easy/medium/hard/very hard>"}')
        else:
            task = "Rate the difficulty as very easy, easy, medium, hard or very hard."
            answer = '{"difficulty": "<very easy/easy/medium/hard/very hard>"}'
        return (
            f"# Task\nWork out what the user below wants and how hard it is to answer well. {task}\n\n"
            f"## User query\n```\n{quote_text(text)}\n```\n\n"
            f"## Answer format\nReply with JSON only:\n{answer}"
        )

    def schema(self) -> dict:
        properties = {"intent": self._text_field(), "knowledge": self._text_field()} if self.explanations else {}
        properties["difficulty"] = {"type": "string", "enum": list(DIFFICULTIES)}
        return {"type": "object", "properties": properties, "required": list(properties)}

    def parse(self, answer: dict) -> dict[str, Any]:
        return {
            "intent": self._text(answer, "intent"),
            "knowledge": self._text(answer, "knowledge"),
            "difficulty": self._label(answer, "difficulty", DIFFICULTIES),
        }
