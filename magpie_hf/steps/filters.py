"""Filter a tagged Magpie dataset: column conditions, the paper's Table 4 presets, a removal report.

A :class:`Filter` applies its :class:`Condition` s in order, then (optionally) keeps the
``keep_longest`` rows with the longest responses; the length cut always comes last. Every stage
records how many rows it removed in ``Filter.report`` (a list of ``{"condition", "removed"}``) and
in ``stats``, so that ``rows_in - sum(removed) == rows_out``.

Conditions:

- ``Condition("input_quality", ">=", "good")`` — ``input_quality`` and ``difficulty`` compare on
  their ordinal scales (:data:`ORDINAL_SCALES`); a label outside the scale fails the condition;
- ``Condition("instruct_reward", ">", -12)`` — numeric ``== != > >= < <=``;
- ``Condition("task_category", "in", ["Math", "Coding & Debugging"])`` / ``"not in"``;
- ``Condition("min_similar_conversation_id", "==", ColumnRef("conversation_id"))`` — compare two
  columns (this one keeps one row per near-duplicate cluster, see :data:`DEDUPLICATE`);
- ``Condition("instruction", lambda text: not text.endswith(":"))`` — any callable on the value;
- ``Condition("response_error", "is null")`` — the column is not set (``"is not null"``: it is).

A **null** value (the judge failed to label the row) **fails** every condition on its column,
including ``!=`` and ``not in`` (but not ``is null``): a filter keeps only rows it knows satisfy it.

:func:`hygiene_conditions` are what every recipe's filter applies before its preset: drop rows with an
error column set, responses cut by the length limit and rows the guard did not call safe.

Presets (:func:`preset_filter`, names as in the paper's Table 4, ``tau1 = -12``, ``tau2 = 0``):
``Filter``, ``Filter1`` ... ``Filter6``. The row counts are the paper's (300K, 200K); pass
``max_rows=`` (or ``scale=``) for small runs.

Example:
    >>> from magpie_hf.steps.filters import Condition, Filter, preset_filter
    >>> step = preset_filter("Filter", max_rows=50)
    >>> custom = Filter(conditions=[Condition("input_quality", ">=", "good")], keep_longest=1000)
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from magpie_hf.prompts.labels import ORDINAL_SCALES
from magpie_hf.steps.base import GlobalStep

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa


#: the paper's thresholds (Table 4): instruct reward > tau1, reward difference > tau2
TAU1 = -12.0
TAU2 = 0.0

_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": lambda a, b: _pc().equal(a, b),
    "!=": lambda a, b: _pc().not_equal(a, b),
    ">": lambda a, b: _pc().greater(a, b),
    ">=": lambda a, b: _pc().greater_equal(a, b),
    "<": lambda a, b: _pc().less(a, b),
    "<=": lambda a, b: _pc().less_equal(a, b),
}


def _pc() -> Any:
    import pyarrow.compute as pc

    return pc
_MEMBERSHIP = ("in", "not in")
_NULL_TESTS = ("is null", "is not null")


@dataclasses.dataclass(frozen=True)
class ColumnRef:
    """Use another column of the same row as a condition's value."""

    column: str

    def __str__(self) -> str:
        return f"column {self.column!r}"


@dataclasses.dataclass(frozen=True)
class Condition:
    """``column op value`` on every row; a row passes when the predicate is true (null fails).

    ``op`` is one of ``== != > >= < <= in "not in" "is null" "is not null"`` or a callable ``value -> bool``.
    ``scale`` orders string labels (defaults to :data:`ORDINAL_SCALES` for known columns).
    """

    column: str
    op: str | Callable[[Any], bool]
    value: Any = None
    scale: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if callable(self.op):
            return
        if self.op not in _COMPARE and self.op not in _MEMBERSHIP and self.op not in _NULL_TESTS:
            raise ValueError(f"Unknown operator {self.op!r}; use one of {[*_COMPARE, *_MEMBERSHIP, *_NULL_TESTS]} "
                             "or a callable.")
        if self.op in _NULL_TESTS:
            return
        if self.op in _MEMBERSHIP and (isinstance(self.value, (str, bytes)) or not isinstance(self.value, Sequence)):
            raise ValueError(f"{self.op!r} needs a list of values, got {self.value!r}")
        scale = self.ordinal_scale
        if scale is not None and not isinstance(self.value, ColumnRef):
            values = self.value if self.op in _MEMBERSHIP else [self.value]
            unknown = [v for v in values if v not in scale]
            if unknown:
                raise ValueError(f"{unknown} not on the {self.column!r} scale {list(scale)}")

    @property
    def ordinal_scale(self) -> tuple[str, ...] | None:
        return self.scale if self.scale is not None else ORDINAL_SCALES.get(self.column)

    def __str__(self) -> str:
        if callable(self.op):
            return f"{getattr(self.op, '__name__', 'predicate')}({self.column})"
        if self.op in _NULL_TESTS:
            return f"{self.column} {self.op}"
        value = list(self.value) if self.op in _MEMBERSHIP else self.value
        return f"{self.column} {self.op} {value if isinstance(value, ColumnRef) else repr(value)}"

    def columns(self) -> list[str]:
        return [self.column] + ([self.value.column] if isinstance(self.value, ColumnRef) else [])

    def mask(self, dataset: "datasets.Dataset") -> np.ndarray:
        """Boolean array: which rows of ``dataset`` pass (null values fail)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        values = _column(dataset, self.column)
        if callable(self.op):
            return np.fromiter(
                (v is not None and bool(self.op(v)) for v in values.to_pylist()), dtype=bool, count=len(values)
            )
        if self.op in _NULL_TESTS:
            nulls = values.is_null().to_numpy(zero_copy_only=False).astype(bool)
            return nulls if self.op == "is null" else ~nulls
        if pa.types.is_null(values.type):  # every value null: every row fails
            return np.zeros(len(values), dtype=bool)
        scale = self.ordinal_scale
        try:
            left = _ranked(values, scale)
            if self.op in _MEMBERSHIP:
                wanted = [scale.index(v) for v in self.value] if scale else list(self.value)
                passed = pc.is_in(left, value_set=pa.array(wanted, type=left.type if scale else None))
                passed = pc.invert(passed) if self.op == "not in" else passed
                passed = pc.if_else(left.is_null(), False, passed)
            else:
                if isinstance(self.value, ColumnRef):
                    right = _ranked(_column(dataset, self.value.column), scale)
                else:
                    right = scale.index(self.value) if scale else self.value
                passed = _COMPARE[self.op](left, right)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(
                f"Cannot evaluate condition '{self}' on column {self.column!r} of type {values.type}: {err}"
            ) from err
        return pc.fill_null(passed, False).to_numpy(zero_copy_only=False).astype(bool)


#: keep one row per near-duplicate cluster (needs :class:`~magpie_hf.steps.neighbors.Neighbors` columns)
DEDUPLICATE = Condition("min_similar_conversation_id", "==", ColumnRef("conversation_id"))


def _column(dataset: "datasets.Dataset", name: str) -> "pa.ChunkedArray":
    import pyarrow as pa

    column = dataset.with_format("arrow")[name]  # respects an indices mapping
    return pa.chunked_array([column]) if isinstance(column, pa.Array) else column


def _ranked(values: "pa.ChunkedArray", scale: tuple[str, ...] | None) -> "pa.ChunkedArray":
    """Labels as their rank on ``scale`` (a label off the scale becomes null); other columns as they are."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if scale is None:
        return values
    return pc.index_in(values, value_set=pa.array(list(scale), type=pa.string()))


@dataclasses.dataclass(frozen=True)
class Stratum:
    """A share of the length cut reserved for rows passing ``condition`` (Filter6's difficulty mix)."""

    condition: Condition
    share: float


@dataclasses.dataclass(kw_only=True)
class Filter(GlobalStep):
    """Keep rows passing every condition, then the ``keep_longest`` rows with the longest responses.

    The length cut sorts by the character length of ``length_column``, longest first, ties by
    ``conversation_id`` (row order without that column), and keeps the surviving rows in their
    original order. With ``strata``, the cut is split: stratum *i* contributes the
    ``share_i * keep_longest`` longest rows among those passing its condition (no top-up when a
    stratum runs short; rows in no stratum are removed and reported).

    Example:
        >>> import datasets
        >>> dataset = datasets.Dataset.from_dict(
        ...     {"conversation_id": ["a", "b", "c"], "difficulty": ["easy", "hard", "medium"], "response": ["x", "yyy", "zz"]})
        >>> f = Filter(conditions=[Condition("difficulty", ">=", "medium")], keep_longest=1)
        >>> f.process_dataset(dataset, seed=0)["conversation_id"][:]
        ['b']
        >>> f.report
        [{'condition': "difficulty >= 'medium'", 'removed': 1}, {'condition': 'keep 1 longest response', 'removed': 1}]
    """

    conditions: list[Condition] = dataclasses.field(default_factory=list)
    keep_longest: int | None = None
    length_column: str = "response"
    id_column: str = "conversation_id"
    strata: list[Stratum] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_longest is not None and self.keep_longest < 0:
            raise ValueError(f"keep_longest must be >= 0, got {self.keep_longest}")
        if self.strata:
            if self.keep_longest is None:
                raise ValueError("strata split the length cut, so they need keep_longest")
            if abs(sum(s.share for s in self.strata) - 1.0) > 1e-9:
                raise ValueError(f"stratum shares must add up to 1, got {[s.share for s in self.strata]}")
        #: rows removed per stage, in order: [{"condition": str, "removed": int}, ...]
        self.report: list[dict[str, Any]] = []

    def required_columns(self) -> list[str]:
        columns = [c for cond in self.conditions for c in cond.columns()]
        columns += [c for s in self.strata or () for c in s.condition.columns()]
        if self.keep_longest is not None:
            columns.append(self.length_column)
        return list(dict.fromkeys(columns))

    @property
    def inputs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.required_columns())

    def process_dataset(self, dataset: "datasets.Dataset", *, seed: int = 0) -> "datasets.Dataset":
        self.report = []
        alive = np.ones(len(dataset), dtype=bool)
        for condition in self.conditions:
            before = int(alive.sum())
            alive &= condition.mask(dataset)
            self._record(str(condition), before - int(alive.sum()))
        if self.keep_longest is not None:
            alive = self._length_cut(dataset, alive)
        self.stats["rows_in"] += len(dataset)
        self.stats["rows_out"] += int(alive.sum())
        return dataset.select(np.flatnonzero(alive))

    def _record(self, condition: str, removed: int) -> None:
        self.report.append({"condition": condition, "removed": removed})
        self.stats[f"removed: {condition}"] += removed

    def _length_cut(self, dataset: "datasets.Dataset", alive: np.ndarray) -> np.ndarray:
        import pyarrow.compute as pc

        lengths = pc.utf8_length(_column(dataset, self.length_column)).to_numpy(zero_copy_only=False)
        lengths = np.nan_to_num(np.asarray(lengths, dtype=np.float64), nan=-1.0)  # null responses sort last
        ties = (
            np.asarray(_column(dataset, self.id_column).to_numpy(zero_copy_only=False).astype(str))
            if self.id_column in dataset.column_names
            else np.arange(len(dataset))
        )

        def longest(candidates: np.ndarray, k: int) -> np.ndarray:
            rows = np.flatnonzero(candidates)
            order = np.lexsort((ties[rows], -lengths[rows]))  # longest first, ties by id
            return rows[order[:k]]

        if not self.strata:
            kept = longest(alive, self.keep_longest)
            self._record(f"keep {self.keep_longest} longest {self.length_column}", int(alive.sum()) - len(kept))
            return np.isin(np.arange(len(alive)), kept)

        in_stratum = np.zeros_like(alive)
        masks = [s.condition.mask(dataset) & alive for s in self.strata]
        for m in masks:
            in_stratum |= m
        before = int(alive.sum())
        strata = " | ".join(str(s.condition) for s in self.strata)
        self._record(f"in no stratum ({strata})", before - int(in_stratum.sum()))
        quotas = _quotas(self.keep_longest, [s.share for s in self.strata])
        kept_rows: list[np.ndarray] = []
        taken = np.zeros_like(alive)
        for stratum, mask, quota in zip(self.strata, masks, quotas):
            rows = longest(mask & ~taken, quota)  # a row in two strata counts once, in the first
            taken[rows] = True
            kept_rows.append(rows)
            if len(rows) < quota:
                self.stats[f"short: {stratum.condition}"] += quota - len(rows)
        split = ", ".join(f"{q} {s.condition}" for q, s in zip(quotas, self.strata))
        kept = sum(len(rows) for rows in kept_rows)
        self._record(f"keep {self.keep_longest} longest {self.length_column} ({split})", int(in_stratum.sum()) - kept)
        return taken


def _quotas(total: int, shares: Sequence[float]) -> list[int]:
    """Split ``total`` by ``shares``; rounding leftovers go to the first strata."""
    quotas = [int(total * s) for s in shares]
    for i in range(total - sum(quotas)):
        quotas[i % len(quotas)] += 1
    return quotas


# -- what every recipe drops first ------------------------------------------------------------------


def hygiene_conditions(columns: Sequence[str]) -> list[Condition]:
    """The conditions a recipe's filter applies before its preset, for the ``columns`` its rows have: no
    error column set (``*_error``: a failed response, judge, guard or reward), no response cut by the
    length limit (``response_finish_reason``), and, when the guard ran, only rows it called safe
    (``is_safe``; a row it could not judge goes too). Each is one line of the filter report.

    Example:
        >>> [str(c) for c in hygiene_conditions(["response", "response_error", "response_finish_reason", "is_safe"])]
        ['response_error is null', "response_finish_reason != 'length'", 'is_safe == True']
    """
    conditions = [Condition(c, "is null") for c in dict.fromkeys(columns) if c.endswith("_error")]
    if "response_finish_reason" in columns:
        conditions.append(Condition("response_finish_reason", "!=", "length"))
    if "is_safe" in columns:
        conditions.append(Condition("is_safe", "==", True))
    return conditions


# -- the paper's presets (Table 4) ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FilterPreset:
    """A named filter configuration; ``rows`` is the paper's length cut (None: no cut)."""

    conditions: tuple[Condition, ...]
    rows: int | None
    description: str
    strata: tuple[Stratum, ...] | None = None


_NO_EXACT_REPEAT = Condition("min_neighbor_distance", ">", 0.0)
_REWARD = Condition("instruct_reward", ">", TAU1)
_REWARD_DIFF = Condition("reward_difference", ">", TAU2)

FILTER_PRESETS: dict[str, FilterPreset] = {
    "Filter": FilterPreset(
        (Condition("input_quality", ">=", "good"), Condition("difficulty", ">=", "medium"), _NO_EXACT_REPEAT, _REWARD_DIFF),
        300_000,
        "quality >= good, difficulty >= medium, min neighbour distance > 0, reward difference > 0; 300K longest",
    ),
    "Filter1": FilterPreset(
        (Condition("input_quality", ">=", "average"), _NO_EXACT_REPEAT, _REWARD),
        300_000,
        "quality >= average, min neighbour distance > 0, reward > -12; 300K longest",
    ),
    "Filter2": FilterPreset(
        (Condition("input_quality", ">=", "good"), Condition("difficulty", ">=", "easy"), _NO_EXACT_REPEAT, _REWARD),
        300_000,
        "quality >= good, difficulty >= easy, min neighbour distance > 0, reward > -12; 300K longest",
    ),
    "Filter3": FilterPreset(
        (_NO_EXACT_REPEAT, _REWARD), 300_000, "min neighbour distance > 0, reward > -12; 300K longest"
    ),
    "Filter4": FilterPreset(
        (Condition("input_quality", ">=", "good"), Condition("difficulty", ">=", "easy"), _NO_EXACT_REPEAT, _REWARD_DIFF),
        300_000,
        "quality >= good, difficulty >= easy, min neighbour distance > 0, reward difference > 0; 300K longest",
    ),
    "Filter5": FilterPreset(
        (Condition("input_quality", ">=", "good"), Condition("difficulty", ">=", "easy"), _NO_EXACT_REPEAT, _REWARD),
        None,
        "quality >= good, difficulty >= easy, min neighbour distance > 0, reward > -12; no length cut (338K in the paper)",
    ),
    "Filter6": FilterPreset(
        (_NO_EXACT_REPEAT, _REWARD),
        200_000,
        "min neighbour distance > 0, reward > -12; 200K longest: 100K longest 'easy' + 100K longest "
        "harder than easy ('medium', 'hard', 'very hard')",
        strata=(
            Stratum(Condition("difficulty", "==", "easy"), 0.5),
            Stratum(Condition("difficulty", ">", "easy"), 0.5),
        ),
    ),
}


def preset_filter(
    name: str,
    *,
    max_rows: int | None = None,
    scale: float | None = None,
    before: Sequence[Condition] = (),
    **kwargs: Any,
) -> Filter:
    """A :class:`Filter` for one of the paper's Table 4 presets.

    Args:
        name: ``Filter``, ``Filter1`` ... ``Filter6``.
        max_rows: replace the preset's length cut (300K / 200K) by this many rows. Presets without a
            length cut (``Filter5``) ignore it.
        scale: or multiply the paper's cut by this factor (``scale=1e-3`` keeps 300 of 300K).
        before: conditions applied before the preset's (a recipe passes :func:`hygiene_conditions`).

    Example:
        >>> preset_filter("Filter6", max_rows=10).strata[0].condition
        Condition(column='difficulty', op='==', value='easy', scale=None)
    """
    if name not in FILTER_PRESETS:
        close = difflib.get_close_matches(name, FILTER_PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown filter preset {name!r}.{hint} Presets: {sorted(FILTER_PRESETS)}")
    if max_rows is not None and scale is not None:
        raise ValueError("Pass max_rows or scale, not both.")
    preset = FILTER_PRESETS[name]
    rows = preset.rows
    if rows is not None and max_rows is not None:
        rows = max_rows
    elif rows is not None and scale is not None:
        rows = max(1, round(rows * scale))
    return Filter(
        name=kwargs.pop("name", name),
        conditions=[*before, *preset.conditions],
        keep_longest=rows,
        strata=list(preset.strata) if preset.strata else None,
        **kwargs,
    )
