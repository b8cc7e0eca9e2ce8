"""Multi-turn Magpie (paper, Appendix A.1): grow each single-turn row into a conversation of ``n_turns``.

After turn 1 (from :class:`~magpie_hf.steps.MagpieInstructions` >> :class:`~magpie_hf.steps.Responses`),
the next user query is sampled from the chat template's own rendering of the conversation so far followed
by the user header (``ChatTemplates.query_prompt(history)``). While sampling queries, a multi-turn system
prompt reminds the model that it is writing the user's next message in a multi-round conversation; the
replies are then generated with the normal template, without it. Every turn's queries of a batch go to the
engine in one call, and so do its responses; row ``i``'s turn ``t`` samples its query from seed
``row_seed + 2(t - 2)`` and its reply from the next one.

A conversation whose next query or response comes out empty, cut by ``max_tokens``, rejected by a
post-processing filter, or not generated at all (the conversation no longer fits in the model's
context: ``prompt_too_long_query@3``) stops before that turn: ``conversations`` always alternates user/assistant, with
no empty message, and ``num_turns`` says how many user turns it kept (``multi_turn_end_reason`` why it
stopped early). Columns ``instruction_2``, ``response_2``, ... follow the published Magpie-MT datasets
(``instruction``/``response`` stay turn 1); turns a conversation did not reach are null.

Example:
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.steps import MagpieInstructions, Responses
    >>> from magpie_hf.steps.multi_turn import MultiTurn
    >>> engine = EngineConfig.embedded()
    >>> chain = (MagpieInstructions(engine=engine, num_rows=50) >> Responses(engine=engine)
    ...          >> MultiTurn(engine=engine, n_turns=3))
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

from magpie_hf.engines import Engine, EngineConfig, SamplingConfig
from magpie_hf.seeds import SEEDS_PER_ROW, row_seeds
from magpie_hf.steps.base import INT, MESSAGES, STRING, Batch, Features, Step, resolve_engine, select_rows
from magpie_hf.steps.generate import ChatTemplateMixin
from magpie_hf.steps.postprocess import InstructionFilter, apply_filters

if TYPE_CHECKING:
    from magpie_hf.engines import Completion

#: Shown to the model (as the system message) only while it writes the user's follow-up queries.
MULTI_TURN_SYSTEM_PROMPT = (
    "This is a conversation of several rounds between a user and an AI assistant. The user opened with a "
    "question or request, the assistant answered, and now the user writes the next message: a natural "
    "follow-up in the user's own voice that builds on the previous answer, asking for more detail, a "
    "clarification, an example, a variation, or a related next step."
)

Message = dict[str, str]


def turn_columns(n_turns: int) -> list[str]:
    """``["instruction_2", "response_2", ..., f"response_{n_turns}"]``."""
    return [f"{kind}_{k}" for k in range(2, n_turns + 1) for kind in ("instruction", "response")]


def alternates(conversation: Sequence[Message]) -> bool:
    """True when roles go user, assistant, user, ... and no message is empty."""
    return all(
        m.get("role") == ("user" if i % 2 == 0 else "assistant") and bool((m.get("content") or "").strip())
        for i, m in enumerate(conversation)
    )


@dataclasses.dataclass(kw_only=True)
class MultiTurn(Step, ChatTemplateMixin):
    """Extend single-turn rows into ``n_turns``-turn conversations (see the module docstring).

    Args:
        engine: the chat model (usually the one that wrote turn 1).
        n_turns: user turns per conversation, turn 1 included (>= 1).
        end_with_user: end every conversation with a user query and no reply (e.g. to collect replies
            from other models later); the last assistant message is left out.
        mt_system_prompt: system message while sampling follow-up queries; ``None`` samples them with the
            template's plain rendering (needed for templates without a system role, such as Gemma).
        system_prompt / keep_default_system_prompt: as in :class:`~magpie_hf.steps.Responses`, for replies.
        chat_template_kwargs: template variables for every rendering, queries and replies alike
            (e.g. ``{"enable_thinking": False}``).
        query_temperature / query_top_p / query_max_tokens: sampling of follow-up queries (paper: 1.0 / 1.0).
        temperature / top_p / repetition_penalty / max_tokens: replies (greedy by default).
        end_on_truncated: a query or reply cut by ``max_tokens`` ends the conversation before that turn
            (and a turn-1 reply cut by ``max_tokens`` ends it after turn 1). Set False to keep cut turns.
        postprocess: :mod:`magpie_hf.steps.postprocess` filters applied to follow-up queries (the multi-turn
            system prompt is what ``DropSystemPromptEcho`` compares against); a rejected query ends the
            conversation.
        min_turns: drop rows that end with fewer user turns (counted as ``dropped_below_min_turns``).
    """

    inputs = ("instruction", "response")

    engine: Engine | EngineConfig
    n_turns: int = 2
    end_with_user: bool = False
    mt_system_prompt: str | None = MULTI_TURN_SYSTEM_PROMPT
    system_prompt: str | None = None
    keep_default_system_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    query_temperature: float = 1.0
    query_top_p: float = 1.0
    query_max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 4096
    end_on_truncated: bool = True
    postprocess: Sequence[InstructionFilter] = ()
    min_turns: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_turns < 1:
            raise ValueError(f"n_turns must be >= 1, got {self.n_turns}")
        if 2 * (self.n_turns - 1) > SEEDS_PER_ROW:
            raise ValueError(
                f"n_turns={self.n_turns} needs {2 * (self.n_turns - 1)} seeds per row (a query and a reply per "
                f"turn) and a row owns {SEEDS_PER_ROW}; use at most {SEEDS_PER_ROW // 2 + 1} turns."
            )
        if not 1 <= self.min_turns <= self.n_turns:
            raise ValueError(f"min_turns must be between 1 and n_turns={self.n_turns}, got {self.min_turns}")
        self.postprocess = tuple(self.postprocess)
        self._engine = None
        self._templates = None
        self._query_sampling = SamplingConfig(
            temperature=self.query_temperature, top_p=self.query_top_p, max_tokens=self.query_max_tokens
        )
        self._response_sampling = SamplingConfig(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
            repetition_penalty=self.repetition_penalty,
        )

    def output_features(self) -> Features:
        return {
            "conversations": MESSAGES,
            "num_turns": INT,
            "multi_turn_end_reason": STRING,
            **{column: STRING for column in turn_columns(self.n_turns)},
        }

    def load(self) -> None:
        from magpie_hf.templates import ChatTemplateError

        if self.n_turns > 1:
            resolve_engine(self.engine).require_raw_prompts(
                type(self).__name__,
                "follow-up queries are sampled by letting the model continue the raw conversation text cut "
                "where the next user message starts",
            )
        self._load_engine_and_templates()
        assert self._templates is not None
        if self.mt_system_prompt is not None and self.n_turns > 1:
            try:
                self._templates.query_prompt([], system_prompt=self.mt_system_prompt)
            except ChatTemplateError as err:
                raise ChatTemplateError(
                    f"MultiTurn samples follow-up queries with a system message, and the chat template of "
                    f"{self._model_name()} does not accept one. Pass MultiTurn(mt_system_prompt=None) "
                    f"(CLI: --mt_system_prompt none). Details: {err}"
                ) from err

    def unload(self) -> None:
        self._engine = None

    # -- prompts (public so tests and users can see exactly what the model gets) ---------------
    def query_prompt(self, history: Sequence[Message]) -> str:
        """The prompt for the next user query after ``history``: the template's own rendering of the
        history (with the multi-turn system message) cut where the next user message would start."""
        assert self._templates is not None, "call load() first"
        return self._templates.query_prompt(list(history), system_prompt=self.mt_system_prompt)

    def response_prompt(self, history: Sequence[Message]) -> str:
        """The prompt for the assistant reply to ``history`` (normal template, no multi-turn prompt)."""
        assert self._templates is not None, "call load() first"
        return self._templates.response_prompt(list(history))

    # -- work ----------------------------------------------------------------------------------
    def process(self, batch: Batch, *, seed: int) -> Batch:
        assert self._engine is not None and self._templates is not None, "call load() first"
        templates = self._templates
        stops = {"stop": templates.stop_strings, "stop_token_ids": templates.stop_token_ids}
        rows = len(batch["instruction"])
        finish = batch.get("response_finish_reason") or [None] * rows
        conversations: list[list[Message]] = []
        ended: list[str | None] = []
        keep_row: list[bool] = []
        for instruction, response, reason in zip(batch["instruction"], batch["response"], finish):
            conversations.append([{"role": "user", "content": instruction}, {"role": "assistant", "content": response}])
            usable = bool((instruction or "").strip()) and bool((response or "").strip())
            if not usable:
                self.stats["dropped_empty_first_turn"] += 1
            keep_row.append(usable)
            ended.append("truncated_response@1" if usable and self.end_on_truncated and reason == "length" else None)
        for why in ended:
            if why:
                self.stats["ended_early_truncated_response"] += 1

        seeds = row_seeds(seed, rows)
        for turn in range(2, self.n_turns + 1):
            active = [i for i in range(rows) if keep_row[i] and ended[i] is None]
            if not active:
                break
            # one engine call for this turn's queries ... (row i's turn t: query seeds[i] + 2(t-2), reply + 1)
            sampling = self._query_sampling.replace(**stops)
            outs = self._engine.generate(
                [self.query_prompt(conversations[i]) for i in active], sampling,
                seeds=[seeds[i] + 2 * (turn - 2) for i in active], progress=self.progress_callback,
            )
            asked = []
            for i, (completion,) in zip(active, outs):
                query, why = self._accept_query(completion)
                if why:
                    ended[i] = f"{why}@{turn}"
                    self.stats[f"ended_early_{why}"] += 1
                else:
                    conversations[i].append({"role": "user", "content": query})
                    asked.append(i)
            if self.end_with_user and turn == self.n_turns:
                break
            if not asked:
                continue
            # ... and one for their replies (normal template: the multi-turn prompt is not shown)
            sampling = self._response_sampling.replace(**stops)
            outs = self._engine.generate_chat(
                [conversations[i] for i in asked], sampling, templates=templates,
                seeds=[seeds[i] + 2 * (turn - 2) + 1 for i in asked], progress=self.progress_callback,
            )
            for i, (completion,) in zip(asked, outs):
                reply, why = self._accept(completion, kind="response")
                if why:
                    conversations[i].pop()  # the query without its reply goes too: roles keep alternating
                    ended[i] = f"{why}@{turn}"
                    self.stats[f"ended_early_{why}"] += 1
                else:
                    conversations[i].append({"role": "assistant", "content": reply})

        new: Batch = {name: [] for name in self.outputs}
        for i, conversation in enumerate(conversations):
            if self.end_with_user and conversation[-1]["role"] == "assistant":
                conversation = conversation[:-1]
            user_turns = sum(m["role"] == "user" for m in conversation)
            if keep_row[i] and user_turns < self.min_turns:
                self.stats["dropped_below_min_turns"] += 1
                keep_row[i] = False
            new["conversations"].append(conversation)
            new["num_turns"].append(user_turns)
            new["multi_turn_end_reason"].append(ended[i])
            for turn in range(2, self.n_turns + 1):
                pair = conversation[2 * turn - 2 : 2 * turn]
                new[f"instruction_{turn}"].append(pair[0]["content"] if len(pair) > 0 else None)
                new[f"response_{turn}"].append(pair[1]["content"] if len(pair) > 1 else None)
            if keep_row[i]:
                self.stats[f"conversations_with_{user_turns}_turns"] += 1
        return select_rows({**batch, **new}, keep_row)

    def _accept_query(self, completion: "Completion") -> tuple[str, str | None]:
        query, why = self._accept(completion, kind="query")
        if why or not self.postprocess:
            return query, why
        cleaned, dropped_by = apply_filters(query, self.postprocess, system_prompt=self.mt_system_prompt)
        return (cleaned or "", f"filtered_{dropped_by}_query" if dropped_by else None)

    def _accept(self, completion: "Completion", *, kind: str) -> tuple[str, str | None]:
        """Clean a completion; return ``(text, None)`` or ``("", reason)`` when the turn failed."""
        assert self._templates is not None
        self.stats["generated_tokens"] += completion.num_tokens
        if completion.failure:  # not generated (the conversation outgrew the context, an abort)
            self.stats[completion.failure] += 1
            return "", f"{completion.failure}_{kind}"
        text = self._templates.clean(completion.text)
        if not text:
            return "", f"empty_{kind}"
        if self.end_on_truncated and completion.finish_reason == "length":
            return "", f"truncated_{kind}"
        return text, None

    def config_summary(self) -> dict[str, Any]:
        """The settings worth a line in a dataset card."""
        return {
            "n_turns": self.n_turns,
            "end_with_user": self.end_with_user,
            "mt_system_prompt": self.mt_system_prompt,
            "chat_template_kwargs": dict(self.chat_template_kwargs or {}),
            "query_sampling": self._query_sampling.to_record(),
            "response_sampling": self._response_sampling.to_record(),
        }
