"""distilabel-style steps: typed config, declared columns and hardware, ``load``/``unload``, batch in, batch out.

A *batch* is a dict of equal-length column lists, the shape ``datasets.map(batched=True)`` and
``ray.data.map_batches`` use. Three kinds of step:

- :class:`GeneratorStep` makes rows from nothing (Magpie step 1);
- :class:`Step` turns a batch into a batch (it may drop rows, and counts them in ``stats``);
- :class:`GlobalStep` sees a whole stage at once as a memory-mapped ``datasets.Dataset``.

Every step declares, from its configuration:

- ``inputs``: the columns it reads (the runner checks them once, with one message);
- :meth:`Step.output_features`: the columns it writes and their Arrow types, so a published
  dataset never has an untyped (``null``) column, even when every value of a shard is null;
  ``outputs`` is their names;
- :meth:`Step.resources`: the GPUs and CPUs one worker running it needs (a vLLM engine with tensor
  parallelism ``N`` needs ``N`` GPUs, a model on CUDA one), which executors reserve.

Steps never run themselves: :func:`magpie_hf.executors.runner.run_shard` calls :meth:`GeneratorStep.generate`
or :meth:`Step.process` and writes the shard; executors decide where. Steps compose with ``>>``
into a :class:`StepChain` that :class:`magpie_hf.pipeline.Pipeline` runs.

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass(kw_only=True)
    ... class Shout(Step):
    ...     inputs = ("instruction",)
    ...     def output_features(self):
    ...         return {"shout": STRING}
    ...     def process(self, batch, *, seed):
    ...         return {**batch, "shout": [t.upper() for t in batch["instruction"]]}
    >>> step = Shout()
    >>> step.name, step.outputs, step.resources()
    ('shout', ('shout',), Resources(gpus=0, cpus=1.0))
    >>> step.process({"instruction": ["hi"]}, seed=0)["shout"]
    ['HI']
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import pyarrow as pa

from magpie_hf.errors import MissingColumnsError
from magpie_hf.hardware import Hardware, Resources
from magpie_hf.utils.serialization import jsonable

if TYPE_CHECKING:
    import datasets

    from magpie_hf.engines import Engine, EngineConfig

Batch = dict[str, list[Any]]
#: the columns a step writes and their Arrow types
Features = dict[str, pa.DataType]
#: ``progress(num_finished, num_new_tokens)``: how engines and steps report work as it happens
ProgressCallback = Callable[[int, int], None]

# column types the steps share
STRING = pa.string()
INT = pa.int64()
FLOAT = pa.float64()
BOOL = pa.bool_()
STRINGS = pa.list_(pa.string())
FLOATS = pa.list_(pa.float64())
#: a conversation: ``[{role, content}, ...]``
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def struct(**fields: pa.DataType) -> pa.StructType:
    """An Arrow struct type from keyword fields, e.g. ``struct(temperature=FLOAT, seed=INT)``."""
    return pa.struct(list(fields.items()))


def batch_len(batch: Batch) -> int:
    """Number of rows in a batch (0 for an empty dict)."""
    return len(next(iter(batch.values()))) if batch else 0


def select_rows(batch: Batch, keep: Iterable[bool]) -> Batch:
    """Keep the rows of ``batch`` where ``keep`` is true.

    Example:
        >>> select_rows({"a": [1, 2, 3], "b": ["x", "y", "z"]}, [True, False, True])
        {'a': [1, 3], 'b': ['x', 'z']}
    """
    mask = list(keep)
    return {k: [v for v, m in zip(col, mask) if m] for k, col in batch.items()}


@dataclasses.dataclass(kw_only=True)
class Step:
    """A batch-to-batch step. Subclasses set ``inputs``, implement :meth:`output_features` and
    :meth:`process`, and load models in :meth:`load`.

    Steps that run a model take ``engine``: an :class:`~magpie_hf.engines.EngineConfig`
    (loaded in :meth:`load`, shared with neighbouring stages that use the same config) or an
    already loaded :class:`~magpie_hf.engines.Engine` (used as is, never closed by the step).
    """

    #: columns the step reads (a property in steps whose column names are configurable)
    inputs: ClassVar[tuple[str, ...]] = ()

    name: str | None = None
    #: rows per call of :meth:`process`
    batch_size: int = 64

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.__dict__.get("outputs", property()), property):
            raise TypeError(
                f"{cls.__name__} sets `outputs`; declare the columns it writes with their types in "
                "output_features() instead (outputs is derived from it)."
            )

    def __post_init__(self) -> None:
        self.stats: collections.Counter[str] = collections.Counter()
        #: set by the runner while it runs the step; pass it to engines as ``progress=``
        self.progress_callback: ProgressCallback | None = None
        if self.name is None:
            self.name = _snake(type(self).__name__)

    # -- declarations --------------------------------------------------------------------------
    def output_features(self) -> Features:
        """The columns the step adds or overwrites, with their Arrow types (from its configuration)."""
        return {}

    @property
    def outputs(self) -> tuple[str, ...]:
        """Names of the columns the step writes."""
        return tuple(self.output_features())

    def resources(self, hardware: Hardware | None = None) -> Resources:
        """What one worker running this step needs on ``hardware`` (default: this machine): the
        largest need of the engines it loads; steps with other models override this."""
        from magpie_hf.engines import engine_resources

        needs = Resources()
        for config in self.engine_configs():
            needs = needs.merge(engine_resources(config, hardware))
        return needs

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        """Load heavy objects (models). Called once before the first batch."""

    def unload(self) -> None:
        """Drop references to heavy objects. Called after the stage."""

    def provenance(self) -> dict[str, Any]:
        """What the loaded step can say about how it makes rows, for the run's manifest and card
        (the derived pre-query template, stop strings, ...); JSON-able."""
        return {}

    def engine_configs(self) -> set["EngineConfig"]:
        """Engine configs this step loads, so the pipeline can keep them loaded across stages."""
        from magpie_hf.engines import Engine, EngineConfig

        configs = set()
        for value in vars(self).values():
            if isinstance(value, Engine):
                value = value.config
            if isinstance(value, EngineConfig):
                configs.add(value)
        return configs

    def config_record(self) -> dict[str, Any]:
        """The step's settings as JSON-friendly data, for manifests and dataset cards."""
        from magpie_hf.engines import Engine, EngineConfig

        record: dict[str, Any] = {"step": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Engine):
                value = value.config
            if isinstance(value, EngineConfig):
                value = value.describe()
            record[f.name] = jsonable(value)
        return record

    def check_inputs(self, columns: Iterable[str], *, source: str = "the previous stage did not produce") -> None:
        """Refuse to run on ``columns`` when they lack one of :attr:`inputs` (the runner's one check; the
        pipeline also makes it on the declared columns before anything runs, with ``source`` saying so).

        Example:
            >>> Step(name="judge").check_inputs(["instruction"])   # a Step reads nothing
        """
        available = list(columns)
        missing = [c for c in self.inputs if c not in available]
        if missing:
            hints = {c: difflib.get_close_matches(c, available, n=1) for c in missing}
            named = ", ".join(f"{c!r} (did you mean {h[0]!r}?)" if h else repr(c) for c, h in hints.items())
            raise MissingColumnsError(
                f"Step {self.name!r} needs columns [{named}] that {source} "
                f"(it has {sorted(available)}). Add the step that writes them earlier in the chain, or set "
                "the step's column names."
            )

    # -- work --------------------------------------------------------------------------------
    def process(self, batch: Batch, *, seed: int) -> Batch:
        """Turn ``batch`` into a new batch (same or fewer rows). ``seed`` is the seed of the
        batch's first row; row ``i`` owns :func:`magpie_hf.seeds.row_seed` ``(seed, i)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement process()")

    def __rshift__(self, other: "Step | StepChain") -> "StepChain":
        return StepChain([self]) >> other


@dataclasses.dataclass(kw_only=True)
class GeneratorStep(Step):
    """Makes rows from nothing. The pipeline asks for rows ``[offset, offset + num_rows)`` per shard."""

    num_rows: int = 1000

    def generate(self, *, offset: int, num_rows: int, seed: int) -> Batch:
        """Return up to ``num_rows`` rows for row indices starting at ``offset`` (rows may be dropped).
        ``seed`` is the seed of row ``offset``; row ``offset + i`` owns
        :func:`magpie_hf.seeds.row_seed` ``(seed, i)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement generate()")


@dataclasses.dataclass(kw_only=True)
class GlobalStep(Step):
    """Sees the whole stage at once (neighbours, filters, pairing)."""

    def process_dataset(self, dataset: "datasets.Dataset", *, seed: int) -> "datasets.Dataset":
        """Return the new stage as a dataset (may be a different length)."""
        raise NotImplementedError(f"{type(self).__name__} must implement process_dataset()")


class StepChain(list):
    """An ordered list of steps; ``a >> b >> c`` builds one."""

    def __rshift__(self, other: "Step | StepChain") -> "StepChain":
        return StepChain([*self, *(other if isinstance(other, StepChain) else [other])])


def resolve_engine(engine: "Engine | EngineConfig") -> "Engine":
    """A loaded engine for ``engine`` (loading a config through the shared cache)."""
    from magpie_hf.engines import Engine, load_engine

    return engine if isinstance(engine, Engine) else load_engine(engine)


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))
