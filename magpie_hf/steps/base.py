"""distilabel-style steps: typed config, declared columns, ``load``/``unload``, batch in, batch out.

A *batch* is a dict of equal-length column lists, the shape ``datasets.map(batched=True)`` and
``ray.data.map_batches`` use. Three kinds of step:

- :class:`GeneratorStep` makes rows from nothing (Magpie step 1);
- :class:`Step` turns a batch into a batch (it may drop rows, and counts them in ``stats``);
- :class:`GlobalStep` sees a whole stage at once as a memory-mapped ``datasets.Dataset``.

Steps compose with ``>>`` into a :class:`StepChain` that :class:`magpie_hf.pipeline.Pipeline` runs.

Example:
    >>> from magpie_hf.steps import MagpieInstructions, Responses
    >>> chain = MagpieInstructions(num_rows=10) >> Responses()   # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

if TYPE_CHECKING:
    import datasets

    from magpie_hf.engines import Engine, EngineConfig

Batch = dict[str, list[Any]]


def batch_len(batch: Batch) -> int:
    """Number of rows in a batch (0 for an empty dict)."""
    return len(next(iter(batch.values()))) if batch else 0


def select_rows(batch: Batch, keep: Iterable[bool]) -> Batch:
    """Keep the rows of ``batch`` where ``keep`` is true."""
    mask = list(keep)
    return {k: [v for v, m in zip(col, mask) if m] for k, col in batch.items()}


@dataclasses.dataclass(kw_only=True)
class Step:
    """A batch-to-batch step. Subclasses set ``inputs``/``outputs`` and implement :meth:`process`.

    Steps that run a model take ``engine``: an :class:`~magpie_hf.engines.EngineConfig`
    (loaded in :meth:`load`, shared with neighbouring stages that use the same config) or an
    already loaded :class:`~magpie_hf.engines.Engine` (used as is, never closed by the step).
    """

    #: columns the step reads
    inputs: ClassVar[tuple[str, ...]] = ()
    #: columns the step adds or overwrites
    outputs: ClassVar[tuple[str, ...]] = ()

    name: str | None = None
    #: rows per call of :meth:`process`
    batch_size: int = 64

    def __post_init__(self) -> None:
        self.stats: collections.Counter[str] = collections.Counter()
        #: set by the pipeline; engines call it as ``progress(num_finished, num_new_tokens)``
        self.progress_callback: Callable[[int, int], None] | None = None
        if self.name is None:
            self.name = _snake(type(self).__name__)

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        """Load heavy objects (models). Called once before the first batch."""

    def unload(self) -> None:
        """Drop references to heavy objects. Called after the stage."""

    def engine_configs(self) -> set["EngineConfig"]:
        """Engine configs this step loads, so the pipeline can keep them loaded across stages."""
        from magpie_hf.engines import EngineConfig

        return {v for v in vars(self).values() if isinstance(v, EngineConfig)}

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
            record[f.name] = _jsonable(value)
        return record

    # -- work --------------------------------------------------------------------------------
    def process(self, batch: Batch, *, seed: int) -> Batch:
        """Turn ``batch`` into a new batch (same or fewer rows). ``seed`` is per shard."""
        raise NotImplementedError(f"{type(self).__name__} must implement process()")

    def check_inputs(self, columns: Iterable[str]) -> None:
        missing = [c for c in self.inputs if c not in set(columns)]
        if missing:
            raise ValueError(
                f"Step {self.name!r} needs columns {missing} that the previous stage did not produce "
                f"(it has {sorted(columns)}). Add a step that writes them earlier in the chain."
            )

    def __rshift__(self, other: "Step | StepChain") -> "StepChain":
        return StepChain([self]) >> other


@dataclasses.dataclass(kw_only=True)
class GeneratorStep(Step):
    """Makes rows from nothing. The pipeline asks for rows ``[offset, offset + num_rows)`` per shard."""

    num_rows: int = 1000

    def generate(self, *, offset: int, num_rows: int, seed: int) -> Batch:
        """Return up to ``num_rows`` rows for row indices starting at ``offset`` (rows may be dropped)."""
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


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
