"""Responses from a *base* (not instruction-tuned) model, and the reward difference against them.

The paper (Section 3, Appendix A.3) measures how much better a Magpie response is than what the
untuned base model would say: ``reward_difference = instruct_reward - base_reward``, both scored by
the same reward model. The base model is prompted in context, URIAL-style: a short preamble and a
few example exchanges as plain text (no chat template), then the instruction, decoded greedily and
stopped where the next exchange would begin.

Example:
    >>> from magpie_hf.steps.base_responses import BasePromptTemplate
    >>> template = BasePromptTemplate(preamble="Chat log.", examples=(("Hi?", "Hello."),))
    >>> print(template.render("What is 2 + 2?"))
    Chat log.
    <BLANKLINE>
    # User:
    Hi?
    <BLANKLINE>
    # Assistant:
    Hello.
    <BLANKLINE>
    # User:
    What is 2 + 2?
    <BLANKLINE>
    # Assistant:
    <BLANKLINE>
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from magpie_hf.engines.base import Engine, SamplingConfig
from magpie_hf.engines.config import EngineConfig
from magpie_hf.seeds import row_seeds
from magpie_hf.steps.base import FLOAT, INT, STRING, Batch, Features, Step, batch_len, resolve_engine
from magpie_hf.templates import tokenizer_adds_bos

#: the paper's base model for ``base_output`` (URIAL-prompted)
PAPER_BASE_MODEL = "meta-llama/Meta-Llama-3-8B"

DEFAULT_PREAMBLE = (
    "# Instructions\n\n"
    "The following are conversations between a user and a helpful, honest AI assistant. "
    "The assistant answers the user's request directly and accurately, explains its reasoning "
    "when that helps, formats code and lists clearly, and says plainly when it is unsure."
)

DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "What causes the seasons on Earth?",
        "The seasons come from the tilt of Earth's axis, about 23.4 degrees relative to the plane of "
        "its orbit. As Earth travels around the Sun, each hemisphere spends part of the year leaning "
        "toward the Sun, which brings longer days and more direct sunlight (summer), and part of the "
        "year leaning away, which brings shorter days and more slanted light (winter). The changing "
        "distance between Earth and the Sun plays only a minor role.",
    ),
    (
        "Write a Python function that returns the largest number in a list.",
        "Here is a short function that also rejects an empty list:\n\n"
        "```python\n"
        "def largest(numbers):\n"
        "    if not numbers:\n"
        '        raise ValueError("the list is empty")\n'
        "    best = numbers[0]\n"
        "    for n in numbers[1:]:\n"
        "        if n > best:\n"
        "            best = n\n"
        "    return best\n"
        "```\n\n"
        "Python's built-in `max(numbers)` does the same in one call.",
    ),
    (
        "Give me three tips for sleeping better.",
        "1. Keep a regular schedule: go to bed and get up at the same time every day, weekends included.\n"
        "2. Make the bedroom dark, quiet and cool, and put screens away for the last hour before bed.\n"
        "3. Avoid caffeine after midday and heavy meals late in the evening.\n\n"
        "If poor sleep lasts for weeks, it is worth talking to a doctor.",
    ),
)


@dataclasses.dataclass(frozen=True)
class BasePromptTemplate:
    """An in-context (URIAL-style) prompt that makes a base model answer like an assistant.

    The rendered prompt is ``preamble``, then each example as ``# User:`` / ``# Assistant:``
    blocks, then the instruction and an open ``# Assistant:`` block. A base model continues the
    pattern and, when its answer is done, starts the next ``# User:`` block: :attr:`stop_marker`.
    """

    preamble: str = DEFAULT_PREAMBLE
    examples: tuple[tuple[str, str], ...] = DEFAULT_EXAMPLES
    user_marker: str = "# User:"
    assistant_marker: str = "# Assistant:"

    def __post_init__(self) -> None:
        for query, answer in self.examples:
            if self.user_marker in answer or self.user_marker in query:
                raise ValueError(f"An example contains the stop marker {self.user_marker!r}; reword it.")
        object.__setattr__(self, "examples", tuple(tuple(e) for e in self.examples))

    @property
    def stop_marker(self) -> str:
        """The text that starts the next exchange; generation stops there."""
        return self.user_marker

    def _exchange(self, query: str, answer: str | None) -> str:
        head = f"{self.user_marker}\n{query.strip()}\n\n{self.assistant_marker}\n"
        return head if answer is None else f"{head}{answer.strip()}\n\n"

    def render(self, instruction: str, *, bos: str = "") -> str:
        """The raw completion prompt for ``instruction`` (``bos`` is prepended as is)."""
        parts = [bos, f"{self.preamble.strip()}\n\n"] if self.preamble.strip() else [bos]
        parts += [self._exchange(q, a) for q, a in self.examples]
        parts.append(self._exchange(instruction, None))
        return "".join(parts)

    def clean(self, text: str) -> str:
        """Cut ``text`` at the next-exchange marker, drop a trailing partial marker, strip spaces."""
        cut = text.find(self.stop_marker)
        if cut >= 0:
            text = text[:cut]
        # a completion that ran out of tokens may end in the first characters of "\n# User:"
        partial = "\n" + self.stop_marker
        for k in range(len(partial) - 1, 1, -1):
            if text.endswith(partial[:k]):
                text = text[:-k]
                break
        return text.strip()


def bos_prefix(tokenizer: Any) -> str:
    """``tokenizer.bos_token`` when the tokenizer itself would put it in front of a text, else ``""``.

    Engines tokenize prompts without special tokens, so a raw prompt must carry the BOS the model
    was trained with (Llama-3 adds ``<|begin_of_text|>``; SmolLM2 and Qwen add none).
    """
    return tokenizer.bos_token if tokenizer_adds_bos(tokenizer) else ""


@dataclasses.dataclass(kw_only=True)
class BaseResponses(Step):
    """Answer each ``instruction`` with a base model prompted in context (URIAL-style), greedily.

    Writes ``base_output`` (the answer, cut before the next ``# User:`` block),
    ``base_output_generator`` (the model), ``base_output_finish_reason`` (``stop``/``length``) and
    ``base_output_num_tokens``. Empty answers are kept as ``""`` and counted in
    ``stats["empty_base_output"]``. An answer that could not be generated (the prompt does not fit in
    the base model's context, an abort) is null, with the reason in ``base_output_error`` (null
    otherwise), and counted in ``stats``.

    Example:
        >>> from magpie_hf.engines import EngineConfig
        >>> step = BaseResponses(engine=EngineConfig(model="meta-llama/Meta-Llama-3-8B"))  # doctest: +SKIP
        >>> step.load(); step.process({"instruction": ["Name a prime."]}, seed=0)["base_output"]  # doctest: +SKIP
    """

    inputs: ClassVar[tuple[str, ...]] = ("instruction",)

    engine: Engine | EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(model=PAPER_BASE_MODEL))
    template: BasePromptTemplate = dataclasses.field(default_factory=BasePromptTemplate)
    max_tokens: int = 2048
    repetition_penalty: float = 1.0
    #: prepend the tokenizer's BOS when the tokenizer would add one (``None``: detect)
    add_bos: bool | None = None

    def output_features(self) -> Features:
        return {
            "base_output": STRING,
            "base_output_generator": STRING,
            "base_output_finish_reason": STRING,
            "base_output_num_tokens": INT,
            "base_output_error": STRING,
        }

    def load(self) -> None:
        self._engine = resolve_engine(self.engine)
        self._engine.require_raw_prompts(
            type(self).__name__, "a base model continues a raw few-shot (URIAL) prompt that has no chat template"
        )
        tokenizer = self._engine.tokenizer
        if self.add_bos is None:
            self._bos = bos_prefix(tokenizer)
        else:
            self._bos = (tokenizer.bos_token or "") if self.add_bos else ""

    def unload(self) -> None:
        self._engine = None  # type: ignore[assignment]

    @property
    def generator_name(self) -> str:
        config = self.engine.config if isinstance(self.engine, Engine) else self.engine
        return config.describe()

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            temperature=0.0,
            max_tokens=self.max_tokens,
            repetition_penalty=self.repetition_penalty,
            stop=(self.template.stop_marker,),
        )

    def prompt(self, instruction: str) -> str:
        """The raw prompt the base model sees for ``instruction``."""
        if not hasattr(self, "_bos"):
            raise RuntimeError("Call load() before prompt(): the BOS depends on the loaded tokenizer.")
        return self.template.render(instruction, bos=self._bos)

    def process(self, batch: Batch, *, seed: int) -> Batch:
        n = batch_len(batch)
        if n == 0:
            return {**batch, **{c: [] for c in self.outputs}}
        prompts = [self.prompt(i or "") for i in batch["instruction"]]
        completions = self._engine.generate(
            prompts, self.sampling(), seeds=row_seeds(seed, n), progress=getattr(self, "progress_callback", None)
        )
        texts, reasons, counts, errors = [], [], [], []
        for (completion,) in completions:
            self.stats["generated_tokens"] += completion.num_tokens
            if completion.failure:  # not generated (prompt too long, aborted): null + reason
                self.stats[completion.failure] += 1
                text = None
            else:
                text = self.template.clean(completion.text)
                if not text:
                    self.stats["empty_base_output"] += 1
            texts.append(text)
            reasons.append(completion.finish_reason)
            counts.append(completion.num_tokens)
            errors.append(completion.error if completion.failure else None)
        out = dict(batch)
        out["base_output"] = texts
        out["base_output_generator"] = [self.generator_name] * n
        out["base_output_finish_reason"] = reasons
        out["base_output_num_tokens"] = counts
        out["base_output_error"] = errors
        return out


@dataclasses.dataclass(kw_only=True)
class RewardDifference(Step):
    """``reward_difference = instruct_reward - base_reward`` (null when either reward is null).

    Both rewards must come from the same reward model: score ``response`` into ``instruct_reward``
    and ``base_output`` into ``base_reward`` with the same scorer before this step.

    Example:
        >>> RewardDifference().process({"instruct_reward": [2.0, None], "base_reward": [0.5, 1.0]}, seed=0)
        {'instruct_reward': [2.0, None], 'base_reward': [0.5, 1.0], 'reward_difference': [1.5, None]}
    """

    inputs: ClassVar[tuple[str, ...]] = ("instruct_reward", "base_reward")

    def output_features(self) -> Features:
        return {"reward_difference": FLOAT}

    def process(self, batch: Batch, *, seed: int) -> Batch:
        diffs = []
        for r, b in zip(batch["instruct_reward"], batch["base_reward"]):
            if r is None or b is None or math.isnan(r) or math.isnan(b):
                self.stats["null_reward_difference"] += 1
                diffs.append(None)
            else:
                diffs.append(float(r) - float(b))
        return {**batch, "reward_difference": diffs}
