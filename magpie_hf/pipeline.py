"""Run steps stage-major over Parquet shards, resumably.

Each stage runs over every shard before the next stage starts, so one model at a time sits in
memory. A shard is written atomically (temporary file, then rename) with a small JSON of its
counts beside it; a rerun skips finished shards and stages, and per-shard seeds make a resumed
run produce exactly the rows of an uninterrupted one. Rows live in Parquet and memory-mapped
Arrow, never all at once as Python objects.

Layout of ``output_dir``::

    pipeline.json                      settings of the run (a rerun with other settings is refused)
    stages/00-magpie_instructions/     shard-00000.parquet, shard-00000.json, ..., _stage.json
    stages/01-responses/               ...

Example:
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.pipeline import Pipeline
    >>> from magpie_hf.steps import MagpieInstructions, Responses
    >>> engine = EngineConfig.embedded()
    >>> steps = MagpieInstructions(engine=engine, num_rows=8, max_tokens=64) >> Responses(engine=engine, max_tokens=64)
    >>> dataset = Pipeline(steps, "runs/demo", shard_size=4).run()   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from magpie_hf import engines
from magpie_hf.steps.base import Batch, GeneratorStep, GlobalStep, Step, batch_len

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class PipelineMismatchError(RuntimeError):
    """The output directory holds a run made with other settings."""


def shard_seed(seed: int, stage: int, shard: int) -> int:
    """A 31-bit seed for one shard of one stage, stable across runs and machines."""
    digest = hashlib.sha256(f"magpie_hf:{seed}:{stage}:{shard}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def counts_since(before: Counter, now: Counter) -> Counter:
    """What a step counted since ``before``, keeping keys it touched with zero (a filter condition
    that removed nothing is still reported); ``Counter`` subtraction would drop them."""
    return Counter({key: value - before.get(key, 0) for key, value in now.items() if key not in before or value != before[key]})


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so that a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def dataset_from_parquet(files: Sequence[Path], cache_dir: Path | None = None) -> "datasets.Dataset":
    """A memory-mapped ``datasets.Dataset`` over Parquet shards whose schemas may differ in null-ness."""
    import datasets

    files = [Path(f) for f in files]
    if not files:
        return datasets.Dataset.from_dict({})
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    features = datasets.Features.from_arrow_schema(schema)
    tables = [f for f in files if pq.read_metadata(f).num_rows > 0]
    if not tables:
        return datasets.Dataset.from_dict({name: [] for name in schema.names}, features=features)
    return datasets.Dataset.from_parquet(
        [str(f) for f in tables], features=features, cache_dir=str(cache_dir) if cache_dir else None
    )


class Pipeline:
    """Runs a chain of steps over Parquet shards in ``output_dir`` and returns the last stage.

    Args:
        steps: the steps, first a :class:`GeneratorStep` (or give ``input_dataset``).
        output_dir: where shards, manifests and caches go; rerunning resumes.
        shard_size: rows per shard (the unit of resumption).
        seed: the run seed; every shard's sampling seed derives from it.
        input_dataset: a ``datasets.Dataset`` to start from instead of a generator step.
        progress: show tqdm progress bars.
    """

    def __init__(
        self,
        steps: Iterable[Step],
        output_dir: str | os.PathLike,
        *,
        shard_size: int = 1000,
        seed: int = 0,
        input_dataset: "datasets.Dataset | None" = None,
        progress: bool = True,
    ) -> None:
        self.steps: list[Step] = list(steps)
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
        self.output_dir = Path(output_dir)
        self.shard_size = shard_size
        self.seed = seed
        self.input_dataset = input_dataset
        self.progress = progress
        self.stage_reports: list[dict[str, Any]] = []

    # -- layout --------------------------------------------------------------------------------
    @property
    def stages_dir(self) -> Path:
        return self.output_dir / "stages"

    def stage_dir(self, index: int) -> Path:
        return self.stages_dir / f"{index:02d}-{self.steps[index].name}"

    def stage_files(self, index: int) -> list[Path]:
        return sorted(self.stage_dir(index).glob("shard-*.parquet"))

    def stage_dataset(self, index: int) -> "datasets.Dataset":
        """The rows of a finished stage as a memory-mapped dataset."""
        return dataset_from_parquet(self.stage_files(index), self.output_dir / "cache")

    def settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "shard_size": self.shard_size,
            "steps": [step.config_record() for step in self.steps],
        }

    def manifest(self) -> dict[str, Any]:
        """Settings plus what each stage did (rows in/out, counts such as dropped rows, seconds, tokens)."""
        return {**self.settings(), "stages": self.stage_reports}

    # -- running -------------------------------------------------------------------------------
    def run(self) -> "datasets.Dataset":
        """Run every unfinished stage and return the last stage as a ``datasets.Dataset``."""
        self._check_or_write_settings()
        self.stage_reports = []
        loaded_before = engines.loaded_engine_configs()
        for index, step in enumerate(self.steps):
            report = self._run_stage(index, step)
            self.stage_reports.append(report)
            # keep an engine loaded when the next stage uses the same one; free the rest we loaded
            needed_next = self.steps[index + 1].engine_configs() if index + 1 < len(self.steps) else set()
            ours = engines.loaded_engine_configs() - loaded_before
            engines.release_engines(ours - needed_next)
        _atomic_write_bytes(self.output_dir / "manifest.json", json.dumps(self.manifest(), indent=2).encode())
        return self.stage_dataset(len(self.steps) - 1)

    def _check_or_write_settings(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "pipeline.json"
        settings = json.loads(json.dumps(self.settings()))
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != settings:
                raise PipelineMismatchError(
                    f"{self.output_dir} holds a run made with other settings (see {path}). "
                    "Resume it with the same settings, or choose a new output directory."
                )
        else:
            _atomic_write_bytes(path, json.dumps(settings, indent=2).encode())

    def _run_stage(self, index: int, step: Step) -> dict[str, Any]:
        stage_dir = self.stage_dir(index)
        done_marker = stage_dir / "_stage.json"
        if done_marker.exists():
            logger.info("stage %s already finished; skipping", stage_dir.name)
            return json.loads(done_marker.read_text())
        stage_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        bar = self._progress_bar(index, step)
        step.progress_callback = bar.on_engine_progress
        step.load()
        try:
            if isinstance(step, GeneratorStep):
                shard_reports = self._run_generator(index, step, bar)
            elif isinstance(step, GlobalStep):
                shard_reports = self._run_global(index, step, bar)
            else:
                shard_reports = self._run_batches(index, step, bar)
        finally:
            step.unload()
            step.progress_callback = None
            bar.close()
        counts: Counter[str] = Counter()
        for r in shard_reports:
            counts.update(r["stats"])
        report = {
            "stage": stage_dir.name,
            "step": type(step).__name__,
            "rows_in": sum(r["rows_in"] for r in shard_reports),
            "rows_out": sum(r["rows_out"] for r in shard_reports),
            "stats": dict(counts),
            "seconds": round(sum(r["seconds"] for r in shard_reports), 3),
            "wall_seconds_this_run": round(time.perf_counter() - started, 3),
        }
        _atomic_write_bytes(done_marker, json.dumps(report, indent=2).encode())
        dropped = {k: v for k, v in counts.items() if k.startswith("dropped")}
        logger.info("stage %s: %d rows in, %d rows out%s", stage_dir.name, report["rows_in"], report["rows_out"],
                    f", dropped {dropped}" if dropped else "")
        return report

    def _progress_bar(self, index: int, step: Step) -> "_StageProgress":
        if isinstance(step, GeneratorStep):
            total = step.num_rows
        elif index > 0:
            total = sum(pq.read_metadata(f).num_rows for f in self.stage_files(index - 1))
        else:
            total = len(self.input_dataset) if self.input_dataset is not None else None
        return _StageProgress(total=total, desc=f"{index:02d} {step.name}", disable=not self.progress)

    def _finish_shard(self, path: Path, batch: Batch, report: dict[str, Any]) -> dict[str, Any]:
        _atomic_write_bytes(path.with_suffix(".json"), json.dumps(report).encode())
        write_parquet_atomic(pa.Table.from_pydict(batch), path)
        return report

    def _shard_done(self, path: Path) -> dict[str, Any] | None:
        if path.exists() and path.with_suffix(".json").exists():
            return json.loads(path.with_suffix(".json").read_text())
        return None

    def _run_generator(self, index: int, step: GeneratorStep, bar: "_StageProgress") -> list[dict[str, Any]]:
        reports = []
        for shard in range(math.ceil(step.num_rows / self.shard_size)):
            path = self.stage_dir(index) / f"shard-{shard:05d}.parquet"
            offset = shard * self.shard_size
            size = min(self.shard_size, step.num_rows - offset)
            previous = self._shard_done(path)
            if previous is not None:
                bar.skip(size)
                reports.append(previous)
                continue
            before, started = Counter(step.stats), time.perf_counter()
            batch = step.generate(offset=offset, num_rows=size, seed=shard_seed(self.seed, index, shard))
            stats = counts_since(before, step.stats)
            bar.batch_done(size, stats.get("generated_tokens", 0))
            report = {"rows_in": size, "rows_out": batch_len(batch), "stats": dict(stats), "seconds": time.perf_counter() - started}
            reports.append(self._finish_shard(path, batch, report))
        return reports

    def _input_files(self, index: int) -> list[Path]:
        if index > 0:
            return self.stage_files(index - 1)
        # a user-given dataset becomes the input shards of stage 0, written once
        input_dir = self.output_dir / "stages" / "input"
        marker = input_dir / "_stage.json"
        if not marker.exists():
            input_dir.mkdir(parents=True, exist_ok=True)
            assert self.input_dataset is not None
            for shard, start in enumerate(range(0, max(len(self.input_dataset), 1), self.shard_size)):
                part = self.input_dataset.select(range(start, min(start + self.shard_size, len(self.input_dataset))))
                write_parquet_atomic(part.with_format("arrow")[:], input_dir / f"shard-{shard:05d}.parquet")
            _atomic_write_bytes(marker, b"{}")
        return sorted(input_dir.glob("shard-*.parquet"))

    def _run_batches(self, index: int, step: Step, bar: "_StageProgress") -> list[dict[str, Any]]:
        reports = []
        for shard, source in enumerate(self._input_files(index)):
            path = self.stage_dir(index) / f"shard-{shard:05d}.parquet"
            previous = self._shard_done(path)
            table = pq.read_table(source)
            if previous is not None:
                bar.skip(table.num_rows)
                reports.append(previous)
                continue
            if shard == 0 or table.num_rows:
                step.check_inputs(table.column_names)
            before, started = Counter(step.stats), time.perf_counter()
            seed = shard_seed(self.seed, index, shard)
            parts: list[pa.Table] = []
            for number, start in enumerate(range(0, table.num_rows, step.batch_size)):
                rows = table.slice(start, step.batch_size)
                tokens_before = step.stats.get("generated_tokens", 0)
                out = step.process(rows.to_pydict(), seed=seed + number)
                bar.batch_done(rows.num_rows, step.stats.get("generated_tokens", 0) - tokens_before)
                if batch_len(out):
                    parts.append(pa.Table.from_pydict(out))
            merged = pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({})
            stats = counts_since(before, step.stats)
            report = {"rows_in": table.num_rows, "rows_out": merged.num_rows, "stats": dict(stats), "seconds": time.perf_counter() - started}
            _atomic_write_bytes(path.with_suffix(".json"), json.dumps(report).encode())
            write_parquet_atomic(merged, path)
            reports.append(report)
        return reports

    def _run_global(self, index: int, step: GlobalStep, bar: "_StageProgress") -> list[dict[str, Any]]:
        # a global stage is one unit of work: its shards appear only once it has finished
        started = time.perf_counter()
        before = Counter(step.stats)
        dataset = dataset_from_parquet(self._input_files(index), self.output_dir / "cache")
        if len(dataset):
            step.check_inputs(dataset.column_names)
        result = step.process_dataset(dataset, seed=shard_seed(self.seed, index, 0))
        bar.batch_done(len(dataset), step.stats.get("generated_tokens", 0) - before.get("generated_tokens", 0))
        stage_dir = self.stage_dir(index)
        for stale in stage_dir.glob("shard-*"):
            stale.unlink()
        num_shards = max(1, math.ceil(len(result) / self.shard_size))
        for shard in range(num_shards):
            part = result.select(range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(result))))
            write_parquet_atomic(part.with_format("arrow")[:], stage_dir / f"shard-{shard:05d}.parquet")
        stats = counts_since(before, step.stats)
        return [{"rows_in": len(dataset), "rows_out": len(result), "stats": dict(stats), "seconds": time.perf_counter() - started}]


class _StageProgress:
    """A tqdm bar over rows that also shows generated tokens/s."""

    def __init__(self, total: int | None, desc: str, disable: bool) -> None:
        self._bar = tqdm(total=total, desc=desc, unit="row", disable=disable, dynamic_ncols=True)
        self._tokens = 0
        self._started = time.perf_counter()
        self._engine_rows = 0  # rows the engine reported inside the current batch

    def _postfix(self) -> None:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        self._bar.set_postfix_str(f"{self._tokens / elapsed:.1f} tok/s", refresh=False)

    def on_engine_progress(self, finished: int, new_tokens: int) -> None:
        self._tokens += new_tokens
        self._engine_rows += finished
        self._bar.update(finished)
        self._postfix()

    def batch_done(self, rows: int, tokens: int) -> None:
        """A batch finished: top the bar up to its row count when the engine did not report per row."""
        if not self._engine_rows:
            self._tokens += tokens
        self._bar.update(max(rows - self._engine_rows, 0))
        self._engine_rows = 0
        self._postfix()

    def skip(self, rows: int) -> None:
        self._bar.update(rows)

    def close(self) -> None:
        self._bar.close()
