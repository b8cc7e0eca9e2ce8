"""The one place that runs a step: a shard task in, a written shard and its report out.

:func:`run_shard` is the only code that calls :meth:`~magpie_hf.steps.GeneratorStep.generate` or
:meth:`~magpie_hf.steps.Step.process`, counts what a step did, types the columns and writes the
shard; executors (:mod:`magpie_hf.executors`) only decide *where* it runs (this process, or a Ray
actor) and where the step's ``load()`` happens. :func:`run_global` is the single path of global
steps (neighbours, filters, pairing), which see a whole stage at once.

A :class:`ShardTask` names one unit of work: the stage and shard, the rows (``row_offset`` and
``num_rows`` for a generator; an input Parquet file otherwise), the seed of its first row and the
output path. It is plain data, so it travels to a Ray worker as a dict.

Example:
    >>> import dataclasses, tempfile
    >>> from magpie_hf.executors.layout import RunLayout
    >>> from magpie_hf.steps import GeneratorStep
    >>> from magpie_hf.steps.base import INT
    >>> @dataclasses.dataclass(kw_only=True)
    ... class Count(GeneratorStep):
    ...     def output_features(self):
    ...         return {"n": INT}
    ...     def generate(self, *, offset, num_rows, seed):
    ...         return {"n": list(range(offset, offset + num_rows))}
    >>> layout = RunLayout(tempfile.mkdtemp())
    >>> task = ShardTask(stage=0, shard=1, output=str(layout.shard_path(layout.stage_dir(0, "count"), 1)),
    ...                  seed=7, row_offset=3, num_rows=3)
    >>> report = run_shard(Count(num_rows=6), task, layout)
    >>> report.rows_in, report.rows_out
    (3, 3)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from magpie_hf.errors import ColumnTypeError
from magpie_hf.executors.layout import RunLayout
from magpie_hf.seeds import row_seed
from magpie_hf.steps.base import Batch, GeneratorStep, GlobalStep, ProgressCallback, Step, batch_len

if TYPE_CHECKING:
    import datasets

    from magpie_hf.executors.progress import StageProgress

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One unit of work: a shard of a stage.

    Attributes:
        stage: the stage's index in the pipeline.
        shard: the shard's index in the stage.
        output: absolute path of the Parquet file to write.
        seed: the seed of the shard's first row (:mod:`magpie_hf.seeds`).
        row_offset: index of the shard's first row among the stage's rows.
        num_rows: rows to make (generator) or rows in the input file.
        source: the input Parquet file; None for a generator step.
    """

    stage: int
    shard: int
    output: str
    seed: int
    row_offset: int
    num_rows: int
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardTask":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class ShardReport:
    """What a step did with one shard (or a global step with its stage)."""

    rows_in: int
    rows_out: int
    #: the step's counts (dropped rows, unparseable answers, generated tokens, ...)
    stats: dict[str, int]
    seconds: float
    #: what the step says about how it made the rows (:meth:`~magpie_hf.steps.Step.provenance`)
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the machine (and Ray node) that wrote the shard, so a shard the driver cannot read can be traced
    node: str = ""

    @property
    def tokens(self) -> int:
        return int(self.stats.get("generated_tokens", 0))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardReport":
        return cls(rows_in=data["rows_in"], rows_out=data["rows_out"], stats=dict(data["stats"]), seconds=data["seconds"],
                   provenance=dict(data.get("provenance") or {}), node=str(data.get("node") or ""))


def run_shard(
    step: Step, task: ShardTask, layout: RunLayout, progress: "StageProgress | None" = None, *, node: str | None = None
) -> ShardReport:
    """Run ``step`` on ``task`` (the step is already loaded), write the shard, return its report.

    ``node`` names where this runs (default: this machine's host name; the Ray executor adds the Ray node).
    """
    before, started = collections.Counter(step.stats), time.perf_counter()
    with _reporting(step, progress):
        if isinstance(step, GeneratorStep):
            _batch_started(progress, task.num_rows)
            batch = step.generate(offset=task.row_offset, num_rows=task.num_rows, seed=task.seed)
            table = typed_table(step, batch, None)
            _batch_done(progress, task.num_rows, step, before)
            rows_in = task.num_rows
        else:
            assert task.source is not None, "a batch step's task needs an input shard"
            source = pq.read_table(task.source)
            step.check_inputs(source.column_names)
            table = _process_table(step, source, task.seed, progress)
            rows_in = source.num_rows
    report = ShardReport(rows_in, table.num_rows, _counts_since(before, step.stats), time.perf_counter() - started,
                         _provenance(step), node=node or socket.gethostname())
    layout.write_shard(Path(task.output), table, report.to_dict())
    return report


def run_global(
    step: GlobalStep, dataset: "datasets.Dataset", seed: int, progress: "StageProgress | None" = None
) -> tuple[pa.Table, ShardReport]:
    """Run a global step over a whole stage (the step is already loaded); return its typed rows."""
    before, started = collections.Counter(step.stats), time.perf_counter()
    if len(dataset):
        step.check_inputs(dataset.column_names)
    with _reporting(step, progress):
        _batch_started(progress, len(dataset))
        result = step.process_dataset(dataset, seed=seed)
        _batch_done(progress, len(dataset), step, before)
    table = result.with_format("arrow")[:] if len(result) else pa.table({n: [] for n in result.column_names})
    table = typed_table(step, table, dataset.features.arrow_schema if len(dataset.column_names) else None)
    report = ShardReport(len(dataset), table.num_rows, _counts_since(before, step.stats), time.perf_counter() - started,
                         _provenance(step))
    return table, report


def _provenance(step: Step) -> dict[str, Any]:
    """What the step says about how it made its rows, plus, for a step on vLLM, whether vLLM ran
    batch-invariant where it ran (:func:`magpie_hf.engines.vllm_batch_invariant`): a seed redraws the same
    text on vLLM only then."""
    from magpie_hf.engines import resolve_backend, vllm_batch_invariant

    record = step.provenance()
    if any(resolve_backend(config, log=False) == "vllm" for config in step.engine_configs()):
        record = {**record, "vllm_batch_invariant": vllm_batch_invariant()}
    return record


def typed_table(step: Step, batch: Batch | pa.Table, input_schema: pa.Schema | None) -> pa.Table:
    """``batch`` as an Arrow table with every column typed: a column the step declares gets its
    declared type, a column passed through from the input keeps the input's type.

    An empty batch gets every declared column (``datasets.concatenate_datasets(axis=1)`` drops the columns
    of an empty dataset, and the next stage reads them). Refuses a column the step neither declares nor
    received, a declared column missing from a non-empty batch, and a value whose struct fields the declared type would silently drop.
    """
    declared = step.output_features()
    columns = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    rows = batch.num_rows if isinstance(batch, pa.Table) else batch_len(batch)
    if rows == 0:  # nothing written: the shard still has the stage's columns (an empty dataset can lose them)
        passed = columns or (input_schema.names if input_schema is not None else [])
        columns = list(dict.fromkeys([*passed, *declared]))
    else:
        absent = [c for c in declared if c not in columns]
        if absent:
            raise ColumnTypeError(f"Step {step.name!r} declares columns {absent} in output_features() but did not write them.")
    fields = []
    for name in columns:
        if name in declared:
            fields.append(pa.field(name, declared[name]))
        elif input_schema is not None and name in input_schema.names:
            fields.append(input_schema.field(name))
        else:
            raise ColumnTypeError(
                f"Step {step.name!r} wrote column {name!r}, which it neither declares in output_features() "
                "nor received from the previous stage. Declare it with its type."
            )
    schema = pa.schema(fields)
    if rows == 0:
        return schema.empty_table()
    if isinstance(batch, pa.Table):
        return batch.select(columns).cast(schema) if batch.schema != schema else batch
    arrays = []
    for field in fields:
        values = batch.get(field.name, [None] * rows)
        arrays.append(_typed_array(step, field, values))
    return pa.Table.from_arrays(arrays, schema=schema)


def _typed_array(step: Step, field: pa.Field, values: list[Any]) -> pa.Array:
    try:
        array = pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ColumnTypeError(f"Step {step.name!r} column {field.name!r} does not fit its declared type {field.type}: {err}") from err
    lost = _lost_fields(pa.array(values).type, field.type)
    if lost:
        raise ColumnTypeError(
            f"Step {step.name!r} column {field.name!r} holds fields {lost} that its declared type {field.type} lacks; "
            "add them to output_features()."
        )
    return array


def _lost_fields(inferred: pa.DataType, declared: pa.DataType) -> list[str]:
    """Struct fields present in ``inferred`` but absent from ``declared`` (at any depth)."""
    if pa.types.is_struct(inferred) and pa.types.is_struct(declared):
        names = {declared.field(i).name: declared.field(i).type for i in range(declared.num_fields)}
        lost = []
        for i in range(inferred.num_fields):
            child = inferred.field(i)
            if child.name not in names:
                lost.append(child.name)
            else:
                lost += [f"{child.name}.{x}" for x in _lost_fields(child.type, names[child.name])]
        return lost
    if pa.types.is_list(inferred) and (pa.types.is_list(declared) or pa.types.is_large_list(declared)):
        return _lost_fields(inferred.value_type, declared.value_type)
    return []


def _process_table(step: Step, source: pa.Table, seed: int, progress: "StageProgress | None") -> pa.Table:
    """``source`` through ``step``, ``step.batch_size`` rows at a time, each batch seeded by its first row."""
    parts: list[pa.Table] = []
    for start in range(0, source.num_rows, step.batch_size):
        rows = source.slice(start, step.batch_size)
        before = collections.Counter(step.stats)
        _batch_started(progress, rows.num_rows)
        out = step.process(rows.to_pydict(), seed=row_seed(seed, start))
        _batch_done(progress, rows.num_rows, step, before)
        parts.append(typed_table(step, out, source.schema))
    kept = [part for part in parts if part.num_rows]
    if kept:
        return pa.concat_tables(kept)
    return parts[0] if parts else typed_table(step, {}, source.schema)


@contextlib.contextmanager
def _reporting(step: Step, progress: "StageProgress | None") -> Iterator[None]:
    """Install the stage's progress callback on ``step`` while it runs."""
    step.progress_callback = progress.callback if progress is not None else None
    try:
        yield
    finally:
        step.progress_callback = None


def _batch_started(progress: "StageProgress | None", rows: int) -> None:
    if progress is not None:
        progress.batch_started(rows)


def _batch_done(progress: "StageProgress | None", rows: int, step: Step, before: collections.Counter) -> None:
    if progress is not None:
        progress.batch_done(rows, step.stats.get("generated_tokens", 0) - before.get("generated_tokens", 0))


def _counts_since(before: collections.Counter, now: collections.Counter) -> dict[str, int]:
    """What a step counted since ``before``, keeping keys it touched with zero (a filter condition
    that removed nothing is still reported); ``Counter`` subtraction would drop them."""
    return {key: value - before.get(key, 0) for key, value in now.items() if key not in before or value != before[key]}


# the callback type, re-exported for steps' annotations
__all__ = ["ColumnTypeError", "ProgressCallback", "ShardReport", "ShardTask", "run_global", "run_shard", "typed_table"]
