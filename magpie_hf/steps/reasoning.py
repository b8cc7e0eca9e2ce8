"""Reasoning responses: the thinking block in ``reasoning``, only the final answer in ``response`` and
``conversations`` (Magpie-Reasoning style data from a reasoning model).

A reasoning model writes a thinking block before its answer, ``<think>…</think>`` for DeepSeek-R1, Qwen3,
QwQ, GLM-4.5+ and SmolLM3. :class:`ReasoningResponses` is :class:`~magpie_hf.steps.Responses` that splits
every completion at the block's tags:

- ``<think>R</think>A``: ``reasoning = R``, ``response = A``. When the generation prompt itself opens the
  block (DeepSeek-R1's template ends the prompt with ``<think>\\n``) the completion is ``R</think>A`` and
  splits the same way;
- no thinking block: ``reasoning`` is null, ``response`` the whole answer (``without_reasoning`` in
  ``stats``);
- a block still open when the completion ended is dropped and counted: cut by the length limit
  (``dropped_cut_reasoning``) or the turn ended inside it (``dropped_unclosed_reasoning``);
- a closed block longer than ``thinking_budget`` tokens: dropped, ``dropped_reasoning_over_budget``;
- a closed block and no answer after it: dropped, ``dropped_empty_answer``.

With ``drop_truncated=True`` (off by default, as in :class:`Responses`) every completion cut by the length
limit is dropped before the split and counted as ``dropped_truncated_response``; a response whose thinking
closed but whose answer was cut is otherwise kept, with ``response_finish_reason == "length"``.

The tags come from the response model's derived chat template (:attr:`ChatTemplates.reasoning
<magpie_hf.templates.ChatTemplates>`), or ``reasoning_tags=(open, close)`` sets them; a template with no
tags (the embedded SmolLM2) falls back to ``<think>``/``</think>``. Whether the prompt opens the block is
read off the actual response prompt, so it holds for explicit tags and ``chat_template_kwargs`` too.

Budgets. ``max_tokens = thinking_budget + answer_budget`` is what the engine enforces: neither
transformers' ``max_new_tokens`` nor vLLM's ``SamplingParams.max_tokens`` can cap one part of a
completion. A thinking block is measured afterwards with the response tokenizer (the text between the
tags) and one longer than ``thinking_budget`` counts as cut; the answer may use what the thinking left.
vLLM 0.34 can cap the thinking itself (``SamplingParams.thinking_token_budget``,
vllm/sampling_params.py:431), but only on an engine started with a reasoning parser/config
(vllm/v1/engine/input_processor.py:191-199 refuses it otherwise) and it *forces* the end tag
(``ReasoningConfig.reasoning_end_str``, vllm/config/reasoning.py:26-27) rather than letting the model
finish its thought; this step keeps one backend-neutral rule instead.

Columns: ``reasoning`` (string, null without a block), ``reasoning_num_tokens`` (int, 0 without a block).
``response_num_tokens`` stays the number of tokens the model generated for the turn (thinking and answer),
the quantity ``max_tokens`` caps.

Example:
    >>> from magpie_hf.templates import ReasoningMarkers
    >>> r1 = ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=True)
    >>> split_reasoning("Two plus two is four.\\n</think>\\n\\nIt is 4.", r1)
    ReasoningSplit(reasoning='Two plus two is four.', answer='It is 4.', closed=True)
    >>> qwen3 = ReasoningMarkers("<think>", "</think>", opened_by_generation_prompt=False)
    >>> split_reasoning("<think>\\nAdd them.\\n</think>\\n\\n4", qwen3)
    ReasoningSplit(reasoning='Add them.', answer='4', closed=True)
    >>> split_reasoning("<think>First, I need to", qwen3).closed
    False
    >>> split_reasoning("Paris.", qwen3)
    ReasoningSplit(reasoning=None, answer='Paris.', closed=True)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from magpie_hf.steps.base import INT, STRING, Batch, Features, select_rows
from magpie_hf.steps.generate import Responses
from magpie_hf.templates import REASONING_TAGS, USER_SENTINEL, ReasoningMarkers, encode

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReasoningSplit:
    """A completion split at its thinking block.

    ``reasoning`` is None when the completion has no block; ``closed`` is False when the block never ended
    (then ``answer`` is empty).
    """

    reasoning: str | None
    answer: str
    closed: bool


def split_reasoning(text: str, markers: ReasoningMarkers) -> ReasoningSplit:
    """Split ``text`` into thinking and answer.

    A block counts only at the start of the completion (or, with ``markers.opened_by_generation_prompt``,
    the completion starts inside it; an echoed opening tag is skipped). Text after the closing tag is the
    answer; both parts are stripped.
    """
    body = text.lstrip()
    if body.startswith(markers.open):
        body = body[len(markers.open):]
    elif not markers.opened_by_generation_prompt:
        return ReasoningSplit(None, text.strip(), True)
    at = body.find(markers.close)
    if at < 0:
        return ReasoningSplit(body.strip(), "", False)
    return ReasoningSplit(body[:at].strip(), body[at + len(markers.close):].strip(), True)


def parse_reasoning_tags(value: str | Sequence[str] | None) -> tuple[str, str] | None:
    """``"<think>,</think>"`` (or a two-item list) -> ``("<think>", "</think>")``; None stays None.

    Example:
        >>> parse_reasoning_tags("<reasoning>,</reasoning>")
        ('<reasoning>', '</reasoning>')
    """
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    if len(items) != 2 or not all(items) or items[0] == items[1]:
        raise ValueError(
            f"reasoning tags must be two different non-empty strings, the opening and the closing tag, e.g. "
            f"'<think>,</think>' (YAML: ['<think>', '</think>']); got {value!r}."
        )
    return items[0], items[1]


@dataclasses.dataclass(kw_only=True)
class ReasoningResponses(Responses):
    """:class:`~magpie_hf.steps.Responses` from a reasoning model, its thinking split off (see the module).

    Args:
        thinking_budget: most tokens of a thinking block; a longer one counts as cut.
        answer_budget: tokens for the answer; ``max_tokens`` is ``thinking_budget + answer_budget``.
        reasoning_tags: ``(open, close)`` instead of the tags derived from the chat template.
        max_tokens: leave unset (it is the sum of the budgets); a different value is refused.

    Example:
        >>> from magpie_hf.engines import EngineConfig
        >>> step = ReasoningResponses(engine=EngineConfig.embedded(), thinking_budget=256, answer_budget=128)
        >>> step.max_tokens, step.outputs[-2:]
        (384, ('reasoning', 'reasoning_num_tokens'))
    """

    thinking_budget: int = 8192
    answer_budget: int = 2048
    reasoning_tags: tuple[str, str] | None = None
    max_tokens: int | None = None  # type: ignore[assignment]  # derived from the budgets

    def __post_init__(self) -> None:
        for name in ("thinking_budget", "answer_budget"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {getattr(self, name)!r}")
        total = self.thinking_budget + self.answer_budget
        if self.max_tokens is not None and self.max_tokens != total:
            raise ValueError(
                f"ReasoningResponses caps a completion at thinking_budget + answer_budget = {total} tokens, but "
                f"max_tokens={self.max_tokens} was given; set the two budgets instead of max_tokens."
            )
        self.max_tokens = total
        self.reasoning_tags = parse_reasoning_tags(self.reasoning_tags)
        super().__post_init__()
        self._markers: ReasoningMarkers | None = None
        self._markers_source: str | None = None

    def output_features(self) -> Features:
        return {**super().output_features(), "reasoning": STRING, "reasoning_num_tokens": INT}

    def load(self) -> None:
        super().load()
        self._markers, self._markers_source = self._resolve_markers()

    def provenance(self) -> dict[str, Any]:
        record: dict[str, Any] = {"thinking_budget": self.thinking_budget, "answer_budget": self.answer_budget,
                                  "max_tokens": self.max_tokens}
        if self._markers is not None:
            record.update(self._markers.to_record(), tags_from=self._markers_source)
        return {**super().provenance(), "reasoning": record}

    def _resolve_markers(self) -> tuple[ReasoningMarkers, str]:
        """The tags (explicit, the template's, or the default) and whether the response prompt opens the block."""
        templates = self._templates
        assert templates is not None
        if self.reasoning_tags is not None:
            (open_tag, close_tag), source = self.reasoning_tags, "explicit"
        elif templates.reasoning is not None:
            (open_tag, close_tag), source = (templates.reasoning.open, templates.reasoning.close), "chat template"
        else:
            (open_tag, close_tag), source = REASONING_TAGS[0], "default"
            logger.info("The chat template of %s names no thinking tags; splitting at %s...%s (set reasoning_tags "
                        "to change them).", self._model_name(), open_tag, close_tag)
        # what the response prompt ends with after the user's words: does it leave a block open?
        tail = templates.response_prompt([{"role": "user", "content": USER_SENTINEL}]).split(USER_SENTINEL)[-1]
        opened = tail.rfind(open_tag) > tail.rfind(close_tag)
        return ReasoningMarkers(open_tag, close_tag, opened), source

    def process(self, batch: Batch, *, seed: int) -> Batch:
        return self._split_reasoning(super().process(batch, seed=seed))

    def _split_reasoning(self, batch: Batch) -> Batch:
        """Move each response's thinking block to ``reasoning``; drop and count the rows that cannot be split."""
        assert self._markers is not None and self._engine is not None, "call load() first"
        tokenizer = self._engine.tokenizer
        reasoning: list[str | None] = []
        counts: list[int | None] = []
        keep: list[bool] = []
        responses, conversations = list(batch["response"]), [list(c) if c else c for c in batch["conversations"]]
        for i, (text, finish) in enumerate(zip(responses, batch["response_finish_reason"])):
            if text is None:  # a failed completion: null + reason, set by Responses
                reasoning.append(None)
                counts.append(None)
                keep.append(True)
                continue
            split = split_reasoning(text, self._markers)
            num_tokens = len(encode(tokenizer, split.reasoning)) if split.reasoning else 0
            drop = None
            if split.reasoning is None:
                self.stats["without_reasoning"] += 1
            elif not split.closed:
                drop = "dropped_cut_reasoning" if finish == "length" else "dropped_unclosed_reasoning"
            elif num_tokens > self.thinking_budget:
                drop = "dropped_reasoning_over_budget"
            elif self.drop_empty and not split.answer:
                drop = "dropped_empty_answer"
            else:
                self.stats["with_reasoning"] += 1
            if drop:
                self.stats[drop] += 1
            keep.append(drop is None)
            reasoning.append(split.reasoning)
            counts.append(num_tokens)
            responses[i] = split.answer
            if conversations[i]:
                conversations[i][-1] = {**conversations[i][-1], "content": split.answer}
        new = {**batch, "response": responses, "conversations": conversations, "reasoning": reasoning,
               "reasoning_num_tokens": counts}
        return select_rows(new, keep)
