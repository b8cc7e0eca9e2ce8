"""What an executor is: it maps a stage's pending shard tasks to workers.

An executor decides *where* shard tasks run and where a step's ``load()`` happens; the work of a
task is always :func:`magpie_hf.executors.runner.run_shard`. The pipeline asks it for the workers'
:class:`~magpie_hf.hardware.Hardware` (so ``auto`` engines and the GPUs a step declares are judged
where the step will run), then hands it one stage at a time.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Sequence

from magpie_hf.errors import StageFailedError as StageFailedError  # importable here, where it is raised
from magpie_hf.hardware import Hardware

if TYPE_CHECKING:
    from magpie_hf.executors.layout import RunLayout
    from magpie_hf.executors.progress import StageProgress
    from magpie_hf.executors.runner import ShardReport, ShardTask
    from magpie_hf.steps.base import Step


class Executor(abc.ABC):
    """Runs the shard tasks of one stage at a time."""

    def start(self) -> None:  # noqa: B027  (an optional hook)
        """Get ready to run (connect to a cluster); called once before the first stage."""

    def check_steps(self, steps: Sequence["Step"]) -> None:  # noqa: B027  (an optional hook)
        """Refuse, after :meth:`start` and before the first stage, steps the workers can never run (default:
        nothing to check)."""

    def hardware(self) -> Hardware:
        """What the workers have (default: this machine)."""
        return Hardware.local()

    @abc.abstractmethod
    def run_stage(
        self, step: "Step", tasks: Sequence["ShardTask"], layout: "RunLayout", progress: "StageProgress"
    ) -> list["ShardReport"]:
        """Run every task of ``tasks`` (all of one stage, ``step`` not loaded yet); return their
        reports in task order."""
