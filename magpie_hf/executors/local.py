"""Run a stage's shards one after another in this process (the default executor).

The step is loaded once per stage, here; engines stay loaded into the next stage when it uses
the same engine config (the pipeline frees the others between stages).

Example:
    >>> from magpie_hf.executors import LocalExecutor
    >>> from magpie_hf.pipeline import Pipeline
    >>> Pipeline(steps, "runs/demo").run(executor=LocalExecutor())   # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from magpie_hf.executors.base import Executor
from magpie_hf.executors.runner import run_shard

if TYPE_CHECKING:
    from magpie_hf.executors.layout import RunLayout
    from magpie_hf.executors.progress import StageProgress
    from magpie_hf.executors.runner import ShardReport, ShardTask
    from magpie_hf.steps.base import Step


class LocalExecutor(Executor):
    """Shards in order, in this process."""

    def run_stage(
        self, step: "Step", tasks: Sequence["ShardTask"], layout: "RunLayout", progress: "StageProgress"
    ) -> list["ShardReport"]:
        step.load()
        try:
            return [run_shard(step, task, layout, progress) for task in tasks]
        finally:
            step.unload()
