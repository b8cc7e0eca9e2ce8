"""Run any magpie_hf step inside a distilabel ``Pipeline``.

:func:`to_distilabel` wraps a magpie_hf step as the matching distilabel step:
:class:`~magpie_hf.steps.base.GeneratorStep` -> distilabel ``GeneratorStep``,
:class:`~magpie_hf.steps.base.Step` -> ``Step``, :class:`~magpie_hf.steps.base.GlobalStep` ->
``GlobalStep``. The wrapper declares the step's ``inputs``/``outputs`` columns, loads and unloads it
with the distilabel step, and converts distilabel's lists of row dicts to and from batches.

Seeds: row ``r`` of a generator step gets the seed :class:`~magpie_hf.pipeline.Pipeline` gives it
(:mod:`magpie_hf.seeds`: from the run seed, the stage index and the row), so its rows match the
local pipeline's whatever the batch size. Other steps get a seed derived from the content of each
batch (the same on every rerun and replica).

Caching: distilabel keys its cache on a signature of the serialized step. The wrapped step is
serialized as ``step_config`` (its :meth:`~magpie_hf.steps.base.Step.config_record` as JSON), so a
change of any setting invalidates the cache; the step object itself is excluded from the dump and
restored from the running pipeline when distilabel reloads its cached DAG.

Fork safety: distilabel runs each step in a forked process. libgomp, torch's CPU thread pool, is
not fork-safe, so a process that has already run a torch model on the CPU must not start a
distilabel pipeline that runs one too (the child hangs in its first matrix product). Run the
distilabel pipeline from a fresh process, as a script normally does.

Note: this module must not use ``from __future__ import annotations``: distilabel finds the input
parameter of ``process`` by its runtime ``StepInput`` annotation.

Example:
    >>> from distilabel.pipeline import Pipeline
    >>> from magpie_hf.distilabel import to_distilabel
    >>> from magpie_hf.engines import EngineConfig
    >>> from magpie_hf.steps import MagpieInstructions
    >>> from magpie_hf.steps.language import Language
    >>> with Pipeline(name="magpie") as pipeline:   # doctest: +SKIP
    ...     instructions = to_distilabel(MagpieInstructions(engine=EngineConfig.embedded(), num_rows=8, max_tokens=64))
    ...     language = to_distilabel(Language())
    ...     instructions >> language
    >>> distiset = pipeline.run(use_cache=False)   # doctest: +SKIP
"""

import hashlib
import json
import warnings
from typing import TYPE_CHECKING, Any, Dict, List

with warnings.catch_warnings():
    # distilabel 1.5.3 declares fields that pydantic >= 2.12 warns about on import; nothing to act on
    warnings.filterwarnings("ignore", message=r"The '.*' attribute with value .* was provided to the `Field\(\)` function")
    from distilabel.steps import GeneratorStep as _DistilabelGeneratorStep
    from distilabel.steps import GlobalStep as _DistilabelGlobalStep
    from distilabel.steps import Step as _DistilabelStep
    from distilabel.steps import StepInput
from pydantic import BaseModel, Field, model_validator

from magpie_hf.seeds import SEED_MODULUS, row_seed, stage_seed
from magpie_hf.steps import base

if TYPE_CHECKING:
    from distilabel.typing import GeneratorStepOutput, StepColumns, StepOutput

__all__ = ["MagpieDistilabelGeneratorStep", "MagpieDistilabelGlobalStep", "MagpieDistilabelStep", "to_distilabel"]


def rows_to_batch(rows: List[Dict[str, Any]]) -> base.Batch:
    """distilabel's list of row dicts as a batch of columns (a missing value becomes ``None``)."""
    columns: Dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in columns}


def batch_to_rows(batch: base.Batch) -> List[Dict[str, Any]]:
    """A batch of columns as distilabel's list of row dicts."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def content_seed(seed: int, stage_index: int, rows: List[Dict[str, Any]]) -> int:
    """A 31-bit seed for a batch, derived from its content, the run seed and the stage."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).digest()
    return (stage_seed(seed, stage_index) + int.from_bytes(digest[:4], "little")) % SEED_MODULUS


class _WrapsMagpieStep(BaseModel):
    """Fields and lifecycle shared by the three wrappers (mixed into distilabel's pydantic steps)."""

    #: the wrapped magpie_hf step; excluded from the dump (``step_config`` stands for it)
    step: Any = Field(default=None, exclude=True, description="The wrapped magpie_hf step.")
    #: the wrapped step's settings as JSON: part of the signature distilabel caches on
    step_config: str = Field(default="", description="Settings of the wrapped magpie_hf step (JSON).")
    seed: int = Field(default=0, description="Run seed; per-batch sampling seeds derive from it.")
    stage_index: int = Field(default=0, description="Stage number in the seed derivation (as in magpie_hf.pipeline).")

    @model_validator(mode="before")
    @classmethod
    def _from_step(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("step") is None:
            return data  # reloaded from distilabel's cache: the pipeline restores ``step``
        step = data["step"]
        if not isinstance(step, base.Step):
            raise TypeError(f"{cls.__name__} wraps a magpie_hf step, got {type(step).__name__}.")
        data.setdefault("name", step.name)
        data["step_config"] = json.dumps(step.config_record(), sort_keys=True)
        return data

    def _wrapped(self) -> base.Step:
        if self.step is None:
            raise ValueError(f"distilabel step {self.name!r} has no magpie_hf step; build it with to_distilabel(step).")
        return self.step

    @property
    def inputs(self) -> "StepColumns":
        return list(self._wrapped().inputs)

    @property
    def outputs(self) -> "StepColumns":
        return list(self._wrapped().outputs)

    def load(self) -> None:
        super().load()  # type: ignore[misc]
        self._wrapped().load()

    def unload(self) -> None:
        step = self._wrapped()
        step.unload()
        if step.stats:
            self._logger.info("magpie_hf step %s: %s", step.name, dict(step.stats))  # type: ignore[attr-defined]
        super().unload()  # type: ignore[misc]


class MagpieDistilabelGeneratorStep(_WrapsMagpieStep, _DistilabelGeneratorStep):
    """A magpie_hf :class:`~magpie_hf.steps.base.GeneratorStep` as a distilabel ``GeneratorStep``.

    It yields ``batch_size`` row indices at a time (default: the wrapped step's ``batch_size``)
    until the wrapped step's ``num_rows``; rows the step drops (empty or truncated) are not yielded.
    """

    @model_validator(mode="before")
    @classmethod
    def _default_batch_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("step"), base.GeneratorStep):
            data.setdefault("batch_size", data["step"].batch_size)
        return data

    def process(self, offset: int = 0) -> "GeneratorStepOutput":
        step = self._wrapped()
        assert isinstance(step, base.GeneratorStep)
        if offset >= step.num_rows:
            yield [], True
            return
        for start in range(offset, step.num_rows, self.batch_size):
            size = min(self.batch_size, step.num_rows - start)
            batch = step.generate(offset=start, num_rows=size, seed=row_seed(stage_seed(self.seed, self.stage_index), start))
            yield batch_to_rows(batch), start + size >= step.num_rows


class MagpieDistilabelStep(_WrapsMagpieStep, _DistilabelStep):
    """A magpie_hf :class:`~magpie_hf.steps.base.Step` as a distilabel ``Step``.

    ``input_batch_size`` defaults to the wrapped step's ``batch_size``. With several upstream
    steps, their rows are concatenated. Rows the step drops are not yielded.
    """

    @model_validator(mode="before")
    @classmethod
    def _default_batch_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("step"), base.Step):
            data.setdefault("input_batch_size", data["step"].batch_size)
        return data

    def process(self, *inputs: StepInput) -> "StepOutput":
        rows = [row for upstream in inputs for row in upstream]
        if not rows:
            yield []
            return
        step = self._wrapped()
        out = step.process(rows_to_batch(rows), seed=content_seed(self.seed, self.stage_index, rows))
        yield batch_to_rows(out)


class MagpieDistilabelGlobalStep(_WrapsMagpieStep, _DistilabelGlobalStep):
    """A magpie_hf :class:`~magpie_hf.steps.base.GlobalStep` as a distilabel ``GlobalStep``.

    distilabel hands it every upstream row at once; they become an in-memory ``datasets.Dataset``.
    """

    def process(self, *inputs: StepInput) -> "StepOutput":
        import datasets

        rows = [row for upstream in inputs for row in upstream]
        step = self._wrapped()
        assert isinstance(step, base.GlobalStep)
        dataset = datasets.Dataset.from_list(rows)
        if len(dataset):
            step.check_inputs(dataset.column_names)
        result = step.process_dataset(dataset, seed=stage_seed(self.seed, self.stage_index))
        yield result.to_list()


def to_distilabel(step: base.Step, **kwargs: Any) -> "MagpieDistilabelGeneratorStep | MagpieDistilabelStep | MagpieDistilabelGlobalStep":
    """Wrap ``step`` as the matching distilabel step; ``kwargs`` go to the distilabel step
    (``name``, ``seed``, ``stage_index``, ``batch_size``/``input_batch_size``, ``resources``, ``pipeline``, ...).

    Example:
        >>> from magpie_hf.steps.language import Language
        >>> to_distilabel(Language(), seed=1).outputs   # doctest: +SKIP
        ['language']
    """
    if isinstance(step, base.GeneratorStep):
        return MagpieDistilabelGeneratorStep(step=step, **kwargs)
    if isinstance(step, base.GlobalStep):
        return MagpieDistilabelGlobalStep(step=step, **kwargs)
    if isinstance(step, base.Step):
        return MagpieDistilabelStep(step=step, **kwargs)
    raise TypeError(f"to_distilabel wraps a magpie_hf step, got {type(step).__name__}.")
