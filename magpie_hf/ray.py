"""Run the same steps on a Ray cluster: Ray Data ``map_batches`` over an actor pool per stage.

:class:`RayPipeline` is a :class:`~magpie_hf.pipeline.Pipeline` whose generator and batch stages run
on Ray actors, one engine replica per actor. It reads and writes exactly the local layout
(``output_dir/stages/NN-name/shard-XXXXX.parquet`` + ``.json`` report + ``_stage.json``) with the same
per-shard seeds, so its rows equal the local pipeline's (same ids; same text under greedy decoding
and, on the same engine, under seeded sampling). A rerun skips finished stages and finished shards.

How a stage runs: the driver lists the shards that still lack output, makes them a Ray dataset of
work items (one block each), and ``map_batches`` sends them with ``batch_size=1`` to a fixed-size
pool of :class:`ShardWorker` actors. Each actor builds its step and calls ``step.load()`` once
(one model replica per actor), then per shard calls ``step.generate(...)`` (generator stage) or
``step.process(batch, seed=...)`` over the shard's input Parquet (batch stage) and writes the output
shard atomically. Global steps (neighbours, filters, pairing) run on the driver over the
memory-mapped dataset, as in the local pipeline. Actors read and write ``output_dir`` directly, so on
a multi-node cluster ``output_dir`` must be shared storage (NFS or similar) mounted at the same path.

Example:
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.ray import RayPipeline, RayResources
    >>> from magpie_hf.steps import MagpieInstructions, Responses
    >>> engine = EngineConfig.embedded()
    >>> steps = MagpieInstructions(engine=engine, num_rows=8, max_tokens=64) >> Responses(engine=engine, max_tokens=64)
    >>> pipeline = RayPipeline(steps, "runs/demo", shard_size=4, resources=RayResources(replicas=2))
    >>> dataset = pipeline.run()   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from magpie_hf.pipeline import Pipeline, counts_since, shard_seed, write_parquet_atomic
from magpie_hf.steps.base import Batch, GeneratorStep, GlobalStep, Step, batch_len

if TYPE_CHECKING:
    import datasets

    from magpie_hf.pipeline import _StageProgress

logger = logging.getLogger(__name__)

__all__ = ["RayPipeline", "RayResources", "ShardWorker", "add_ray_args", "pipeline_from_args"]

#: environment variables the driver forwards to Ray workers (offline switches and cache places;
#: never a token)
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_DISABLE_TELEMETRY",
    "TOKENIZERS_PARALLELISM",
)


@dataclasses.dataclass(frozen=True)
class RayResources:
    """Actors and resources of one stage.

    Args:
        replicas: actors in the stage's pool, each with its own engine replica; ``None`` fits as
            many as the cluster's CPUs/GPUs allow (never more than the shards left to do).
        num_cpus: CPUs each actor reserves (Ray also sets the actor's ``OMP_NUM_THREADS`` to it).
        num_gpus: GPUs each actor reserves; ``None`` gives a vLLM step ``tensor_parallel_size``
            GPUs (when the cluster has GPUs) and every other step none.
        memory: bytes of heap each actor reserves (``None``: no reservation).

    Example:
        >>> RayResources(replicas=4, num_gpus=2)
        RayResources(replicas=4, num_cpus=1.0, num_gpus=2, memory=None)
    """

    replicas: int | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None
    memory: float | None = None

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus} and {self.num_gpus}")


# -- the work of one shard (runs inside an actor) ----------------------------------------------
def generate_shard(step: GeneratorStep, *, offset: int, num_rows: int, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """Rows ``[offset, offset + num_rows)`` of a generator step, as the local pipeline makes them."""
    before, started = collections.Counter(step.stats), time.perf_counter()
    batch = step.generate(offset=offset, num_rows=num_rows, seed=seed)
    report = {"rows_in": num_rows, "rows_out": batch_len(batch), "stats": dict(counts_since(before, step.stats)),
              "seconds": time.perf_counter() - started}
    return pa.Table.from_pydict(batch), report


def process_shard(step: Step, table: pa.Table, *, seed: int) -> tuple[pa.Table, dict[str, Any]]:
    """One input shard through a batch step, ``step.batch_size`` rows at a time with seeds
    ``seed, seed + 1, ...`` per batch, as the local pipeline does."""
    before, started = collections.Counter(step.stats), time.perf_counter()
    parts: list[pa.Table] = []
    for number, start in enumerate(range(0, table.num_rows, step.batch_size)):
        out: Batch = step.process(table.slice(start, step.batch_size).to_pydict(), seed=seed + number)
        if batch_len(out):
            parts.append(pa.Table.from_pydict(out))
    merged = pa.concat_tables(parts, promote_options="permissive") if parts else pa.table({})
    report = {"rows_in": table.num_rows, "rows_out": merged.num_rows, "stats": dict(counts_since(before, step.stats)),
              "seconds": time.perf_counter() - started}
    return merged, report


def _write_shard(path: Path, table: pa.Table, report: dict[str, Any]) -> None:
    # the same order as the local pipeline: report first, the Parquet rename marks the shard done
    tmp = path.with_name(f".{path.stem}.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, path.with_suffix(".json"))
    write_parquet_atomic(table, path)


class ShardWorker:
    """A Ray Data actor: one step (and so one engine replica) that turns work items into shards.

    ``__init__`` loads the step once; ``__call__`` takes a batch of work items (columns ``shard``,
    ``output``, ``source``, ``offset``, ``num_rows``, ``seed``), writes each output shard and returns
    its report as JSON.
    """

    def __init__(self, step: Step) -> None:
        self.step = step
        started = time.perf_counter()
        step.load()
        logger.info("actor loaded step %s in %.1f s", step.name, time.perf_counter() - started)

    def __call__(self, work: Mapping[str, Any]) -> dict[str, list[Any]]:
        shards, reports = [], []
        for i in range(len(work["shard"])):
            output = Path(str(work["output"][i]))
            seed = int(work["seed"][i])
            if isinstance(self.step, GeneratorStep):
                table, report = generate_shard(
                    self.step, offset=int(work["offset"][i]), num_rows=int(work["num_rows"][i]), seed=seed
                )
            else:
                source = pq.read_table(str(work["source"][i]))
                if int(work["shard"][i]) == 0 or source.num_rows:
                    self.step.check_inputs(source.column_names)
                table, report = process_shard(self.step, source, seed=seed)
            _write_shard(output, table, report)
            shards.append(int(work["shard"][i]))
            reports.append(json.dumps(report))
        return {"shard": shards, "report": reports}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.step.unload()


# -- the pipeline --------------------------------------------------------------------------------
class RayPipeline(Pipeline):
    """A :class:`~magpie_hf.pipeline.Pipeline` whose generator and batch stages run on Ray.

    Args:
        steps, output_dir, shard_size, seed, input_dataset, progress: as for
            :class:`~magpie_hf.pipeline.Pipeline`.
        address: the cluster: ``None`` (``RAY_ADDRESS`` or a new local cluster), ``"auto"`` (the
            cluster ``ray start`` runs on this machine), or ``"ray://HEAD:10001"`` (Ray Client).
            Ignored when Ray is already initialized in this process.
        resources: :class:`RayResources` for every stage, or a mapping from step name to
            resources (names missing from it get ``RayResources()``).
        runtime_env: Ray runtime environment for the workers (for example
            ``{"pip": ["magpie-hf[ray]"]}``); forwarded to ``ray.init``.
        init_kwargs: other ``ray.init`` arguments (``num_cpus=`` for a local cluster, ...).
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
        address: str | None = None,
        resources: RayResources | Mapping[str, RayResources] | None = None,
        runtime_env: dict[str, Any] | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(steps, output_dir, shard_size=shard_size, seed=seed, input_dataset=input_dataset, progress=progress)
        self.address = address
        self.resources = resources if resources is not None else RayResources()
        if isinstance(self.resources, Mapping):
            unknown = set(self.resources) - {s.name for s in self.steps}
            if unknown:
                raise ValueError(f"resources name steps {sorted(unknown)} that are not in the pipeline "
                                 f"(steps: {[s.name for s in self.steps]}).")
        self.runtime_env = runtime_env
        self.init_kwargs = dict(init_kwargs or {})
        for step in self.steps:
            _check_shippable(step)

    # -- cluster -------------------------------------------------------------------------------
    def _ensure_ray(self) -> None:
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError as err:
            raise ImportError("RayPipeline needs Ray Data: pip install 'magpie-hf[ray]'  (or 'ray[data]>=2.60')") from err
        if ray.is_initialized():
            return
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        runtime_env = copy.deepcopy(self.runtime_env) or {}
        runtime_env.setdefault("env_vars", {}).update({k: v for k, v in env.items() if k not in runtime_env["env_vars"]})
        logger.info("connecting to Ray (%s)", self.address or "RAY_ADDRESS or a new local cluster")
        ray.init(address=self.address, runtime_env=runtime_env, **{"include_dashboard": False, **self.init_kwargs})

    def stage_resources(self, step: Step) -> RayResources:
        """The resources of ``step``'s stage, with GPUs filled in for vLLM steps."""
        chosen = self.resources.get(step.name, RayResources()) if isinstance(self.resources, Mapping) else self.resources
        if chosen.num_gpus is None:
            chosen = dataclasses.replace(chosen, num_gpus=self._default_gpus(step))
        return chosen

    def _default_gpus(self, step: Step) -> float:
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        gpus = 0
        for config in step.engine_configs():
            vllm = config.backend == "vllm" or (
                config.backend == "auto" and cluster_gpus and config.gguf_file is None and not config.base_url
            )
            if vllm:
                gpus = max(gpus, config.tensor_parallel_size)
        return gpus

    def _pool_size(self, chosen: RayResources, pending: int) -> int:
        import ray

        if chosen.replicas is not None:
            return max(1, min(chosen.replicas, pending))
        available = ray.cluster_resources()
        fits = [pending]
        if chosen.num_cpus:
            fits.append(int(available.get("CPU", 0) // chosen.num_cpus))
        if chosen.num_gpus:
            fits.append(int(available.get("GPU", 0) // chosen.num_gpus))
        return max(1, min(fits))

    # -- stages --------------------------------------------------------------------------------
    def run(self) -> "datasets.Dataset":
        if any(not isinstance(s, GlobalStep) for s in self.steps):
            self._ensure_ray()
        return super().run()

    def _run_stage(self, index: int, step: Step) -> dict[str, Any]:
        if isinstance(step, GlobalStep):
            return super()._run_stage(index, step)  # on the driver, over the memory-mapped dataset
        with _loaded_by_actors_only(step):
            return super()._run_stage(index, step)

    def _run_generator(self, index: int, step: GeneratorStep, bar: "_StageProgress") -> list[dict[str, Any]]:
        work, reports = [], {}
        for shard, offset in enumerate(range(0, step.num_rows, self.shard_size)):
            size = min(self.shard_size, step.num_rows - offset)
            path = self.stage_dir(index) / f"shard-{shard:05d}.parquet"
            previous = self._shard_done(path)
            if previous is not None:
                bar.skip(size)
                reports[shard] = previous
                continue
            work.append({"shard": shard, "output": str(path), "source": "", "offset": offset, "num_rows": size,
                         "seed": shard_seed(self.seed, index, shard)})
        reports.update(self._run_on_actors(step, work, bar))
        return [reports[s] for s in sorted(reports)]

    def _run_batches(self, index: int, step: Step, bar: "_StageProgress") -> list[dict[str, Any]]:
        work, reports = [], {}
        for shard, source in enumerate(self._input_files(index)):
            path = self.stage_dir(index) / f"shard-{shard:05d}.parquet"
            previous = self._shard_done(path)
            if previous is not None:
                bar.skip(pq.read_metadata(source).num_rows)
                reports[shard] = previous
                continue
            work.append({"shard": shard, "output": str(path), "source": str(source), "offset": 0,
                         "num_rows": pq.read_metadata(source).num_rows, "seed": shard_seed(self.seed, index, shard)})
        reports.update(self._run_on_actors(step, work, bar))
        return [reports[s] for s in sorted(reports)]

    def _run_on_actors(self, step: Step, work: list[dict[str, Any]], bar: "_StageProgress") -> dict[int, dict[str, Any]]:
        """Send the pending shards through a fixed pool of :class:`ShardWorker` actors."""
        if not work:
            return {}
        import ray

        chosen = self.stage_resources(step)
        size = self._pool_size(chosen, len(work))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # our bar counts rows and tokens
        logger.info("stage %s: %d shard(s) on %d actor(s), %s CPU / %s GPU each",
                    step.name, len(work), size, chosen.num_cpus, chosen.num_gpus)
        remote_args: dict[str, Any] = {"num_cpus": chosen.num_cpus, "num_gpus": chosen.num_gpus or None}
        if chosen.memory:
            remote_args["memory"] = chosen.memory
        dataset = ray.data.from_items(work, override_num_blocks=len(work)).map_batches(
            ShardWorker,
            batch_size=1,
            # one shard at a time per actor, so a slow-to-load actor never queues work a free one could do
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={"step": _actor_copy(step)},
            **remote_args,
        )
        reports: dict[int, dict[str, Any]] = {}
        for row in dataset.iter_rows():
            report = json.loads(row["report"])
            reports[int(row["shard"])] = report
            step.stats.update(report["stats"])
            bar.batch_done(report["rows_in"], report["stats"].get("generated_tokens", 0))
        return reports


@contextlib.contextmanager
def _loaded_by_actors_only(step: Step) -> Iterator[None]:
    """Keep the driver from loading ``step``'s model: on Ray only the actors load it.

    ``Pipeline._run_stage`` calls ``step.load()``/``unload()`` around the shard loop; this shadows
    them with no-ops on the instance for the stage.
    """
    step.load = _do_nothing  # type: ignore[method-assign]
    step.unload = _do_nothing  # type: ignore[method-assign]
    try:
        yield
    finally:
        vars(step).pop("load", None)
        vars(step).pop("unload", None)


def _do_nothing() -> None:
    return None


def _actor_copy(step: Step) -> Step:
    """``step`` as shipped to the actors: no driver-side callbacks, shadows or counts."""
    shipped = copy.copy(step)
    for attribute in ("load", "unload"):
        vars(shipped).pop(attribute, None)
    shipped.progress_callback = None
    shipped.stats = collections.Counter()
    return shipped


def _check_shippable(step: Step) -> None:
    from magpie_hf.engines import Engine

    for field in dataclasses.fields(step):
        if isinstance(getattr(step, field.name), Engine):
            raise ValueError(
                f"Step {step.name!r} holds a loaded engine in {field.name!r}; on Ray each actor loads its own "
                "replica, so pass an EngineConfig instead (for example EngineConfig.embedded())."
            )


# -- command line -------------------------------------------------------------------------------
def _stage_resources_arg(text: str) -> tuple[str, dict[str, float]]:
    name, _, spec = text.partition(":")
    if not name or not spec:
        raise argparse.ArgumentTypeError(f"expected STEP:KEY=VALUE[,KEY=VALUE], got {text!r}")
    values: dict[str, float] = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in ("replicas", "num_cpus", "num_gpus"):
            raise argparse.ArgumentTypeError(f"unknown key {key!r} in {text!r}; use replicas, num_cpus or num_gpus")
        try:
            values[key] = int(value) if key == "replicas" else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key} needs a number, got {value!r} in {text!r}") from None
    return name, values


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--ray [ADDRESS]`` and the per-actor resource flags to a recipe's parser."""
    group = parser.add_argument_group("ray (run the stages on a Ray cluster)")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray: alone, RAY_ADDRESS or a new local cluster; 'auto' for the cluster "
                            "'ray start' runs here; 'ray://HEAD:10001' for a remote head")
    group.add_argument("--ray-replicas", type=int, default=None,
                       help="actors (engine replicas) per stage (default: as many as the cluster fits)")
    group.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs per actor")
    group.add_argument("--ray-num-gpus", type=float, default=None,
                       help="GPUs per actor (default: tensor_parallel_size for vLLM steps, else 0)")
    group.add_argument("--ray-stage", action="append", type=_stage_resources_arg, default=[], metavar="STEP:KEY=VALUE",
                       help="per-stage override, e.g. responses:replicas=4,num_gpus=2 (repeatable)")


def pipeline_from_args(
    args: argparse.Namespace, steps: Iterable[Step], output_dir: str | os.PathLike, shard_size: int, seed: int,
    **kwargs: Any,
) -> Pipeline:
    """A local :class:`Pipeline`, or a :class:`RayPipeline` when ``--ray`` was given."""
    steps = list(steps)
    if getattr(args, "ray", None) is None:
        return Pipeline(steps, output_dir, shard_size=shard_size, seed=seed, **kwargs)
    default = RayResources(replicas=args.ray_replicas, num_cpus=args.ray_num_cpus, num_gpus=args.ray_num_gpus)
    per_stage: dict[str, RayResources] = {}
    for name, values in args.ray_stage:
        per_stage[name] = dataclasses.replace(per_stage.get(name, default), **values)
    resources: dict[str, RayResources] = {s.name: per_stage.pop(s.name, default) for s in steps}
    if per_stage:
        raise SystemExit(f"--ray-stage names unknown steps {sorted(per_stage)}; the steps are {[s.name for s in steps]}")
    address = None if args.ray == "local" else args.ray
    return RayPipeline(steps, output_dir, shard_size=shard_size, seed=seed, address=address, resources=resources, **kwargs)
