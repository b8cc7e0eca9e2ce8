"""Run a stage's shards on a Ray cluster: Ray Data ``map_batches`` over a pool of actors.

Each actor holds one copy of the step and loads it once (one model replica per actor, on the GPUs
the actor reserved); it then runs :func:`magpie_hf.runner.run_shard` for each shard task it is
given, exactly as the local executor does, and returns the shard's report. The driver never loads
the step. Global steps (neighbours, filters, pairing) run on the driver (see
:class:`magpie_hf.pipeline.Pipeline`).

- **Resources**: each actor reserves what the step declares (:meth:`~magpie_hf.steps.Step.resources`,
  judged on the cluster's hardware: a vLLM engine with tensor parallelism ``N`` gets ``N`` GPUs, a
  reward model or a transformers engine on CUDA one, a server-backed engine none), unless a
  :class:`RayStageResources` overrides it. The pool has as many actors as the cluster fits (never
  more than the shards left).
- **Paths**: tasks carry absolute paths (the layout resolves them), so a worker whose working
  directory differs from the driver's writes to the right place. On several machines the output
  directory must be shared storage mounted at the same path.
- **Failures**: an error raised by a step inside an actor is sent back and stops the stage with
  :class:`~magpie_hf.executors.StageFailedError` carrying the worker's own error and traceback
  (application errors are not retried: they would fail again). A crashed actor process (OOM,
  segfault) is restarted at most ``max_restarts`` times and its lost task retried at most
  ``max_task_retries`` times (Ray Data's defaults are unbounded:
  ``ray/data/_internal/execution/operators/actor_pool_map_operator.py``,
  ``_apply_default_remote_args``, Ray 2.60).

Example:
    >>> from magpie_hf.executors.ray import RayExecutor, RayStageResources
    >>> executor = RayExecutor(address="auto", stages={"responses": RayStageResources(replicas=8)})
    >>> Pipeline(steps, "/shared/runs/pro").run(executor=executor)   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pickle
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from magpie_hf.executors.base import Executor, StageFailedError
from magpie_hf.hardware import Hardware, Resources
from magpie_hf.layout import RunLayout
from magpie_hf.runner import ShardReport, ShardTask, run_shard

if TYPE_CHECKING:
    from magpie_hf.progress import StageProgress
    from magpie_hf.steps.base import Step

logger = logging.getLogger(__name__)

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
class RayStageResources:
    """Overrides for the actors of one stage (``None``: what the step declares / what fits).

    Example:
        >>> RayStageResources(replicas=4, num_gpus=2)
        RayStageResources(replicas=4, num_cpus=None, num_gpus=2, memory=None)
    """

    #: actors in the stage's pool, each with its own model replica
    replicas: int | None = None
    #: CPUs each actor reserves (Ray also sets the actor's ``OMP_NUM_THREADS`` to it)
    num_cpus: float | None = None
    #: GPUs each actor reserves
    num_gpus: float | None = None
    #: bytes of heap each actor reserves
    memory: float | None = None

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        for name in ("num_cpus", "num_gpus", "memory"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


class RayExecutor(Executor):
    """Shards of a stage on a pool of Ray actors.

    Args:
        address: the cluster: ``None`` (``RAY_ADDRESS`` or a new local cluster), ``"auto"`` (the
            cluster ``ray start`` runs on this machine), or ``"ray://HEAD:10001"`` (Ray Client).
            Ignored when Ray is already initialized in this process.
        default: resources of every stage not named in ``stages``.
        stages: per-stage overrides, by step name.
        runtime_env: Ray runtime environment for the workers (``{"pip": ["magpie-hf[ray]"]}``).
        init_kwargs: other ``ray.init`` arguments (``num_cpus=`` for a local cluster, ...).
        max_restarts: restarts of a crashed actor before the stage fails.
        max_task_retries: retries of a task whose actor crashed before the stage fails.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        default: RayStageResources = RayStageResources(),
        stages: Mapping[str, RayStageResources] | None = None,
        runtime_env: dict[str, Any] | None = None,
        init_kwargs: dict[str, Any] | None = None,
        max_restarts: int = 2,
        max_task_retries: int = 2,
    ) -> None:
        if max_restarts < 0 or max_task_retries < 0:
            raise ValueError("max_restarts and max_task_retries must be >= 0 (bounded).")
        self.address = address
        self.default = default
        self.stages = dict(stages or {})
        self.runtime_env = runtime_env
        self.init_kwargs = dict(init_kwargs or {})
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries

    # -- cluster -------------------------------------------------------------------------------
    def start(self) -> None:
        ray = _import_ray()
        if ray.is_initialized():
            return
        runtime_env = copy.deepcopy(self.runtime_env) or {}
        env_vars = runtime_env.setdefault("env_vars", {})
        for key in FORWARDED_ENV:
            if key in os.environ:
                env_vars.setdefault(key, os.environ[key])
        logger.info("connecting to Ray (%s)", self.address or "RAY_ADDRESS or a new local cluster")
        ray.init(address=self.address, runtime_env=runtime_env, **{"include_dashboard": False, **self.init_kwargs})

    def hardware(self) -> Hardware:
        """The cluster's: CUDA when it has GPUs; vllm when the driver has it (workers share the environment)."""
        ray = _import_ray()
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        return dataclasses.replace(Hardware.local(), cuda=gpus > 0)

    def check_stage_names(self, names: Sequence[str]) -> None:
        """Refuse overrides for steps that are not in the pipeline."""
        unknown = sorted(set(self.stages) - set(names))
        if unknown:
            raise ValueError(f"Ray stage resources name steps {unknown} that are not in the pipeline (steps: {list(names)}).")

    # -- a stage -------------------------------------------------------------------------------
    def actor_resources(self, step: "Step") -> Resources:
        """What each actor of ``step``'s stage reserves: the step's declaration on the cluster's
        hardware, overridden by the stage's :class:`RayStageResources`."""
        declared = step.resources(self.hardware())
        chosen = self.stages.get(step.name or "", self.default)
        return Resources(
            gpus=declared.gpus if chosen.num_gpus is None else chosen.num_gpus,
            cpus=declared.cpus if chosen.num_cpus is None else chosen.num_cpus,
        )

    def pool_size(self, step: "Step", pending: int) -> int:
        """Actors for ``pending`` shard tasks: the override, or as many as the cluster fits."""
        ray = _import_ray()
        chosen = self.stages.get(step.name or "", self.default)
        if chosen.replicas is not None:
            return max(1, min(chosen.replicas, pending))
        needs = self.actor_resources(step)
        total = ray.cluster_resources()
        fits = [pending]
        if needs.cpus:
            fits.append(int(total.get("CPU", 0) // needs.cpus))
        if needs.gpus:
            fits.append(int(total.get("GPU", 0) // needs.gpus))
        return max(1, min(fits))

    def map_batches_kwargs(self, step: "Step", layout: RunLayout, pending: int) -> dict[str, Any]:
        """The arguments of the stage's ``Dataset.map_batches`` call (resources, pool, retries)."""
        ray = _import_ray()
        needs = self.actor_resources(step)
        chosen = self.stages.get(step.name or "", self.default)
        kwargs: dict[str, Any] = {
            "batch_size": 1,
            # one shard at a time per actor, so a slow-to-load actor never queues work a free one could do
            "compute": ray.data.ActorPoolStrategy(size=self.pool_size(step, pending), max_tasks_in_flight_per_actor=1),
            "fn_constructor_kwargs": {"step": step, "root": str(layout.root)},
            "num_cpus": needs.cpus,
            "max_restarts": self.max_restarts,
            "max_task_retries": self.max_task_retries,
        }
        if needs.gpus:
            kwargs["num_gpus"] = needs.gpus
        if chosen.memory:
            kwargs["memory"] = chosen.memory
        return kwargs

    def run_stage(
        self, step: "Step", tasks: Sequence[ShardTask], layout: RunLayout, progress: "StageProgress"
    ) -> list[ShardReport]:
        _check_shippable(step)
        ray = _import_ray()
        kwargs = self.map_batches_kwargs(step, layout, len(tasks))
        ray.data.DataContext.get_current().enable_progress_bars = False  # our bar counts rows and tokens
        logger.info(
            "stage %s: %d shard(s) on %d actor(s), %s CPU / %s GPU each",
            step.name, len(tasks), kwargs["compute"].max_size, kwargs["num_cpus"], kwargs.get("num_gpus", 0),
        )
        items = [task.to_dict() for task in tasks]
        with warnings.catch_warnings():
            # Ray 2.60 takes max_restarts/max_task_retries only through **ray_remote_args, which it marks
            # deprecated (removal announced for 2.64: ray/data/dataset.py, map_batches and
            # _warn_on_ray_remote_args); hence the `ray[data]<2.64` cap in pyproject.toml
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(ShardActor, **kwargs)
        reports: dict[int, ShardReport] = {}
        try:
            for row in dataset.iter_rows():
                if row["error"] is not None:
                    raise _worker_error(step, int(row["shard"]), bytes(row["error"]), str(row["traceback"]))
                report = ShardReport.from_dict(json.loads(row["report"]))
                reports[int(row["shard"])] = report
                progress.batch_done(report.rows_in, report.tokens)
        except StageFailedError:
            raise
        except ray.exceptions.RayError as err:
            raise StageFailedError(f"Stage {step.name!r} failed on Ray: {err}") from err
        return [reports[task.shard] for task in tasks]


class ShardActor:
    """A Ray Data actor: one copy of a step, loaded once, that runs shard tasks.

    ``__call__`` takes a batch of task dicts and returns, per task, its shard index and either its
    report (JSON) or the error the step raised (pickled, with its traceback).
    """

    def __init__(self, step: "Step", root: str) -> None:
        self.step, self.layout = step, RunLayout(root)
        self.load_error: BaseException | None = None
        try:
            step.load()
        except Exception as err:  # reported with the first task, as the worker's own error
            self.load_error = err
            self.load_traceback = traceback.format_exc()

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "report": [], "error": [], "traceback": []}
        for i in range(len(batch["shard"])):
            task = ShardTask.from_dict({key: _plain(values[i]) for key, values in batch.items()})
            report = error = trace = None
            if self.load_error is not None:
                error, trace = _pickled(self.load_error), self.load_traceback
            else:
                try:
                    report = json.dumps(run_shard(self.step, task, self.layout).to_dict())
                except Exception as err:
                    error, trace = _pickled(err), traceback.format_exc()
            out["shard"].append(task.shard)
            out["report"].append(report)
            out["error"].append(error)
            out["traceback"].append(trace)
        return out

    def __del__(self) -> None:
        try:
            self.step.unload()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _check_shippable(step: "Step") -> None:
    """Each actor loads its own model: a step must carry an engine config, not a loaded engine."""
    from magpie_hf.engines import Engine

    for field in dataclasses.fields(step):  # type: ignore[arg-type]
        if isinstance(getattr(step, field.name), Engine):
            raise ValueError(
                f"Step {step.name!r} holds a loaded engine in {field.name!r}; on Ray each actor loads its own "
                "replica, so pass an EngineConfig instead (for example EngineConfig.embedded())."
            )


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError("The Ray executor needs Ray Data: pip install 'magpie-hf[ray]'  (or 'ray[data]>=2.40,<2.64')") from err
    return ray


def _plain(value: Any) -> Any:
    """A numpy scalar from a Ray batch as a plain Python value."""
    return value.item() if hasattr(value, "item") else value


def _pickled(err: BaseException) -> bytes:
    try:
        return pickle.dumps(err)
    except Exception:  # noqa: BLE001 - an exception that does not pickle
        return pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))


def _worker_error(step: "Step", shard: int, pickled: bytes, trace: str) -> StageFailedError:
    original = pickle.loads(pickled)
    error = StageFailedError(
        f"Stage {step.name!r} failed on a Ray worker (shard {shard}): {type(original).__name__}: {original}\n"
        f"Worker traceback:\n{trace}"
    )
    error.__cause__ = original
    return error
