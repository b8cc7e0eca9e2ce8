"""Magpie steps 1 and 2: instructions from the pre-query template alone, then responses.

Example:
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.steps import DecodingSetting, MagpieInstructions, Responses
    >>> engine = EngineConfig.embedded()
    >>> chain = MagpieInstructions(engine=engine, num_rows=100, max_tokens=128) >> Responses(engine=engine)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from magpie_hf.engines import Engine, EngineConfig, SamplingConfig
from magpie_hf.seeds import row_seeds
from magpie_hf.steps.base import (
    BOOL,
    FLOAT,
    INT,
    MESSAGES,
    STRING,
    Batch,
    Features,
    GeneratorStep,
    Step,
    resolve_engine,
    select_rows,
    struct,
)
from magpie_hf.steps.postprocess import apply_filters

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from magpie_hf.templates import ChatTemplates

#: namespace of the stable, deterministic conversation ids
CONVERSATION_NAMESPACE = uuid.UUID("5b0e7c8a-1d8f-4f7e-9a55-6d6167706965")


@dataclasses.dataclass(frozen=True)
class DecodingSetting:
    """One entry of a step-1 decoding mixture (the paper's Table 6): sampling settings and a weight.

    ``weight`` is a share of the rows; the paper's row counts work as weights directly.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"DecodingSetting weight must be > 0, got {self.weight}")
        SamplingConfig(temperature=self.temperature, top_p=self.top_p)  # validates the values


#: Table 6, Magpie-Pro (Llama-3-70B-Instruct, 1M rows)
PRO_MIXTURE = (
    DecodingSetting(1.0, 1.0, 300_000),
    DecodingSetting(1.1, 0.995, 300_000),
    DecodingSetting(1.2, 0.995, 300_000),
    DecodingSetting(1.25, 0.99, 100_000),
)
#: Table 6, Magpie-Air (Llama-3-8B-Instruct, 3M rows)
AIR_MIXTURE = tuple(
    DecodingSetting(t, p, 300_000) for t in (1.0, 1.1, 1.2) for p in (1.0, 0.995, 0.99)
) + tuple(DecodingSetting(1.25, p, 100_000) for p in (1.0, 0.995, 0.99))


#: what the embedded SmolLM2-135M-Instruct samples under ``--preset cpu``. At the paper's
#: temperatures (1.0-1.25) the 135M model derails: 21% of its queries at T=1.0 and about 40% over the
#: Pro mixture run to a 192-token limit and are dropped; at T=0.9, top_p=0.95 about 2% do.
EMBEDDED_MIXTURE = (DecodingSetting(0.9, 0.95, 1),)


#: provenance of a step-1 row (``gen_input_configs``), as the published Magpie datasets have it, plus the
#: official generator's per-model rules: ``newline_stop``, ``no_markdown_start`` (how: a first-token ban, or
#: the ``markdown_heading`` filter listed in ``instruction_filters``), ``first_token_temperature_scale`` and
#: ``instruction_filters`` (the post-processing filters applied, comma-separated in order, null for none)
GEN_INPUT_CONFIGS = struct(
    input_generator=STRING,
    engine=STRING,
    pre_query_template=STRING,
    system_prompt=STRING,
    chat_template_kwargs=STRING,
    temperature=FLOAT,
    top_p=FLOAT,
    max_tokens=INT,
    seed=INT,
    newline_stop=BOOL,
    no_markdown_start=BOOL,
    first_token_temperature_scale=FLOAT,
    instruction_filters=STRING,
)
#: provenance of a response (``gen_response_configs``)
GEN_RESPONSE_CONFIGS = struct(
    output_generator=STRING,
    engine=STRING,
    system_prompt=STRING,
    chat_template_kwargs=STRING,
    temperature=FLOAT,
    top_p=FLOAT,
    max_tokens=INT,
    repetition_penalty=FLOAT,
    seed=INT,
)


def assign_settings(mixture: tuple[DecodingSetting, ...], num_rows: int, seed: int) -> np.ndarray:
    """Row index -> mixture index, with counts proportional to the weights (largest remainder),
    in a seeded shuffled order so every shard sees the whole mixture."""
    weights = np.array([m.weight for m in mixture], dtype=np.float64)
    exact = weights / weights.sum() * num_rows
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_rows - counts.sum()]:
        counts[i] += 1
    labels = np.repeat(np.arange(len(mixture), dtype=np.int32), counts)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def conversation_id(seed: int, row_index: int) -> str:
    """The stable id of row ``row_index`` of a run seeded with ``seed``."""
    return str(uuid.uuid5(CONVERSATION_NAMESPACE, f"{seed}:{row_index}"))


class ChatTemplateMixin:
    """Shared by the steps that derive their prompts from the model's chat template.

    Their ``chat_template_kwargs`` (template variables such as ``{"enable_thinking": False}``) reach every
    rendering: the pre-query, follow-up queries and response prompts.
    """

    engine: Engine | EngineConfig
    system_prompt: str | None
    keep_default_system_prompt: bool
    chat_template_kwargs: dict[str, Any] | None
    _engine: Engine | None
    _templates: "ChatTemplates | None"

    def _load_engine_and_templates(self, **template_kwargs: Any) -> None:
        from magpie_hf.templates import ChatTemplates, derive_templates

        self._engine = resolve_engine(self.engine)
        if not self._engine.raw_prompts:
            # a chat endpoint applies the model's template and ends the turn itself: only the system
            # prompt travels (as a message), and no template arithmetic (or tokenizer) is needed
            if not self.keep_default_system_prompt and self.system_prompt is None:
                raise ValueError(
                    f"{type(self).__name__}(keep_default_system_prompt=False) removes the system block the chat "
                    f"template injects, which only works on raw prompts; the engine {self._model_name()!r} is a "
                    "chat endpoint that applies the template itself. Use keep_default_system_prompt=True, give "
                    "system_prompt=..., or use a completions engine (backend='openai', 'vllm' or 'transformers')."
                )
            self._templates = ChatTemplates(
                pre_query="", stop_strings=[], stop_token_ids=[], system_prompt=self.system_prompt, source="server"
            )
            return
        self._templates = derive_templates(
            self._engine.tokenizer,
            system_prompt=self.system_prompt,
            keep_default_system_prompt=self.keep_default_system_prompt,
            chat_template_kwargs=self.chat_template_kwargs,
            **template_kwargs,
        )

    def _template_kwargs_record(self) -> str | None:
        """``chat_template_kwargs`` for a row's provenance: one JSON string (a stable column type), or None."""
        kwargs = self._templates.chat_template_kwargs if self._templates is not None else self.chat_template_kwargs
        return json.dumps(kwargs, sort_keys=True, ensure_ascii=False) if kwargs else None

    def _model_name(self) -> str:
        config = self.engine.config if isinstance(self.engine, Engine) else self.engine
        return config.describe()


@dataclasses.dataclass(kw_only=True)
class MagpieInstructions(GeneratorStep, ChatTemplateMixin):
    """Magpie step 1: sample user queries from the pre-query template alone.

    Rows whose instruction comes out empty, or is cut by ``max_tokens``, are dropped
    (``drop_empty`` / ``drop_truncated``) and counted in ``stats``.

    The official generator's per-model rules (``exp/gen_ins.py``, ``exp/str_utils.py``; recorded in
    ``gen_input_configs``):

    - ``newline_stop``: a newline also ends the query (a stop string ``"\\n"`` on every engine). The text
      is cut before it and stripped, as the official code does (vLLM's stop strings, then ``.strip()``);
      a sample whose first line is empty comes out empty and is dropped as ``dropped_empty_instruction``
      (the official code keeps it as an empty instruction).
    - ``no_markdown_start``: the first generated token may not be a markdown heading
      (:func:`~magpie_hf.steps.postprocess.markdown_heading_token_ids` of the engine's tokenizer, banned at the
      first step) on engines with first-step rules (transformers; vLLM with
      ``EngineConfig(first_token_rules=True)``); on the others a query opening with ``#`` is dropped and
      counted as ``dropped_markdown_heading`` (:class:`~magpie_hf.steps.postprocess.NoMarkdownHeading`).
    - ``first_token_temperature_scale``: the first token is sampled at this multiple of the temperature
      (logits divided at the first step); engines without first-step rules refuse it at ``load()``.

    Example:
        >>> from magpie_hf.engines import EngineConfig
        >>> step = MagpieInstructions(engine=EngineConfig.embedded(), num_rows=8, newline_stop=True,
        ...                           no_markdown_start=True)  # the official Llama-3.1 runs ban headings
    """

    engine: Engine | EngineConfig
    mixture: tuple[DecodingSetting, ...] = (DecodingSetting(),)
    max_tokens: int = 512
    system_prompt: str | None = None
    keep_default_system_prompt: bool = True
    pre_query_template: str | None = None
    #: template variables for every rendering, e.g. {"enable_thinking": False} (recorded in gen_input_configs)
    chat_template_kwargs: dict[str, Any] | None = None
    drop_empty: bool = True
    drop_truncated: bool = True
    #: a newline also ends an instruction (the official generator's default)
    newline_stop: bool = False
    #: the first generated token may not be a markdown heading (the official Llama-3.1 runs)
    no_markdown_start: bool = False
    #: the first token is sampled at this multiple of the temperature (the official Qwen2.5-Math runs: 1.2)
    first_token_temperature_scale: float = 1.0
    #: seeds the row ids and the mixture assignment; sampling seeds derive from the ``seed`` given to generate()
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mixture = tuple(self.mixture)
        if not self.mixture:
            raise ValueError("MagpieInstructions needs at least one DecodingSetting in `mixture`.")
        if self.num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {self.num_rows}")
        if not self.first_token_temperature_scale > 0:
            raise ValueError(
                f"first_token_temperature_scale must be > 0, got {self.first_token_temperature_scale}; 1.0 changes nothing."
            )
        self._engine = None
        self._templates = None
        self._assignment: np.ndarray | None = None
        #: token ids banned as the first token (no_markdown_start on an engine with first-step rules)
        self._banned_first: tuple[int, ...] = ()
        #: filters applied to every sampled query before any post-processing (the no_markdown_start fallback)
        self._rule_filters: tuple[Any, ...] = ()

    def output_features(self) -> Features:
        return {
            "conversation_id": STRING,
            "instruction": STRING,
            "gen_input_configs": GEN_INPUT_CONFIGS,
            "instruction_num_tokens": INT,
            "instruction_finish_reason": STRING,
        }

    def provenance(self) -> dict[str, Any]:
        return self._templates.to_record() if self._templates is not None else {}

    def load(self) -> None:
        resolve_engine(self.engine).require_raw_prompts(
            type(self).__name__,
            "Magpie step 1 lets the model continue the raw pre-query text of its chat template (everything "
            "up to where the user's words start)",
        )
        self._load_engine_and_templates(pre_query_template=self.pre_query_template)
        self._load_first_token_rules()
        self._assignment = assign_settings(self.mixture, self.num_rows, self.seed)

    def _load_first_token_rules(self) -> None:
        """Resolve ``no_markdown_start`` and ``first_token_temperature_scale`` against the loaded engine."""
        from magpie_hf.steps.postprocess import NoMarkdownHeading, markdown_heading_token_ids

        assert self._engine is not None
        able = self._engine.first_token_rules
        where = f"the engine {self._model_name()!r} (backend={self._engine.name!r})"
        if self.first_token_temperature_scale != 1.0 and not able:
            raise ValueError(
                f"{type(self).__name__}(first_token_temperature_scale={self.first_token_temperature_scale}) samples the "
                f"first token hotter with a first-step logits rule, which {where} cannot apply (an OpenAI-compatible "
                "server takes no per-position rule). Use backend='transformers', or backend='vllm' with "
                "EngineConfig(first_token_rules=True) (the recipes set it), or first_token_temperature_scale=1.0."
            )
        self._banned_first, self._rule_filters = (), ()
        if self.no_markdown_start and able:
            self._banned_first = markdown_heading_token_ids(self._engine.tokenizer)
        elif self.no_markdown_start:
            logger.info(
                "%s cannot ban markdown headings as the first token; queries opening with '#' are dropped and "
                "counted as dropped_markdown_heading instead", where,
            )
            self._rule_filters = (NoMarkdownHeading(),)

    def instruction_filters(self) -> tuple[Any, ...]:
        """The filters every sampled query goes through, in order (recorded in ``gen_input_configs``)."""
        return self._rule_filters

    def _filters_record(self) -> str | None:
        names = list(dict.fromkeys(f.name for f in self.instruction_filters()))
        return ",".join(names) or None

    def unload(self) -> None:
        self._engine = None

    def generate(self, *, offset: int, num_rows: int, seed: int) -> Batch:
        """Rows ``[offset, offset + num_rows)``; row ``offset + i`` samples from seed ``row_seed(seed, i)``."""
        assert self._engine is not None and self._templates is not None and self._assignment is not None, "call load() first"
        rows = list(range(offset, min(offset + num_rows, self.num_rows)))
        return self._sample_rows(rows, dict(zip(rows, row_seeds(seed, len(rows)))), self._templates, self.system_prompt)

    def _sample_rows(
        self, rows: list[int], seeds: dict[int, int], templates: "ChatTemplates", system_prompt: str | None
    ) -> Batch:
        """Sample the instructions of ``rows`` (global row indices) from ``templates``' pre-query prompt.

        One engine request per row with the row's own seed (its mixture setting's sampling), so no
        two rows share a sample's seed; the identical prompts cost one prefill (vLLM prefix caching,
        the transformers engine's shared prefill).
        """
        assert self._engine is not None and self._assignment is not None
        by_setting: dict[int, list[int]] = {}
        for row in rows:
            by_setting.setdefault(int(self._assignment[row]), []).append(row)
        completions: dict[int, Any] = {}
        samplings: dict[int, SamplingConfig] = {}
        for setting_index, members in sorted(by_setting.items()):
            setting = self.mixture[setting_index]
            samplings[setting_index] = sampling = SamplingConfig(
                temperature=setting.temperature,
                top_p=setting.top_p,
                max_tokens=self.max_tokens,
                stop=tuple(dict.fromkeys([*templates.stop_strings, *(["\n"] if self.newline_stop else [])])),
                stop_token_ids=templates.stop_token_ids,
                first_token_banned_ids=self._banned_first,
                first_token_temperature_scale=self.first_token_temperature_scale,
            )
            outs = self._engine.generate(
                [templates.pre_query] * len(members), sampling, seeds=[seeds[r] for r in members],
                progress=self.progress_callback,
            )
            completions.update((row, c) for row, (c,) in zip(members, outs))
        if completions and all(c.failure for c in completions.values()):
            # every row's prompt is the same pre-query text: refusing all of them is the settings' fault
            first = next(iter(completions.values()))
            raise RuntimeError(f"The engine could not sample any instruction from the pre-query template: {first.error}")

        batch: Batch = {name: [] for name in MagpieInstructions.output_features(self)}
        filters_record = self._filters_record()
        for row in rows:
            completion = completions[row]
            self.stats["generated_tokens"] += completion.num_tokens
            if completion.failure:
                self.stats[f"dropped_{completion.failure}_instruction"] += 1
                logger.warning("instruction of row %d dropped: %s", row, completion.error)
                continue
            text = templates.clean(completion.text)
            if self.drop_empty and not text:
                self.stats["dropped_empty_instruction"] += 1
                continue
            if self.drop_truncated and completion.finish_reason == "length":
                self.stats["dropped_truncated_instruction"] += 1
                continue
            if self._rule_filters:
                text, dropped_by = apply_filters(text, self._rule_filters, system_prompt=system_prompt)
                if dropped_by is not None:
                    self.stats[f"dropped_{dropped_by}"] += 1
                    continue
            sampling = samplings[int(self._assignment[row])]
            batch["conversation_id"].append(conversation_id(self.seed, row))
            batch["instruction"].append(text)
            batch["gen_input_configs"].append(
                {
                    "input_generator": self._model_name(),
                    "engine": self._engine.name,
                    "pre_query_template": templates.pre_query,
                    "system_prompt": system_prompt,
                    "chat_template_kwargs": self._template_kwargs_record(),
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_tokens": sampling.max_tokens,
                    # the row's own seed: re-draw it alone with generate([pre_query], sampling, seeds=[seed])
                    "seed": seeds[row],
                    "newline_stop": self.newline_stop,
                    "no_markdown_start": self.no_markdown_start,
                    "first_token_temperature_scale": float(self.first_token_temperature_scale),
                    "instruction_filters": filters_record,
                }
            )
            batch["instruction_num_tokens"].append(completion.num_tokens)
            batch["instruction_finish_reason"].append(completion.finish_reason)
        return batch


def instruction_problem(text: Any) -> str | None:
    """Why ``text`` cannot be answered (None when it can): missing, empty, or not encodable as UTF-8.

    Example:
        >>> [instruction_problem(t) for t in ("Hi", None, "  ")]
        [None, 'no instruction (null)', 'empty instruction']
        >>> instruction_problem("a" + chr(0xD800))
        'instruction is not valid Unicode (a lone surrogate at character 1); kept with it escaped'
        >>> encodable("a" + chr(0xD800))
        'a\\\\ud800'
    """
    if text is None:
        return "no instruction (null)"
    if not isinstance(text, str):
        return f"instruction is a {type(text).__name__}, not text"
    if not text.strip():
        return "empty instruction"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"instruction is not valid Unicode (a lone surrogate at character {err.start}); kept with it escaped"
    return None


def encodable(text: Any) -> Any:
    """``text`` with lone surrogates written as ``\\udXXX`` escapes, so the row can be stored (other values as they are)."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclasses.dataclass(kw_only=True)
class Responses(Step, ChatTemplateMixin):
    """Magpie step 2: answer each instruction with the model's normal chat template (greedy by default).

    Row ``i`` of a batch samples from its own seed (recorded in ``gen_response_configs["seed"]``). A
    row whose prompt does not fit in the model's context (or whose request the engine aborted) is
    kept with ``response`` and ``conversations`` null and the reason in ``response_error`` (null for
    the other rows), and is counted in ``stats`` (``prompt_too_long``, ``aborted``, ``failed``). So is a row
    whose instruction is missing, empty or not valid Unicode (:func:`instruction_problem`; counted as
    ``invalid_instruction``, a lone surrogate kept escaped so the row can be stored): it is never sent.
    """

    inputs = ("instruction",)

    engine: Engine | EngineConfig
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 4096
    system_prompt: str | None = None
    keep_default_system_prompt: bool = True
    #: template variables for the response prompts, e.g. {"enable_thinking": False} (in gen_response_configs)
    chat_template_kwargs: dict[str, Any] | None = None
    drop_empty: bool = True
    drop_truncated: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._engine = None
        self._templates = None
        self._sampling = SamplingConfig(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
            repetition_penalty=self.repetition_penalty,
        )

    def output_features(self) -> Features:
        return {
            "response": STRING,
            "conversations": MESSAGES,
            "gen_response_configs": GEN_RESPONSE_CONFIGS,
            "response_num_tokens": INT,
            "response_finish_reason": STRING,
            "response_error": STRING,
        }

    def load(self) -> None:
        self._load_engine_and_templates()

    def unload(self) -> None:
        self._engine = None

    def process(self, batch: Batch, *, seed: int) -> Batch:
        assert self._engine is not None and self._templates is not None, "call load() first"
        templates = self._templates
        sampling = self._sampling.replace(stop=templates.stop_strings, stop_token_ids=templates.stop_token_ids)
        # a missing, empty or unencodable instruction is a row with a null response and the reason, not a failed run
        instructions = list(batch["instruction"])
        problems = [instruction_problem(q) for q in instructions]
        instructions = [encodable(q) for q in instructions]
        good = [i for i, problem in enumerate(problems) if problem is None]
        conversations = [[{"role": "user", "content": instructions[i]}] for i in good]
        seeds = row_seeds(seed, len(instructions))
        answered = self._engine.generate_chat(conversations, sampling, templates=templates,
                                              seeds=[seeds[i] for i in good], progress=self.progress_callback)
        outs: list[Any] = [[None] for _ in problems]
        for i, out in zip(good, answered):
            outs[i] = out
        for problem in problems:
            if problem:
                self.stats["invalid_instruction"] += 1
        keep: list[bool] = []
        new: Batch = {name: [] for name in self.outputs}
        for index, (instruction, row_seed_, (completion,)) in enumerate(zip(instructions, seeds, outs)):
            if problems[index]:
                keep.append(True)
                for name, value in (("response", None), ("conversations", None), ("response_num_tokens", 0),
                                    ("response_finish_reason", "error"), ("response_error", problems[index]),
                                    ("gen_response_configs", None)):
                    new[name].append(value)
                continue
            self.stats["generated_tokens"] += completion.num_tokens
            failure = completion.failure
            text = None if failure else templates.clean(completion.text)
            if failure:  # kept, with a null response and the reason; the rest of the batch goes on
                self.stats[failure] += 1
                drop = False
            else:
                drop = (self.drop_empty and not text) or (self.drop_truncated and completion.finish_reason == "length")
                if drop:
                    self.stats["dropped_empty_response" if not text else "dropped_truncated_response"] += 1
            keep.append(not drop)
            new["response"].append(text)
            new["conversations"].append(
                None if failure else [{"role": "user", "content": instruction}, {"role": "assistant", "content": text}]
            )
            new["gen_response_configs"].append(
                {
                    "output_generator": self._model_name(),
                    "engine": self._engine.name,
                    "system_prompt": self.system_prompt,
                    "chat_template_kwargs": self._template_kwargs_record(),
                    **sampling.to_record(),
                    "seed": row_seed_,
                }
            )
            new["response_num_tokens"].append(completion.num_tokens)
            new["response_finish_reason"].append(completion.finish_reason)
            new["response_error"].append(completion.error if failure else None)
        return select_rows({**batch, "instruction": instructions, **new}, keep)
