"""Run steps stage-major over Parquet shards, resumably, on an executor of your choice.

Each stage runs over every shard before the next stage starts, so one model at a time sits in
memory. The pipeline plans a stage as :class:`~magpie_hf.executors.runner.ShardTask` s (rows, seeds, paths),
skips the shards an earlier run finished (their completion record verifies; a damaged one is made
again), and hands the rest to an executor: :class:`~magpie_hf.executors.LocalExecutor` (this
process, the default) or :class:`~magpie_hf.executors.ray.RayExecutor` (a Ray cluster). Global steps
(neighbours, filters, pairing) run here, on the whole stage, through
:func:`~magpie_hf.executors.runner.run_global`. Seeds derive from (run seed, stage, row) (:mod:`magpie_hf.seeds`),
so a resumed, re-sharded or distributed run draws the same random numbers for every row as an
uninterrupted one (the same text where the model's logits do not depend on the batch: README,
"Reproducibility"). After a sharded stage the driver verifies every shard its tasks reported written
(:meth:`Pipeline._verify_outputs`), and the next stage reads exactly those files, never a listing of
the folder. Rows live in Parquet and memory-mapped Arrow, never all at once as Python objects. The
folder's layout is :class:`magpie_hf.executors.layout.RunLayout`'s.

Example:
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.pipeline import Pipeline
    >>> from magpie_hf.steps import MagpieInstructions, Responses
    >>> engine = EngineConfig.embedded()
    >>> steps = MagpieInstructions(engine=engine, num_rows=8, max_tokens=64) >> Responses(engine=engine, max_tokens=64)
    >>> dataset = Pipeline(steps, "runs/demo", shard_size=4).run()   # doctest: +SKIP
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from magpie_hf import engines
from magpie_hf.errors import ShardsNotVisibleError
from magpie_hf.executors import Executor, LocalExecutor
from magpie_hf.executors.layout import PipelineMismatchError, RunLayout
from magpie_hf.executors.progress import StageProgress
from magpie_hf.executors.runner import ShardReport, ShardTask, run_global
from magpie_hf.seeds import row_seed, stage_seed
from magpie_hf.steps.base import GeneratorStep, GlobalStep, Step
from magpie_hf.utils.redaction import redact

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

__all__ = ["Pipeline", "PipelineMismatchError", "ShardsNotVisibleError", "dataset_from_parquet"]


def dataset_from_parquet(files: Sequence[Path], cache_dir: Path | None = None) -> "datasets.Dataset":
    """A memory-mapped ``datasets.Dataset`` over Parquet shards (typed: every shard has the stage's schema)."""
    import datasets

    files = [Path(f) for f in files]
    if not files:
        return datasets.Dataset.from_dict({})
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    features = datasets.Features.from_arrow_schema(schema)
    nonempty = [f for f in files if pq.read_metadata(f).num_rows > 0]
    if not nonempty:
        return datasets.Dataset.from_dict({name: [] for name in schema.names}, features=features)
    return datasets.Dataset.from_parquet(
        [str(f) for f in nonempty], features=features, cache_dir=str(cache_dir) if cache_dir else None
    )


class Pipeline:
    """Runs a chain of steps over Parquet shards in ``output_dir`` and returns the last stage.

    Args:
        steps: the steps (or one step), first a :class:`GeneratorStep` (or give ``input_dataset``).
        output_dir: where shards, manifests and caches go (made absolute); rerunning resumes.
        shard_size: rows per shard (the unit of resumption and of distribution).
        seed: the run seed; every row's sampling seed derives from it.
        input_dataset: a ``datasets.Dataset`` to start from instead of a generator step.
        progress: show a progress bar per stage (rows, rows/s, tokens/s).
        overwrite: discard what an earlier run left in ``output_dir`` (its shards and settings) and start over;
            without it a run with other settings is refused when ``output_dir`` keeps rows they would change.
    """

    def __init__(
        self,
        steps: Step | Iterable[Step],
        output_dir: str | os.PathLike,
        *,
        shard_size: int = 1000,
        seed: int = 0,
        input_dataset: "datasets.Dataset | None" = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        self.steps: list[Step] = [steps] if isinstance(steps, Step) else list(steps)
        if not self.steps:
            raise ValueError("A pipeline needs at least one step.")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        first_is_generator = isinstance(self.steps[0], GeneratorStep)
        if first_is_generator == (input_dataset is not None):
            raise ValueError("Start the chain with a GeneratorStep, or pass input_dataset= (not both).")
        if any(isinstance(s, GeneratorStep) for s in self.steps[1:]):
            raise ValueError("Only the first step of a chain can be a GeneratorStep.")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"Step names must be unique within a pipeline, got {names}; pass name=... to tell them apart.")
        self.layout = RunLayout(output_dir)
        self.shard_size = shard_size
        self.seed = seed
        self.input_dataset = input_dataset
        self.progress = progress
        self.overwrite = overwrite
        self.stage_reports: list[dict[str, Any]] = []
        #: each finished stage's shards in this run, as its tasks wrote them (verified): the next stage's inputs
        self._outputs: dict[int, list[Path]] = {}

    # -- layout --------------------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return self.layout.root

    def stage_dir(self, index: int) -> Path:
        return self.layout.stage_dir(index, self.steps[index].name or "")

    def stage_files(self, index: int) -> list[Path]:
        """The shards of stage ``index``: those its tasks wrote and the driver verified in this run, else (a
        stage this object did not run) the finished-looking shards in its folder."""
        if index in self._outputs:
            return list(self._outputs[index])
        return self.layout.shard_files(self.stage_dir(index))

    def stage_dataset(self, index: int) -> "datasets.Dataset":
        """The rows of a finished stage as a memory-mapped dataset."""
        return dataset_from_parquet(self.stage_files(index), self.layout.cache_dir)

    def settings(self) -> dict[str, Any]:
        """What the run's rows depend on (``pipeline.json``; a resumed run must match), secrets masked."""
        return redact({
            "seed": self.seed,
            "shard_size": self.shard_size,
            "steps": [step.config_record() for step in self.steps],
        })

    def manifest(self) -> dict[str, Any]:
        """Settings plus what each stage did (rows in/out, counts such as dropped rows, seconds, tokens)."""
        return {**self.settings(), "stages": self.stage_reports}

    def check_columns(self) -> None:
        """Refuse a chain in which a step reads a column that neither the input dataset nor an earlier
        step declares, before anything loads (so a missing stage fails in seconds, not after generation).

        Raises:
            MissingColumnsError: naming the step, the missing columns and the ones it could have.
        """
        available: set[str] = set(self.input_dataset.column_names) if self.input_dataset is not None else set()
        if "conversation_id" in available:
            self._check_unique_ids()
        for step in self.steps:
            step.check_inputs(sorted(available), source="no earlier stage declares")
            available.update(step.output_features())

    def _check_unique_ids(self) -> None:
        """Refuse an input dataset whose ``conversation_id`` s repeat: they key the rows (a neighbour's
        ``min_similar_conversation_id``, preference pairs), so a repeated one would be ambiguous."""
        ids = self.input_dataset.with_format("arrow")["conversation_id"]
        if pa.compute.count_distinct(ids, mode="all").as_py() == len(ids):
            return
        counts = pa.compute.value_counts(ids).to_pylist()
        repeated = [c["values"] for c in counts if c["counts"] > 1]
        raise ValueError(
            f"The input dataset has {len(repeated)} conversation_id value(s) that repeat (e.g. {repeated[:3]}); ids key "
            "the rows (min_similar_conversation_id, preference pairs). Make them unique first, e.g. "
            "dataset.map(lambda row, i: {'conversation_id': f\"{row['conversation_id']}-{i}\"}, with_indices=True)."
        )

    def plan(self, executor: Executor | None = None) -> list[dict[str, Any]]:
        """What each stage is (kind, columns read and written, what a worker reserves), without
        loading anything: for ``--dry-run``. Checks the chain's columns first (:meth:`check_columns`)."""
        self.check_columns()
        hardware = (executor or LocalExecutor()).hardware()
        kinds = {GeneratorStep: "generate", GlobalStep: "global"}
        return [
            {
                "stage": self.stage_dir(index).name,
                "step": type(step).__name__,
                "kind": next((kind for cls, kind in kinds.items() if isinstance(step, cls)), "batch"),
                "inputs": list(step.inputs),
                "outputs": {name: str(kind) for name, kind in step.output_features().items()},
                "gpus": step.resources(hardware).gpus,
            }
            for index, step in enumerate(self.steps)
        ]

    # -- running -------------------------------------------------------------------------------
    def run(self, executor: Executor | None = None) -> "datasets.Dataset":
        """Run every unfinished stage on ``executor`` (default: :class:`LocalExecutor`) and return
        the last stage as a ``datasets.Dataset``."""
        self.check_columns()
        executor = executor or LocalExecutor()
        check = getattr(executor, "check_stage_names", None)
        if check is not None:
            check([s.name for s in self.steps])
        with self.layout.lock():
            if self.overwrite:
                logger.warning("--overwrite: discarding what %s holds from an earlier run", self.output_dir)
                self.layout.clear()
            self.layout.check_or_write_settings(self.settings(), [self.stage_dir(i) for i in range(len(self.steps))])
            if any(not isinstance(s, GlobalStep) for s in self.steps):
                executor.start()
                executor.check_steps([s for s in self.steps if not isinstance(s, GlobalStep)])
            self.stage_reports, self._outputs = [], {}
            loaded_before = engines.loaded_engine_configs()
            for index, step in enumerate(self.steps):
                self.stage_reports.append(self._run_stage(index, step, executor))
                # keep an engine loaded when the next stage uses the same one; free the rest we loaded
                needed_next = self.steps[index + 1].engine_configs() if index + 1 < len(self.steps) else set()
                engines.release_engines(engines.loaded_engine_configs() - loaded_before - needed_next)
            self.layout.write_manifest(self.manifest())
        return self.stage_dataset(len(self.steps) - 1)

    def _run_stage(self, index: int, step: Step, executor: Executor) -> dict[str, Any]:
        stage_dir = self.stage_dir(index)
        started = time.perf_counter()
        if isinstance(step, GlobalStep):
            reports = self._run_global(index, step)
        else:
            reports = self._run_shards(index, step, executor)
        counts: collections.Counter[str] = collections.Counter()
        for r in reports:
            counts.update(r.stats)
        report = {
            "stage": stage_dir.name,
            "step": type(step).__name__,
            "shards": len(self._outputs[index]),
            "rows_in": sum(r.rows_in for r in reports),
            "rows_out": sum(r.rows_out for r in reports),
            "stats": dict(counts),
            "seconds": round(sum(r.seconds for r in reports), 3),
            "wall_seconds_this_run": round(time.perf_counter() - started, 3),
            "provenance": next((r.provenance for r in reports if r.provenance), {}),
        }
        self.layout.write_stage_record(stage_dir, report)
        dropped = {k: v for k, v in counts.items() if k.startswith("dropped")}
        logger.info("stage %s: %d rows in, %d rows out%s", stage_dir.name, report["rows_in"], report["rows_out"],
                    f", dropped {dropped}" if dropped else "")
        return report

    def _bar(self, index: int, step: Step, total: int | None) -> StageProgress:
        return StageProgress(total=total, desc=f"{index:02d} {step.name}", disable=not self.progress)

    # -- sharded stages --------------------------------------------------------------------------
    def tasks(self, index: int) -> list[ShardTask]:
        """Every shard task of stage ``index`` (a batch stage's input must be finished)."""
        step = self.steps[index]
        stage_dir, base = self.stage_dir(index), stage_seed(self.seed, index)
        tasks = []
        if isinstance(step, GeneratorStep):
            for shard, offset in enumerate(range(0, step.num_rows, self.shard_size)):
                tasks.append(ShardTask(
                    stage=index, shard=shard, output=str(self.layout.shard_path(stage_dir, shard)),
                    seed=row_seed(base, offset), row_offset=offset, num_rows=min(self.shard_size, step.num_rows - offset),
                ))
            return tasks
        offset = 0
        for shard, source in enumerate(self._input_files(index)):
            rows = pq.read_metadata(source).num_rows
            tasks.append(ShardTask(
                stage=index, shard=shard, output=str(self.layout.shard_path(stage_dir, shard)),
                seed=row_seed(base, offset), row_offset=offset, num_rows=rows, source=str(source),
            ))
            offset += rows
        return tasks

    def _run_shards(self, index: int, step: Step, executor: Executor) -> list[ShardReport]:
        tasks = self.tasks(index)
        bar = self._bar(index, step, sum(t.num_rows for t in tasks))
        done: dict[int, ShardReport] = {}
        pending = []
        for task in tasks:
            record = self.layout.verified_record(Path(task.output))
            if record is None:
                pending.append(task)
            else:
                done[task.shard] = ShardReport.from_dict(record["report"])
                bar.skip(task.num_rows)
        if pending and done:
            logger.info("stage %s: %d shard(s) finished earlier, %d to do", self.stage_dir(index).name, len(done), len(pending))
        try:
            if pending:
                reports = executor.run_stage(step, pending, self.layout, bar)
                self._verify_outputs(index, pending, reports)
                done.update(zip((t.shard for t in pending), reports))
        finally:
            bar.close()
        self._outputs[index] = [Path(t.output) for t in tasks]
        return [done[t.shard] for t in tasks]

    def _verify_outputs(self, index: int, tasks: Sequence[ShardTask], reports: Sequence[ShardReport]) -> None:
        """Check here, on the driver, every shard the workers reported written: its completion record, size,
        checksum and row count (retried briefly, :meth:`RunLayout.wait_for_shard`). The next stage reads
        exactly these files, so a shard written where the driver cannot see it (a node without the shared
        mount, Ray Client, a stale NFS view) stops the run here instead of silently dropping its rows.

        Raises:
            ShardsNotVisibleError: naming every such shard, the node that wrote it, its path and the fix.
        """
        problems = []
        for task, report in zip(tasks, reports, strict=True):
            path = Path(task.output)
            record, problem = self.layout.wait_for_shard(path)
            if problem is None and record is not None and record["rows"] != report.rows_out:
                problem = f"{record['rows']} rows on disk, {report.rows_out} reported by the worker"
            if problem is not None:
                problems.append(f"  shard {task.shard} at {path}, written by {report.node or 'an unknown node'}: {problem}")
        if problems:
            raise ShardsNotVisibleError(
                f"Stage {self.stage_dir(index).name!r}: {len(problems)} of {len(tasks)} shard(s) the workers "
                f"reported written cannot be read here (the driver, on {socket.gethostname()}):\n"
                + "\n".join(problems)
                + "\nThey are not on a filesystem the driver can read: put output_dir on shared storage mounted at "
                "the same path on every node (NFS, Lustre, a shared disk), then run again (finished shards are kept)."
            )

    def _input_files(self, index: int) -> list[Path]:
        if index > 0:
            return self.stage_files(index - 1)
        # a user-given dataset becomes the input shards of stage 0, written once
        assert self.input_dataset is not None
        input_dir = self.layout.input_dir
        dataset = self.input_dataset
        starts = range(0, max(len(dataset), 1), self.shard_size)
        for shard, start in enumerate(starts):
            path = self.layout.shard_path(input_dir, shard)
            if self.layout.verified_record(path) is None:
                part = dataset.select(range(start, min(start + self.shard_size, len(dataset))))
                self.layout.write_shard(path, part.with_format("arrow")[:], {"rows_in": len(part)})
        return [self.layout.shard_path(input_dir, shard) for shard in range(len(starts))]

    # -- global stages -------------------------------------------------------------------------
    def _run_global(self, index: int, step: GlobalStep) -> list[ShardReport]:
        stage_dir = self.stage_dir(index)
        previous = self.layout.stage_record(stage_dir)
        if previous is not None and self._global_shards_intact(stage_dir, previous.get("shards")):
            logger.info("stage %s already finished; skipping", stage_dir.name)
            self._outputs[index] = [self.layout.shard_path(stage_dir, s) for s in range(previous["shards"])]
            return [ShardReport.from_dict(previous)]
        self.layout.clear_stage(stage_dir)
        dataset = dataset_from_parquet(self._input_files(index), self.layout.cache_dir)
        bar = self._bar(index, step, len(dataset))
        step.load()
        try:
            table, report = run_global(step, dataset, stage_seed(self.seed, index), bar)
        finally:
            step.unload()
            bar.close()
        # written in shards of shard_size, so the next stage distributes as usual
        paths = [self.layout.shard_path(stage_dir, s) for s in range(max(1, math.ceil(table.num_rows / self.shard_size)))]
        for shard, path in enumerate(paths):
            part = table.slice(shard * self.shard_size, self.shard_size)
            self.layout.write_shard(path, part, {"rows_in": part.num_rows})
        self._outputs[index] = paths
        return [report]

    def _global_shards_intact(self, stage_dir: Path, count: int | None) -> bool:
        paths = [self.layout.shard_path(stage_dir, shard) for shard in range(count or 0)]
        return bool(paths) and all(self.layout.verified_record(p) is not None for p in paths)
