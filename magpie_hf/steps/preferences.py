"""Preference pairs for DPO, in TRL's conversational preference format, and a seeded train/test split.

Two builders:

- :class:`InstructVsBasePairs` (paper Appendix A.3): chosen = the instruct model's ``response``,
  rejected = the base model's ``base_output``, kept when ``reward_difference > tau``;
- :class:`BestOfNPairs` (as the published Magpie PO sets): :class:`MultiResponses` samples ``n``
  answers per instruction, a reward step scores each into ``rewards``, chosen = the best,
  rejected = the worst, kept when they differ by more than ``margin``.

Both write ``prompt`` = ``[{"role": "user", "content": instruction}]`` and ``chosen`` /
``rejected`` = ``[{"role": "assistant", "content": ...}]``, which ``trl.DPOTrainer`` reads as is.
:func:`split_preferences` then makes the ``train``/``test`` :class:`datasets.DatasetDict`.

Example:
    >>> pairs = InstructVsBasePairs(tau=0.0).process({
    ...     "conversation_id": ["a", "b"], "instruction": ["Hi?", "Yo?"],
    ...     "response": ["Hello! How can I help?", "Hey."], "base_output": ["hi", "Hey."],
    ...     "instruct_reward": [1.0, 0.2], "base_reward": [-1.0, 0.2], "reward_difference": [2.0, 0.0]}, seed=0)
    >>> pairs["chosen"], pairs["rejected"]
    ([[{'role': 'assistant', 'content': 'Hello! How can I help?'}]], [[{'role': 'assistant', 'content': 'hi'}]])
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import pyarrow as pa

from magpie_hf.engines import Engine, EngineConfig, SamplingConfig
from magpie_hf.hardware import Hardware, Resources
from magpie_hf.seeds import check_samples_per_row, row_seeds
from magpie_hf.steps.base import FLOAT, FLOATS, INT, MESSAGES, STRING, STRINGS, Batch, Features, Step, struct
from magpie_hf.steps.generate import ChatTemplateMixin, encodable, instruction_problem

if TYPE_CHECKING:
    import datasets

#: the columns every pair builder writes (plus its own score columns), TRL's conversational preference format
PAIR_FEATURES: Features = {
    "conversation_id": STRING,
    "instruction": STRING,
    "prompt": MESSAGES,
    "chosen": MESSAGES,
    "rejected": MESSAGES,
    "chosen_reward": FLOAT,
    "rejected_reward": FLOAT,
}
PAIR_COLUMNS = tuple(PAIR_FEATURES)


def _is_number(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _pair_row(conversation_id: str, instruction: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "instruction": instruction,
        "prompt": [{"role": "user", "content": instruction}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _to_batch(rows: list[dict[str, Any]], columns: Sequence[str]) -> Batch:
    return {c: [r[c] for r in rows] for c in columns}


@dataclasses.dataclass(kw_only=True)
class InstructVsBasePairs(Step):
    """chosen = instruct ``response``, rejected = ``base_output``, when ``reward_difference > tau``.

    Rows are dropped (and counted in ``stats``) when the reward difference is null, at most
    ``tau``, or when either answer is empty or both are the same text. The output keeps only
    the pair and its scores: :data:`PAIR_COLUMNS` plus ``instruct_reward``, ``base_reward``,
    ``reward_difference``.
    """

    inputs: ClassVar[tuple[str, ...]] = (
        "conversation_id", "instruction", "response", "base_output", "instruct_reward", "base_reward", "reward_difference",
    )

    #: the paper's threshold: keep pairs with ``instruct_reward - base_reward > tau``
    tau: float = 0.0

    def output_features(self) -> Features:
        return {**PAIR_FEATURES, "instruct_reward": FLOAT, "base_reward": FLOAT, "reward_difference": FLOAT}

    def process(self, batch: Batch, *, seed: int) -> Batch:
        rows = []
        for cid, instruction, response, base, r, b, diff in zip(*(batch[c] for c in self.inputs)):
            response, base = (response or "").strip(), (base or "").strip()
            if not _is_number(diff):
                self.stats["dropped_null_reward_difference"] += 1
            elif diff <= self.tau:
                self.stats["dropped_reward_difference_at_most_tau"] += 1
            elif not response or not base:
                self.stats["dropped_empty_answer"] += 1
            elif response == base:
                self.stats["dropped_identical_answers"] += 1
            else:
                row = _pair_row(cid, instruction, response, base)
                r, b = (float(x) if _is_number(x) else None for x in (r, b))
                row.update(chosen_reward=r, rejected_reward=b, instruct_reward=r, base_reward=b, reward_difference=float(diff))
                rows.append(row)
        self.stats["pairs"] += len(rows)
        return _to_batch(rows, self.outputs)


@dataclasses.dataclass(kw_only=True)
class MultiResponses(Step, ChatTemplateMixin):
    """Sample ``n`` answers per ``instruction`` with the chat template (for best-of-n pairs).

    Writes ``responses`` (list of ``n`` strings, cleaned of end-of-turn text),
    ``responses_finish_reasons``, ``responses_num_tokens`` and ``gen_multi_response_configs`` (with
    the row's seed: its ``j``-th answer drew from ``seed + j``). An answer that could not be generated
    (the prompt does not fit in the model's context, the engine aborted it) is null in ``responses``,
    the first such reason of the row is in ``responses_error`` (null when all answers are there), and
    it is counted in ``stats``.

    Example:
        >>> from magpie_hf.engines import EngineConfig
        >>> step = MultiResponses(engine=EngineConfig.embedded(), n=5, temperature=0.8)  # doctest: +SKIP
    """

    inputs: ClassVar[tuple[str, ...]] = ("instruction",)

    engine: Engine | EngineConfig
    n: int = 5
    temperature: float = 0.8
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 4096
    system_prompt: str | None = None
    keep_default_system_prompt: bool = True
    #: template variables for the response prompts, e.g. {"enable_thinking": False}
    chat_template_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 2:
            raise ValueError(f"MultiResponses needs n >= 2 answers per instruction to make pairs, got n={self.n}")
        if self.temperature == 0:
            raise ValueError("MultiResponses with temperature 0 (greedy) gives n identical answers; use temperature > 0.")
        check_samples_per_row(self.n)
        self._engine = None
        self._templates = None
        self._sampling = SamplingConfig(
            temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens, n=self.n,
            repetition_penalty=self.repetition_penalty,
        )

    def output_features(self) -> Features:
        return {
            "responses": STRINGS,
            "responses_finish_reasons": STRINGS,
            "responses_num_tokens": pa.list_(INT),
            "responses_error": STRING,
            "gen_multi_response_configs": struct(
                output_generator=STRING, engine=STRING, n=INT, system_prompt=STRING, chat_template_kwargs=STRING,
                temperature=FLOAT,
                top_p=FLOAT, max_tokens=INT, repetition_penalty=FLOAT, seed=INT,
            ),
        }

    def load(self) -> None:
        self._load_engine_and_templates()

    def unload(self) -> None:
        self._engine = None

    def process(self, batch: Batch, *, seed: int) -> Batch:
        assert self._engine is not None and self._templates is not None, "call load() first"
        templates = self._templates
        sampling = self._sampling.replace(stop=templates.stop_strings, stop_token_ids=templates.stop_token_ids)
        # a missing, empty or unencodable instruction is never sent: its answers are null, with the reason
        instructions = [encodable(q) for q in batch["instruction"]]
        problems = [instruction_problem(q) for q in batch["instruction"]]
        good = [i for i, problem in enumerate(problems) if problem is None]
        conversations = [[{"role": "user", "content": instructions[i]}] for i in good]
        # row i's j-th answer draws from row_seed(seed, i) + j
        seeds = row_seeds(seed, len(instructions))
        answered = self._engine.generate_chat(conversations, sampling, templates=templates,
                                              seeds=[seeds[i] for i in good],
                                              progress=getattr(self, "progress_callback", None))
        outs: list[Any] = [None] * len(instructions)
        for i, completions in zip(good, answered):
            outs[i] = completions
        new: Batch = {name: [] for name in self.outputs}
        record = {"output_generator": self._model_name(), "engine": self._engine.name, "n": self.n,
                  "system_prompt": self.system_prompt, "chat_template_kwargs": self._template_kwargs_record(),
                  **sampling.to_record()}
        for problem, row_seed_, completions in zip(problems, seeds, outs):
            if problem:
                self.stats["invalid_instruction"] += 1
                for name, value in (("responses", [None] * self.n), ("responses_finish_reasons", ["error"] * self.n),
                                    ("responses_num_tokens", [0] * self.n), ("responses_error", problem),
                                    ("gen_multi_response_configs", {**record, "seed": row_seed_})):
                    new[name].append(value)
                continue
            self.stats["generated_tokens"] += sum(c.num_tokens for c in completions)
            failures = [c for c in completions if c.failure]
            for c in failures:
                self.stats[c.failure] += 1
            new["responses"].append([None if c.failure else templates.clean(c.text) for c in completions])
            new["responses_finish_reasons"].append([c.finish_reason for c in completions])
            new["responses_num_tokens"].append([c.num_tokens for c in completions])
            new["responses_error"].append(failures[0].error if failures else None)
            new["gen_multi_response_configs"].append({**record, "seed": row_seed_})
        return {**batch, "instruction": instructions, **new}


@dataclasses.dataclass(kw_only=True)
class MultiResponseRewards(Step):
    """Score every answer in ``responses`` with a reward step; write the scores as a ``rewards`` list.

    ``reward`` is a reward step that reads ``instruction``/``response`` and writes one score per
    row (:class:`~magpie_hf.steps.reward.RewardModel` or :class:`~magpie_hf.steps.reward.JudgeReward`
    with their default column names); this step flattens the ``n`` answers of each row into rows
    for it and gathers the scores back in order (null where an answer could not be scored).
    Also writes ``rewards_model`` (the scorer's name).

    Example:
        >>> from magpie_hf.steps.reward import RewardModel
        >>> step = MultiResponseRewards(reward=RewardModel(model="sfairXC/FsfairX-LLaMA3-RM-v0.1"))  # doctest: +SKIP
    """

    inputs: ClassVar[tuple[str, ...]] = ("instruction", "responses")

    reward: Step

    def __post_init__(self) -> None:
        super().__post_init__()
        for attribute in ("output_column", "model_column"):
            if not hasattr(self.reward, attribute):
                raise TypeError(
                    f"MultiResponseRewards needs a reward step with `{attribute}` (RewardModel or JudgeReward); "
                    f"got {type(self.reward).__name__}."
                )
        if getattr(self.reward, "response_column", "response") != "response":
            raise ValueError("Give MultiResponseRewards a reward step with the default response_column='response'.")

    def output_features(self) -> Features:
        return {"rewards": FLOATS, "rewards_model": STRING}

    def engine_configs(self) -> set[EngineConfig]:
        return self.reward.engine_configs()

    def resources(self, hardware: Hardware | None = None) -> Resources:
        return self.reward.resources(hardware)

    def config_record(self) -> dict[str, Any]:
        return {"step": type(self).__name__, "name": self.name, "batch_size": self.batch_size,
                "reward": self.reward.config_record()}

    def load(self) -> None:
        self.reward.load()

    def unload(self) -> None:
        self.reward.unload()

    def process(self, batch: Batch, *, seed: int) -> Batch:
        from magpie_hf.steps.judges import JudgeStep

        owners, flat = [], {"instruction": [], "response": []}
        # a judge's sampled ratings of row i's j-th answer draw from row_seed(seed, i) + j * samples + k
        samples = int(getattr(self.reward, "num_samples", 1))
        seeds: list[int] = []
        for row, (instruction, responses, first) in enumerate(
            zip(batch["instruction"], batch["responses"], row_seeds(seed, len(batch["instruction"])))
        ):
            check_samples_per_row(len(responses or []) * samples)
            for j, response in enumerate(responses or []):
                owners.append(row)
                seeds.append(first + j * samples)
                flat["instruction"].append(instruction)
                flat["response"].append(response if response and response.strip() else None)
        before = collections.Counter(self.reward.stats)
        self.reward.progress_callback = getattr(self, "progress_callback", None)
        if not owners:
            scored: Batch = {}
        elif isinstance(self.reward, JudgeStep):
            scored = self.reward.judge(flat, seeds)
        else:
            scored = self.reward.process(flat, seed=seed)
        self.stats.update(self.reward.stats - before)
        rewards: list[list[float | None]] = [[] for _ in range(len(batch["instruction"]))]
        for row, value in zip(owners, scored.get(self.reward.output_column, [])):
            rewards[row].append(float(value) if _is_number(value) else None)
        name = scored[self.reward.model_column][0] if owners else None
        return {**batch, "rewards": rewards, "rewards_model": [name] * len(rewards)}


@dataclasses.dataclass(kw_only=True)
class BestOfNPairs(Step):
    """chosen = the highest-reward answer in ``responses``, rejected = the lowest.

    Answers that are empty or have a null reward are ignored. A row is dropped (and counted in
    ``stats``) when fewer than two scored answers remain, when best and worst tie, differ by less
    than ``margin``, or are the same text. Keeps ``responses`` and ``rewards``.
    """

    inputs: ClassVar[tuple[str, ...]] = ("conversation_id", "instruction", "responses", "rewards")

    #: the smallest reward gap between chosen and rejected that makes a pair (ties never do)
    margin: float = 0.0

    def output_features(self) -> Features:
        return {**PAIR_FEATURES, "responses": STRINGS, "rewards": FLOATS}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    def process(self, batch: Batch, *, seed: int) -> Batch:
        rows = []
        for cid, instruction, responses, rewards in zip(*(batch[c] for c in self.inputs)):
            responses, rewards = list(responses or []), list(rewards or [])
            if len(responses) != len(rewards):
                raise ValueError(
                    f"Row {cid!r} has {len(responses)} responses but {len(rewards)} rewards; "
                    "score every answer of `responses` into `rewards` (same order) before BestOfNPairs."
                )
            scored = [(float(r), t.strip()) for t, r in zip(responses, rewards) if _is_number(r) and t and t.strip()]
            if len(scored) < 2:
                self.stats["dropped_fewer_than_two_scored_answers"] += 1
                continue
            # stable choice on ties: the first best and the first worst in sampling order
            best = max(range(len(scored)), key=lambda i: (scored[i][0], -i))
            worst = min(range(len(scored)), key=lambda i: (scored[i][0], i))
            gap = scored[best][0] - scored[worst][0]
            if gap <= 0:
                self.stats["dropped_tied_rewards"] += 1
            elif gap < self.margin:
                self.stats["dropped_below_margin"] += 1
            elif scored[best][1] == scored[worst][1]:
                self.stats["dropped_identical_answers"] += 1
            else:
                row = _pair_row(cid, instruction, scored[best][1], scored[worst][1])
                row.update(chosen_reward=scored[best][0], rejected_reward=scored[worst][0],
                           responses=responses, rewards=[float(r) if _is_number(r) else None for r in rewards])
                rows.append(row)
        self.stats["pairs"] += len(rows)
        return _to_batch(rows, self.outputs)


def split_key(conversation_id: str, seed: int) -> int:
    """A row's place in the split order: a hash of ``seed`` and its id (not of its position)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{conversation_id}".encode()).digest()[:8], "big")


def split_preferences(
    dataset: "datasets.Dataset", *, test_size: float = 0.02, seed: int = 0, id_column: str = "conversation_id"
) -> "datasets.DatasetDict":
    """Split pairs into ``train``/``test`` by a seeded hash of each row's id.

    The same rows land in ``test`` whatever the input order: the ``ceil(test_size * len)`` rows
    with the smallest hash, at least one when there are two or more rows (and never all of them).
    Rows keep their input order within each split.

    Example:
        >>> import datasets
        >>> ds = datasets.Dataset.from_dict({"conversation_id": [str(i) for i in range(10)]})
        >>> {k: len(v) for k, v in split_preferences(ds, test_size=0.2, seed=0).items()}
        {'train': 8, 'test': 2}
    """
    import datasets

    if not 0 <= test_size < 1:
        raise ValueError(f"test_size must be in [0, 1), got {test_size}")
    if id_column not in dataset.column_names:
        raise ValueError(f"split_preferences needs a {id_column!r} column to hash; the dataset has {dataset.column_names}.")
    ids = list(dataset[id_column])
    if len(set(ids)) != len(ids):
        raise ValueError(f"Column {id_column!r} has duplicate values; a stable split needs one row per id.")
    n = len(ids)
    num_test = min(max(math.ceil(test_size * n), 1), n - 1) if test_size > 0 and n >= 2 else 0
    order = sorted(range(n), key=lambda i: split_key(ids[i], seed))
    test = set(order[:num_test])
    return datasets.DatasetDict(
        train=dataset.select([i for i in range(n) if i not in test]),
        test=dataset.select([i for i in range(n) if i in test]),
    )
