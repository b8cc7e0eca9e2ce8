"""The Ray executor: the same shards as the local executor on a small local Ray cluster, the
resources each actor reserves, absolute paths, and a worker's own error."""

from __future__ import annotations

import dataclasses

import pytest

ray = pytest.importorskip("ray")

from magpie_hf.engines import EngineConfig  # noqa: E402
from magpie_hf.executors import StageFailedError  # noqa: E402
from magpie_hf.executors.ray import RayExecutor, RayStageResources  # noqa: E402
from magpie_hf.hardware import Hardware, Resources  # noqa: E402
from magpie_hf.layout import RunLayout  # noqa: E402
from magpie_hf.pipeline import Pipeline  # noqa: E402
from magpie_hf.config import RayArguments  # noqa: E402
from magpie_hf.steps import GeneratorStep, MagpieInstructions, Responses, Step  # noqa: E402
from magpie_hf.steps.base import STRING  # noqa: E402
from magpie_hf.steps.filters import Condition, Filter  # noqa: E402
from magpie_hf.steps.language import Language  # noqa: E402


def _steps():
    engine = EngineConfig.embedded()
    # sampled instructions (temperature 1.0) so that the per-row seeds are put to the test
    return (
        MagpieInstructions(engine=engine, num_rows=4, max_tokens=16, drop_truncated=False)
        >> Language(languages=("en", "de", "fr", "zh"))
        >> Filter(conditions=[Condition("instruction_num_tokens", ">", 0)], keep_longest=3, length_column="instruction")
    )


@dataclasses.dataclass(kw_only=True)
class Letters(GeneratorStep):
    def output_features(self):
        return {"conversation_id": STRING, "instruction": STRING}

    def generate(self, *, offset, num_rows, seed):
        ids = [f"row-{offset + i}" for i in range(num_rows)]
        return {"conversation_id": ids, "instruction": [f"text {i}" for i in ids]}


@dataclasses.dataclass(kw_only=True)
class GpuProbe(Step):
    """Declares one GPU and writes the GPU ids Ray gave the worker that ran it."""

    inputs = ("instruction",)

    def output_features(self):
        return {"gpu_ids": STRING}

    def resources(self, hardware=None):
        return Resources(gpus=1)

    def process(self, batch, *, seed):
        return {**batch, "gpu_ids": [str(ray.get_gpu_ids())] * len(batch["instruction"])}


@dataclasses.dataclass(kw_only=True)
class Broken(Step):
    inputs = ("instruction",)

    def process(self, batch, *, seed):
        raise ValueError(f"cannot handle {batch['instruction'][0]!r}")


@pytest.fixture(scope="module")
def ray_cluster():
    import os
    from pathlib import Path

    # the workers unpickle this module's steps: let them import it
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # two logical GPUs: Ray accounts for them (and sets CUDA_VISIBLE_DEVICES) without real ones
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_rows_equal_local_and_resume_per_shard(ray_cluster, embedded_engine, tmp_path):
    ray_dir = tmp_path / "ray"
    executor = RayExecutor(default=RayStageResources(replicas=2))
    ray_rows = Pipeline(_steps(), ray_dir, shard_size=2, progress=False).run(executor=executor).to_list()
    local_rows = Pipeline(_steps(), tmp_path / "local", shard_size=2, progress=False).run().to_list()

    assert len(ray_rows) == 3
    assert [r["conversation_id"] for r in ray_rows] == [r["conversation_id"] for r in local_rows]
    assert [r["instruction"] for r in ray_rows] == [r["instruction"] for r in local_rows]
    assert ray_rows == local_rows
    assert all(r["language"] for r in ray_rows)
    for stage in ("00-magpie_instructions", "01-language", "02-filter"):
        assert (ray_dir / "stages" / stage / "_stage.json").exists()
    layout = RunLayout(ray_dir)
    assert layout.verified_record(ray_dir / "stages" / "01-language" / "shard-00001.parquet")["report"]["rows_in"] == 2

    # lose one shard of the language stage: only it is redone
    language = ray_dir / "stages" / "01-language"
    kept = language / "shard-00000.parquet"
    kept_mtime = kept.stat().st_mtime_ns
    generated_mtime = (ray_dir / "stages" / "00-magpie_instructions" / "shard-00000.parquet").stat().st_mtime_ns
    (language / "shard-00001.parquet").unlink()
    pipeline = Pipeline(_steps(), ray_dir, shard_size=2, progress=False)
    assert pipeline.run(executor=executor).to_list() == local_rows
    assert kept.stat().st_mtime_ns == kept_mtime
    assert (ray_dir / "stages" / "00-magpie_instructions" / "shard-00000.parquet").stat().st_mtime_ns == generated_mtime
    assert (language / "shard-00001.parquet").exists()
    assert [s["rows_out"] for s in pipeline.manifest()["stages"]] == [4, 4, 3]


def test_relative_output_dir_from_another_working_directory(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = Pipeline(Letters(num_rows=6) >> GpuProbe(), "runs/relative", shard_size=2, progress=False).run(
        executor=RayExecutor()
    )
    assert len(rows) == 6
    assert len(list((tmp_path / "runs" / "relative" / "stages" / "01-gpu_probe").glob("shard-*.parquet"))) == 3


def test_a_gpu_step_gets_its_gpu_from_ray(ray_cluster, tmp_path):
    executor = RayExecutor()
    step = GpuProbe()
    assert executor.actor_resources(step) == Resources(gpus=1, cpus=1.0)
    rows = Pipeline(Letters(num_rows=4) >> step, tmp_path, shard_size=1, progress=False).run(executor=executor)
    # every shard ran on an actor that Ray gave exactly one GPU
    assert all(len(eval(ids)) == 1 for ids in rows["gpu_ids"])


def test_resource_requests_follow_what_steps_declare(ray_cluster, tmp_path):
    executor = RayExecutor(stages={"language": RayStageResources(num_cpus=2)})
    layout = RunLayout(tmp_path)
    assert executor.hardware().cuda  # the cluster has (logical) GPUs
    vllm = Responses(engine=EngineConfig("meta-llama/Meta-Llama-3-70B-Instruct", backend="vllm", tensor_parallel_size=2))
    kwargs = executor.map_batches_kwargs(vllm, layout, pending=8)
    assert kwargs["num_gpus"] == 2 and kwargs["compute"].max_size == 1  # 2 GPUs in the cluster / 2 per actor
    assert kwargs["max_restarts"] == 2 and kwargs["max_task_retries"] == 2  # bounded (Ray Data's default: -1)
    served = Responses(engine=EngineConfig("m", backend="openai", base_url="http://127.0.0.1:8000/v1"))
    assert "num_gpus" not in executor.map_batches_kwargs(served, layout, pending=8)
    # auto on a GPU cluster without vllm: transformers on CUDA, one GPU
    assert Responses(engine=EngineConfig("m")).resources(Hardware(cuda=True, vllm=False)) == Resources(gpus=1)
    assert Responses(engine=EngineConfig("m")).resources(Hardware(cuda=True, vllm=True)) == Resources(gpus=1)
    assert executor.map_batches_kwargs(Language(), layout, pending=8)["num_cpus"] == 2


def test_a_worker_error_stops_the_stage_with_that_error(ray_cluster, tmp_path):
    with pytest.raises(StageFailedError, match="ValueError: cannot handle 'text row-0'") as caught:
        Pipeline(Letters(num_rows=2) >> Broken(), tmp_path, progress=False).run(executor=RayExecutor())
    assert isinstance(caught.value.__cause__, ValueError)
    assert "Worker traceback" in str(caught.value)


def test_ray_refuses_a_loaded_engine(ray_cluster, embedded_engine, tmp_path):
    with pytest.raises(ValueError, match="pass an EngineConfig"):
        Pipeline([MagpieInstructions(engine=embedded_engine, num_rows=2)], tmp_path, progress=False).run(
            executor=RayExecutor()
        )


def test_resources_name_known_steps(tmp_path):
    executor = RayExecutor(stages={"responses": RayStageResources(replicas=2)})
    with pytest.raises(ValueError, match="not in the pipeline"):
        Pipeline([Letters(num_rows=2)], tmp_path, progress=False).run(executor=executor)
    with pytest.raises(ValueError, match="replicas"):
        RayStageResources(replicas=0)
    with pytest.raises(ValueError, match="bounded"):
        RayExecutor(max_restarts=-1)


def test_ray_arguments_build_the_executor():
    from magpie_hf.executors import LocalExecutor

    assert isinstance(RayArguments().executor(), LocalExecutor)
    executor = RayArguments(ray="local", ray_replicas=3, ray_stage=["language:replicas=1,num_cpus=2"]).executor()
    assert isinstance(executor, RayExecutor) and executor.address is None
    assert executor.default == RayStageResources(replicas=3)
    assert executor.stages["language"] == RayStageResources(replicas=1, num_cpus=2.0)
    assert RayArguments(ray="ray://head:10001").executor().address == "ray://head:10001"
    with pytest.raises(ValueError, match="unknown key 'gpus'"):
        RayArguments(ray="local", ray_stage=["language:gpus=1"]).executor()
