"""Run a stage's shards on a Ray cluster: Ray Data ``map_batches`` over a pool of actors.

Each actor holds one copy of the step and loads it once (one model replica per actor, on the GPUs
the actor reserved); it then runs :func:`magpie_hf.executors.runner.run_shard` for each shard task it is
given, exactly as the local executor does, and returns the shard's report. The driver never loads
the step. Global steps (neighbours, filters, pairing) run on the driver (see
:class:`magpie_hf.pipeline.Pipeline`).

- **Resources**: each actor reserves what the step declares (:meth:`~magpie_hf.steps.Step.resources`,
  judged on the cluster's hardware: a vLLM engine with tensor parallelism ``N`` gets ``N`` GPUs, a
  reward model or a transformers engine on CUDA one, a server-backed engine none), unless a
  :class:`RayStageResources` overrides it. The pool has as many actors as the cluster fits (never
  more than the shards left).
- **One backend decision**: the driver resolves every ``auto`` engine once, on the cluster's hardware
  (:meth:`RayExecutor.hardware`), and the actors receive the resolved config, so the GPUs an actor
  reserves and the backend it loads always agree; a worker without the chosen backend's package fails
  at load with one error that says so (:func:`magpie_hf.engines.load_engine`).
- **Fits, or fails in bounded time**: before the first stage, a step whose actor needs more GPUs or CPUs
  than the largest node has (``ray.nodes()``) is refused (vLLM's tensor parallelism inside an actor is
  single-node); an actor pool that cannot be started within ``startup_timeout_s`` (Ray Data waits forever
  by default: ``DataContext.wait_for_min_actors_s`` is -1, ``ray/data/context.py:374``, and only a
  positive value bounds ``ActorPoolMapOperator.start``, ``actor_pool_map_operator.py:305-325``, Ray 2.60)
  stops the stage with an error that names what could not be scheduled. The step loads in the actor's
  first call, not its constructor, so the time limit covers scheduling, not model loading.
- **Paths**: tasks carry absolute paths (the layout resolves them), so a worker whose working
  directory differs from the driver's writes to the right place. On several machines the output
  directory must be shared storage mounted at the same path: the pipeline verifies every shard a
  worker reports written on the driver and stops the stage, naming the shards and the nodes, when it
  cannot read them (:meth:`magpie_hf.pipeline.Pipeline._verify_outputs`).
- **Environment**: the driver's offline switches, cache places and vLLM's batch-invariant switch
  (:data:`FORWARDED_ENV`) reach the actors as Ray ``runtime_env`` ``env_vars`` of the stage's actors
  (merged per variable with the job's ``runtime_env``: ``ray/runtime_env/runtime_env.py:640-651``). The
  driver's Hugging Face token (``huggingface_hub.get_token()``: ``HF_TOKEN`` or the login's token file), for
  gated models, does not: Ray's runtime-env agent logs every ``runtime_env`` it creates, ``env_vars``
  included, to ``runtime_env_agent.log``
  (``ray/_private/runtime_env/agent/runtime_env_agent.py:543-546``, Ray 2.60). It travels in the actors'
  constructor arguments instead (:class:`HiddenToken`, held in Ray's memory) and becomes the actor
  process's ``HF_TOKEN``; it is never written to a file, a log, the card or ``pipeline.json``.
- **Failures**: an error raised by a step inside an actor is sent back and stops the stage with
  :class:`~magpie_hf.executors.StageFailedError` carrying the worker's own error type, message and
  traceback as text (so a driver that cannot unpickle it, e.g. a vLLM error on a driver without vllm,
  still shows it) and, when it unpickles, the error itself as ``__cause__``. Application errors are not
  retried: they would fail again. An engine that died (vLLM's ``EngineDeadError``, "Raised when the
  EngineCore dies. Unrecoverable.", ``vllm/v1/engine/exceptions.py:10-11``; a CUDA or NCCL error:
  :func:`magpie_hf.engines.engine_died`) ends its actor's process, so that Ray restarts the actor and
  retries its task. A crashed actor process (OOM, segfault, a dead engine) is restarted at most
  ``max_restarts`` times and its lost task retried at most ``max_task_retries`` times (Ray Data's
  defaults are unbounded: ``ray/data/_internal/execution/operators/actor_pool_map_operator.py:632-648``,
  ``_apply_default_remote_args``, Ray 2.60).

Example:
    >>> from magpie_hf.executors.ray import RayExecutor, RayStageResources
    >>> executor = RayExecutor(address="auto", stages={"responses": RayStageResources(replicas=8)})
    >>> Pipeline(steps, "/shared/runs/pro").run(executor=executor)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import pickle
import socket
import traceback
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from magpie_hf.executors.base import Executor, StageFailedError
from magpie_hf.executors.layout import RunLayout
from magpie_hf.executors.runner import ShardReport, ShardTask, run_shard
from magpie_hf.hardware import Hardware, Resources

if TYPE_CHECKING:
    from magpie_hf.executors.progress import StageProgress
    from magpie_hf.steps.base import Step

logger = logging.getLogger(__name__)

#: environment variables the driver forwards to Ray workers (offline switches, cache places, vLLM's
#: batch-invariant mode); the Hub token travels separately (:meth:`RayExecutor.worker_env`)
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_DISABLE_TELEMETRY",
    "TOKENIZERS_PARALLELISM",
    "VLLM_BATCH_INVARIANT",
)
#: exit status of an actor process whose engine died (it ends itself so that Ray restarts it)
ENGINE_DIED_EXIT_CODE = 75


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
        startup_timeout_s: seconds a stage waits for its actors to be scheduled and started (model loading
            is not included) before it fails naming what could not be scheduled.
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
        startup_timeout_s: float = 600.0,
    ) -> None:
        if max_restarts < 0 or max_task_retries < 0:
            raise ValueError("max_restarts and max_task_retries must be >= 0 (bounded).")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0 (bounded), got {startup_timeout_s}")
        self.address = address
        self.default = default
        self.stages = dict(stages or {})
        self.runtime_env = runtime_env
        self.init_kwargs = dict(init_kwargs or {})
        self.max_restarts = max_restarts
        self.max_task_retries = max_task_retries
        self.startup_timeout_s = startup_timeout_s

    # -- cluster -------------------------------------------------------------------------------
    def start(self) -> None:
        ray = _import_ray()
        if ray.is_initialized():
            return
        logger.info("connecting to Ray (%s)", self.address or "RAY_ADDRESS or a new local cluster")
        ray.init(address=self.address, runtime_env=copy.deepcopy(self.runtime_env),
                 **{"include_dashboard": False, **self.init_kwargs})

    def hardware(self) -> Hardware:
        """The cluster's: CUDA when it has GPUs; vllm when the driver has it. This is the one place the
        ``auto`` backend is judged for a Ray run: actors receive configs resolved on it
        (:meth:`resolved_step`), so a worker never decides again."""
        ray = _import_ray()
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        return dataclasses.replace(Hardware.local(), cuda=gpus > 0)

    def worker_env(self) -> dict[str, str]:
        """The environment variables the stage's actors get through ``runtime_env`` (logged by Ray, so never a
        secret): :data:`FORWARDED_ENV` as the driver has them."""
        return {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}

    def check_steps(self, steps: Sequence["Step"]) -> None:
        """Refuse, before the first stage, a step whose actor cannot fit on any one node of the cluster.

        Raises:
            ValueError: naming the step, what one actor needs, what the largest node has, and the fix.
        """
        ray = _import_ray()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for step in steps:
            needs = self.actor_resources(step)
            if any(needs.gpus <= n.get("GPU", 0) and needs.cpus <= n.get("CPU", 0) for n in nodes):
                continue
            largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            tp = {c.tensor_parallel_size for c in self.resolved_step(step).engine_configs() if c.backend == "vllm"}
            hint = (f" vLLM's tensor_parallel_size {max(tp)} runs inside one actor, on one node: lower it to at most "
                    f"{int(largest.get('GPU', 0))} (--tensor_parallel_size), or add a node with {max(tp)} GPUs." if tp else
                    " Lower the stage's num_gpus/num_cpus (--ray_stage STEP:num_gpus=N,num_cpus=N), or add a larger node.")
            raise ValueError(
                f"Step {step.name!r}: each Ray actor needs {needs.gpus:g} GPU(s) and {needs.cpus:g} CPU(s) on one node, "
                f"but no node of the cluster has that (largest: {largest.get('GPU', 0):g} GPU(s), "
                f"{largest.get('CPU', 0):g} CPU(s); {len(nodes)} node(s) alive), so its actors could never start.{hint}"
            )

    def resolved_step(self, step: "Step") -> "Step":
        """``step`` with every ``auto`` engine config replaced by the backend chosen here, on the cluster's
        hardware: what the actors receive (the step itself is not changed)."""
        from magpie_hf.engines import EngineConfig, resolve_backend

        hardware = self.hardware()
        changes = {
            f.name: dataclasses.replace(value, backend=resolve_backend(value, hardware))
            for f in dataclasses.fields(step)  # type: ignore[arg-type]
            if isinstance(value := getattr(step, f.name), EngineConfig) and value.backend == "auto"
        }
        if not changes:
            return step
        shipped = copy.copy(step)
        for name, value in changes.items():
            setattr(shipped, name, value)
        return shipped

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
            "fn_constructor_kwargs": {"step": self.resolved_step(step), "root": str(layout.root), "token": _hub_token()},
            "num_cpus": needs.cpus,
            "max_restarts": self.max_restarts,
            "max_task_retries": self.max_task_retries,
        }
        if needs.gpus:
            kwargs["num_gpus"] = needs.gpus
        if chosen.memory:
            kwargs["memory"] = chosen.memory
        env = self.worker_env()
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
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
        reports: dict[int, ShardReport] = {}
        with _startup_limit(ray, self.startup_timeout_s):
            with warnings.catch_warnings():
                # Ray 2.60 takes max_restarts/max_task_retries/runtime_env only through **ray_remote_args, which
                # it marks deprecated (removal announced for 2.64: ray/data/dataset.py, map_batches and
                # _warn_on_ray_remote_args); hence the `ray[data]<2.64` cap in pyproject.toml
                warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
                dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(ShardActor, **kwargs)
            # closed explicitly: a for-loop left by an exception keeps Ray Data's executor (and the actors with
            # their GPUs) alive as long as the traceback lives (ray/data/iterator.py:160-171, Ray 2.60)
            rows = iter(dataset.iter_rows())
            try:
                for row in rows:
                    if row["error_type"] is not None:
                        raise _worker_error(step, row)
                    report = ShardReport.from_dict(json.loads(row["report"]))
                    reports[int(row["shard"])] = report
                    progress.batch_done(report.rows_in, report.tokens)
            except StageFailedError:
                raise
            except ray.exceptions.GetTimeoutError as err:
                raise StageFailedError(self._unschedulable(step, kwargs)) from err
            except ray.exceptions.RayError as err:
                raise StageFailedError(f"Stage {step.name!r} failed on Ray: {err}") from err
            finally:
                close = getattr(rows, "close", None)
                if close is not None:
                    close()
        return [reports[task.shard] for task in tasks]

    def _unschedulable(self, step: "Step", kwargs: Mapping[str, Any]) -> str:
        ray = _import_ray()
        free = [
            f"{n.get('NodeManagerAddress', '?')}: {n.get('Resources', {}).get('GPU', 0):g} GPU(s), "
            f"{n.get('Resources', {}).get('CPU', 0):g} CPU(s)"
            for n in ray.nodes() if n.get("Alive")
        ]
        return (
            f"Stage {step.name!r}: Ray could not start its {kwargs['compute'].min_size} actor(s), each needing "
            f"{kwargs.get('num_gpus', 0):g} GPU(s) and {kwargs['num_cpus']:g} CPU(s), within {self.startup_timeout_s:g} s "
            f"(nodes: {'; '.join(free) or 'none alive'}; now available in the cluster: {ray.available_resources()}). "
            "Other work may hold the resources, or a runtime_env is still installing: free them, ask for fewer actors "
            "(--ray_replicas / --ray_stage STEP:replicas=N) or fewer GPUs each, or raise startup_timeout_s (--ray_startup_timeout)."
        )


#: the columns a :class:`ShardActor` returns per task
_ERROR_COLUMNS = ("error", "error_type", "error_message", "traceback")


class ShardActor:
    """A Ray Data actor: one copy of a step, loaded once (in its first call), that runs shard tasks.

    ``__call__`` takes a batch of task dicts and returns, per task, its shard index, the node it ran on, and
    either its report (JSON) or the error the step raised: its type, message and traceback as text, and the
    error itself pickled. An engine that died ends the actor's process instead (:func:`_exit_if_engine_died`).
    """

    def __init__(self, step: "Step", root: str, token: "HiddenToken | None" = None) -> None:
        # nothing heavy here: Ray Data's start-up time limit waits for this constructor (see _startup_limit)
        if token is not None:
            os.environ["HF_TOKEN"] = token.value  # this actor process's own environment, for gated models
        self.step, self.layout = step, RunLayout(root)
        self.node = _node_name()
        self.loaded = False
        self.load_error: dict[str, Any] | None = None

    def _load(self) -> None:
        if self.loaded or self.load_error is not None:
            return
        try:
            self.step.load()
            self.loaded = True
        except Exception as err:  # reported with every task, as the worker's own error
            _exit_if_engine_died(err)
            self.load_error = _error_fields(err)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {key: [] for key in ("shard", "node", "report", *_ERROR_COLUMNS)}
        self._load()
        for i in range(len(batch["shard"])):
            task = ShardTask.from_dict({key: _plain(values[i]) for key, values in batch.items()})
            report, error = None, self.load_error or dict.fromkeys(_ERROR_COLUMNS)
            if self.load_error is None:
                try:
                    report = json.dumps(run_shard(self.step, task, self.layout, node=self.node).to_dict())
                except Exception as err:
                    _exit_if_engine_died(err)
                    error = _error_fields(err)
            out["shard"].append(task.shard)
            out["node"].append(self.node)
            out["report"].append(report)
            for key in _ERROR_COLUMNS:
                out[key].append(error[key])
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


def _error_fields(err: BaseException) -> dict[str, Any]:
    """``err`` as the text that always crosses to the driver (type, message, traceback) plus, when it
    pickles, the exception itself."""
    try:
        pickled: bytes | None = pickle.dumps(err)
    except Exception:  # noqa: BLE001 - an exception that does not pickle still crosses as text
        pickled = None
    return {
        "error": pickled,
        "error_type": f"{type(err).__module__}.{type(err).__qualname__}".removeprefix("builtins."),
        "error_message": str(err),
        "traceback": "".join(traceback.format_exception(err)),
    }


def _worker_error(step: "Step", row: Mapping[str, Any]) -> StageFailedError:
    """The stage's error from a task's error row: the worker's text always; its exception as ``__cause__``
    when it unpickles here (a vLLM error does not on a driver without vllm)."""
    original: BaseException | None = None
    if row["error"] is not None:
        try:
            original = pickle.loads(bytes(row["error"]))
        except Exception:  # noqa: BLE001 - its class is not importable here; the text says what it was
            original = None
    error = StageFailedError(
        f"Stage {step.name!r} failed on a Ray worker ({row['node']}, shard {int(row['shard'])}): "
        f"{row['error_type']}: {row['error_message']}\nWorker traceback:\n{row['traceback']}"
    )
    error.__cause__ = original
    return error


def _exit_if_engine_died(err: BaseException) -> None:
    """End this actor's process when ``err`` says its engine died, so that Ray restarts the actor (at most
    ``max_restarts`` times) and retries its task (at most ``max_task_retries`` times): a dead engine would
    fail every later task in this process, and an application error is never retried by Ray."""
    from magpie_hf.engines import engine_died

    if engine_died(err):
        logger.error("the engine died (%s: %s); ending this actor so that Ray restarts it", type(err).__name__, err)
        logging.shutdown()
        os._exit(ENGINE_DIED_EXIT_CODE)


def _node_name() -> str:
    """This worker's host, IP and Ray node id (shortened), for errors that must say where a shard was written."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()}, Ray node {node_id[:12]})"


class HiddenToken:
    """A Hub token on its way to the actors: its ``repr`` never shows it (in case Ray or a log prints the
    actor's arguments).

    Example:
        >>> HiddenToken("hf_secret")
        HiddenToken(<hidden>)
    """

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "HiddenToken(<hidden>)"


def _hub_token() -> HiddenToken | None:
    """The driver's Hub token (``huggingface_hub.get_token()``: ``HF_TOKEN``, else the token file of
    ``hf auth login``; ``huggingface_hub/utils/_auth.py:60-70``), or None."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    token = get_token()
    return HiddenToken(token) if token else None


@contextlib.contextmanager
def _startup_limit(ray: Any, seconds: float) -> Iterator[None]:
    """Bound the wait for a stage's actors: Ray Data's ``wait_for_min_actors_s`` (default -1: forever,
    ``ray/data/context.py:374``) makes ``ActorPoolMapOperator.start`` raise ``GetTimeoutError`` when the
    pool's actors are not ready in time (``actor_pool_map_operator.py:305-325``). Restored afterwards."""
    context = ray.data.DataContext.get_current()
    before = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = max(1, math.ceil(seconds))
    try:
        yield
    finally:
        context.wait_for_min_actors_s = before
