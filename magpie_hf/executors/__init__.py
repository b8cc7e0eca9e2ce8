"""Executors: where a stage's shard tasks run.

- :class:`LocalExecutor` (default): in this process, one shard after another;
- :class:`~magpie_hf.executors.ray.RayExecutor`: on a Ray cluster, a pool of actors per stage,
  each with its own model replica on the GPUs the step declares (``pip install 'magpie-hf[ray]'``).

Both run every shard through :func:`magpie_hf.executors.runner.run_shard`.
"""

from __future__ import annotations

from typing import Any

from magpie_hf.executors.base import Executor, StageFailedError
from magpie_hf.executors.local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "RayStageResources", "StageFailedError"]


def __getattr__(name: str) -> Any:
    # the Ray executor imports ray lazily; importing its names here must not need ray
    if name in ("RayExecutor", "RayStageResources"):
        from magpie_hf.executors import ray as ray_executor

        return getattr(ray_executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
