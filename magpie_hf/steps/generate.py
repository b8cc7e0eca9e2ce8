"""Magpie steps 1 and 2: instructions from the pre-query template alone, then responses.

Example:
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.steps import DecodingSetting, MagpieInstructions, Responses
    >>> engine = EngineConfig.embedded()
    >>> chain = MagpieInstructions(engine=engine, num_rows=100, max_tokens=128) >> Responses(engine=engine)
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from magpie_hf.engines import Engine, EngineConfig, SamplingConfig
from magpie_hf.seeds import row_seeds
from magpie_hf.steps.base import Batch, GeneratorStep, Step, resolve_engine

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
    """Shared by the steps that derive their prompts from the model's chat template."""

    engine: Engine | EngineConfig
    system_prompt: str | None
    keep_default_system_prompt: bool
    _engine: Engine | None
    _templates: "ChatTemplates | None"

    def _load_engine_and_templates(self, **template_kwargs: Any) -> None:
        from magpie_hf.templates import derive_templates

        self._engine = resolve_engine(self.engine)
        self._templates = derive_templates(
            self._engine.tokenizer,
            system_prompt=self.system_prompt,
            keep_default_system_prompt=self.keep_default_system_prompt,
            **template_kwargs,
        )

    def _model_name(self) -> str:
        config = self.engine.config if isinstance(self.engine, Engine) else self.engine
        return config.describe()


@dataclasses.dataclass(kw_only=True)
class MagpieInstructions(GeneratorStep, ChatTemplateMixin):
    """Magpie step 1: sample user queries from the pre-query template alone.

    Rows whose instruction comes out empty, or is cut by ``max_tokens``, are dropped
    (``drop_empty`` / ``drop_truncated``) and counted in ``stats``.
    """

    outputs = (
        "conversation_id",
        "instruction",
        "gen_input_configs",
        "instruction_num_tokens",
        "instruction_finish_reason",
    )

    engine: Engine | EngineConfig
    mixture: tuple[DecodingSetting, ...] = (DecodingSetting(),)
    max_tokens: int = 512
    system_prompt: str | None = None
    keep_default_system_prompt: bool = True
    pre_query_template: str | None = None
    drop_empty: bool = True
    drop_truncated: bool = True
    #: seeds the row ids and the mixture assignment; sampling seeds derive from the ``seed`` given to generate()
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mixture = tuple(self.mixture)
        if not self.mixture:
            raise ValueError("MagpieInstructions needs at least one DecodingSetting in `mixture`.")
        if self.num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {self.num_rows}")
        self._engine = None
        self._templates = None
        self._assignment: np.ndarray | None = None

    def load(self) -> None:
        self._load_engine_and_templates(pre_query_template=self.pre_query_template)
        self._assignment = assign_settings(self.mixture, self.num_rows, self.seed)

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
                stop=templates.stop_strings,
                stop_token_ids=templates.stop_token_ids,
            )
            outs = self._engine.generate(
                [templates.pre_query] * len(members), sampling, seeds=[seeds[r] for r in members],
                progress=self.progress_callback,
            )
            completions.update((row, c) for row, (c,) in zip(members, outs))

        batch: Batch = {name: [] for name in MagpieInstructions.outputs}
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
            sampling = samplings[int(self._assignment[row])]
            batch["conversation_id"].append(conversation_id(self.seed, row))
            batch["instruction"].append(text)
            batch["gen_input_configs"].append(
                {
                    "input_generator": self._model_name(),
                    "engine": self._engine.name,
                    "pre_query_template": templates.pre_query,
                    "system_prompt": system_prompt,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_tokens": sampling.max_tokens,
                    # the row's own seed: re-draw it alone with generate([pre_query], sampling, seeds=[seed])
                    "seed": seeds[row],
                }
            )
            batch["instruction_num_tokens"].append(completion.num_tokens)
            batch["instruction_finish_reason"].append(completion.finish_reason)
        return batch


@dataclasses.dataclass(kw_only=True)
class Responses(Step, ChatTemplateMixin):
    """Magpie step 2: answer each instruction with the model's normal chat template (greedy by default).

    Row ``i`` of a batch samples from its own seed (recorded in ``gen_response_configs["seed"]``). A
    row whose prompt does not fit in the model's context (or whose request the engine aborted) is
    kept with ``response`` and ``conversations`` null and the reason in ``response_error`` (null for
    the other rows), and is counted in ``stats`` (``prompt_too_long``, ``aborted``, ``failed``).
    """

    inputs = ("instruction",)
    outputs = (
        "response",
        "conversations",
        "gen_response_configs",
        "response_num_tokens",
        "response_finish_reason",
        "response_error",
    )

    engine: Engine | EngineConfig
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 4096
    system_prompt: str | None = None
    keep_default_system_prompt: bool = True
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

    def load(self) -> None:
        self._load_engine_and_templates()

    def unload(self) -> None:
        self._engine = None

    def process(self, batch: Batch, *, seed: int) -> Batch:
        assert self._engine is not None and self._templates is not None, "call load() first"
        templates = self._templates
        sampling = self._sampling.replace(stop=templates.stop_strings, stop_token_ids=templates.stop_token_ids)
        prompts = [templates.response_prompt([{"role": "user", "content": q}]) for q in batch["instruction"]]
        seeds = row_seeds(seed, len(prompts))
        outs = self._engine.generate(prompts, sampling, seeds=seeds, progress=self.progress_callback)
        keep: list[bool] = []
        new: Batch = {name: [] for name in self.outputs}
        for instruction, row_seed_, (completion,) in zip(batch["instruction"], seeds, outs):
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
                    **sampling.to_record(),
                    "seed": row_seed_,
                }
            )
            new["response_num_tokens"].append(completion.num_tokens)
            new["response_finish_reason"].append(completion.finish_reason)
            new["response_error"].append(completion.error if failure else None)
        merged = {**batch, **new}
        return {k: [v for v, m in zip(col, keep) if m] for k, col in merged.items()}
