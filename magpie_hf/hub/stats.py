"""Statistics of a written dataset, read back from its Parquet files in batches (flat memory).

Only the columns that exist are described: the Magpie tags (``task_category``, ``input_quality``,
``difficulty``, ``llama_guard_2`` or a boolean ``safe``, ``language``), instruction/response lengths in
characters, and the numeric scores (``instruct_reward``, ``reward_difference``, ``min_neighbor_distance``).

Example:
    >>> from magpie_hf.hub.layout import read_layout
    >>> from magpie_hf.hub.stats import compute_stats
    >>> stats = compute_stats(read_layout("runs/pro/dataset"))   # doctest: +SKIP
    >>> stats.categorical[0].name, stats.categorical[0].counts[:1]  # doctest: +SKIP
    ('task_category', [('Information seeking', 412)])
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from magpie_hf.prompts.labels import DIFFICULTIES, INPUT_QUALITIES

from .layout import FolderLayout

#: categorical columns described in the card: column -> (label, natural order of values or None = by count)
CATEGORICAL = {
    "task_category": ("Task category", None),
    "input_quality": ("Input quality", list(INPUT_QUALITIES)),
    "difficulty": ("Difficulty", list(DIFFICULTIES)),
    "safety": ("Safety (Llama-Guard-2)", ["safe"]),
    "language": ("Language", None),
}
#: numeric columns described in the card: column -> label
NUMERIC = {
    "instruction_length": "Instruction length (characters)",
    "response_length": "Response length (characters)",
    "instruct_reward": "Reward of the response (instruct_reward)",
    "reward_difference": "Reward difference to the base model",
    "min_neighbor_distance": "Distance to the nearest neighbour",
}
MISSING = "(missing)"
EMBEDDING_SAMPLE = 2000


@dataclass
class CategoricalStats:
    name: str
    label: str
    counts: list[tuple[str, int]]  # ordered for display

    @property
    def total(self) -> int:
        return sum(c for _, c in self.counts)

    def to_dict(self) -> dict:
        return {"label": self.label, "counts": dict(self.counts)}


@dataclass
class NumericStats:
    name: str
    label: str
    values: np.ndarray = field(repr=False)  # kept for plots, not serialised

    @property
    def summary(self) -> dict[str, float]:
        v = self.values
        q = np.percentile(v, [25, 50, 75]) if len(v) else [np.nan] * 3
        return {
            "count": int(len(v)),
            "mean": float(v.mean()) if len(v) else float("nan"),
            "min": float(v.min()) if len(v) else float("nan"),
            "p25": float(q[0]),
            "median": float(q[1]),
            "p75": float(q[2]),
            "max": float(v.max()) if len(v) else float("nan"),
        }

    def to_dict(self) -> dict:
        return {"label": self.label, **self.summary}


@dataclass
class DatasetStats:
    """What the card says about one config (the one with the most tag columns)."""

    config: str
    rows: int
    categorical: list[CategoricalStats]
    numeric: list[NumericStats]
    sample_instructions: list[str] = field(default_factory=list, repr=False)
    sample_categories: list[str | None] = field(default_factory=list, repr=False)

    def get(self, name: str) -> CategoricalStats | NumericStats | None:
        return next((s for s in [*self.categorical, *self.numeric] if s.name == name), None)

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "rows": self.rows,
            "categorical": {s.name: s.to_dict() for s in self.categorical},
            "numeric": {s.name: s.to_dict() for s in self.numeric},
        }


def _available(schema_names: set[str]) -> list[str]:
    """Stat names computable from the columns present."""
    out = [c for c in ("task_category", "input_quality", "difficulty") if c in schema_names]
    if schema_names & set(SAFETY_COLUMNS):
        out.append("safety")
    if "language" in schema_names:
        out.append("language")
    if "instruction" in schema_names or "conversations" in schema_names:
        out.append("instruction_length")
    if "response" in schema_names or "conversations" in schema_names:
        out.append("response_length")
    out += [c for c in ("instruct_reward", "reward_difference", "min_neighbor_distance") if c in schema_names]
    return out


def pick_stats_config(layout: FolderLayout) -> str:
    """The config with the most describable columns (ties: the most rows, then the first)."""
    import pyarrow.parquet as pq

    def score(config: str) -> tuple[int, int]:
        first = layout.root / next(iter(layout.splits[config].values()))[0]
        names = set(pq.read_schema(first).names)
        return len(_available(names)), layout.config_rows(config)

    return max(layout.configs, key=lambda c: (*score(c), -layout.configs.index(c)))


#: where the safety verdict is read from, first found first: the parsed flag the LlamaGuard step
#: writes, the raw verdict text (as in the published Magpie datasets), a plain boolean
SAFETY_COLUMNS = ("is_safe", "llama_guard_2", "safe")


def _safety_label(value) -> str:
    """"safe", "unsafe (S2 ...)" or missing; raw text that is no verdict counts as missing."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "safe" if value else "unsafe"
    text = str(value).strip()
    if text.lower().startswith("unsafe"):
        codes = " ".join(text.split()[1:])
        return f"unsafe ({codes})" if codes else "unsafe"
    return "safe" if text.lower().startswith("safe") else MISSING


_ROLES = {"user": ("user", "human"), "assistant": ("assistant", "gpt")}


def _turn(conversations, role: str) -> str | None:
    """The first ``role`` message of a conversation (``{role, content}`` or ShareGPT ``{from, value}``)."""
    for message in conversations or []:
        if (message.get("role") or message.get("from")) in _ROLES[role]:
            return message.get("content") or message.get("value")
    return None


def _order(counter: Counter, natural: list[str] | None) -> list[tuple[str, int]]:
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    if natural is None:
        return ranked
    known = [(v, counter[v]) for v in natural if v in counter]
    return known + [kv for kv in ranked if kv[0] not in natural]


def compute_stats(layout: FolderLayout, config: str | None = None, *, seed: int = 0, sample_size: int = EMBEDDING_SAMPLE) -> DatasetStats:
    """Describe ``config`` (default: :func:`pick_stats_config`) from its Parquet files, batch by batch."""
    import pyarrow.parquet as pq

    config = config or pick_stats_config(layout)
    files = [layout.root / f for fs in layout.files(config).values() for f in fs]
    names = set(pq.read_schema(files[0]).names)
    wanted = _available(names)
    columns = sorted(
        {c for c in ("task_category", "input_quality", "difficulty", *SAFETY_COLUMNS, "language") if c in names}
        | {c for c in ("instruction", "response", "instruct_reward", "reward_difference", "min_neighbor_distance") if c in names}
        | ({"conversations"} if "conversations" in names and not {"instruction", "response"} <= names else set())
    )
    rows = layout.config_rows(config)
    rng = np.random.default_rng(seed)
    sample_at = set(rng.choice(rows, size=min(rows, sample_size), replace=False).tolist()) if rows else set()

    counters = {name: Counter() for name in wanted if name in CATEGORICAL}
    numbers: dict[str, list[np.ndarray]] = {name: [] for name in wanted if name in NUMERIC}
    sample_instructions, sample_categories = [], []
    offset = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=4096):
            cols = batch.to_pydict()
            n = batch.num_rows
            instructions = cols.get("instruction") or [_turn(c, "user") for c in cols.get("conversations", [None] * n)]
            responses = cols.get("response") or [_turn(c, "assistant") for c in cols.get("conversations", [None] * n)]
            for name in counters:
                if name == "safety":
                    source = next(cols[c] for c in SAFETY_COLUMNS if c in cols)
                    counters[name].update(_safety_label(v) for v in source)
                else:
                    counters[name].update(MISSING if v is None else str(v) for v in cols[name])
            for name in numbers:
                if name == "instruction_length":
                    values = [len(t) for t in instructions if t is not None]
                elif name == "response_length":
                    values = [len(t) for t in responses if t is not None]
                else:
                    values = [v for v in cols[name] if v is not None and np.isfinite(v)]
                numbers[name].append(np.asarray(values, dtype=float))
            for i in sorted(k - offset for k in sample_at if offset <= k < offset + n):
                if instructions[i]:
                    sample_instructions.append(instructions[i])
                    sample_categories.append(cols["task_category"][i] if "task_category" in cols else None)
            offset += n
    return DatasetStats(
        config=config,
        rows=rows,
        categorical=[CategoricalStats(n, CATEGORICAL[n][0], _order(c, CATEGORICAL[n][1])) for n, c in counters.items()],
        numeric=[
            NumericStats(n, NUMERIC[n], np.concatenate(v) if v else np.zeros(0)) for n, v in numbers.items()
        ],
        sample_instructions=sample_instructions,
        sample_categories=sample_categories,
    )
