"""The Ray executor on a small local Ray cluster: the same shards as the local executor, the resources
each actor reserves, absolute paths, a worker's own error (as text too), one backend decision, refusal
of actors no node fits, a bounded start-up, a dead engine's actor restarted, and the Hub token reaching
workers without being written anywhere. The two-node checks are in test_ray_cluster.py."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from magpie_hf.engines import EngineConfig  # noqa: E402
from magpie_hf.executors import StageFailedError  # noqa: E402
from magpie_hf.executors.layout import RunLayout  # noqa: E402
from magpie_hf.executors.ray import RayExecutor, RayStageResources  # noqa: E402
from magpie_hf.hardware import Hardware, Resources  # noqa: E402
from magpie_hf.pipeline import Pipeline  # noqa: E402
from magpie_hf.recipe.arguments import RayArguments  # noqa: E402
from magpie_hf.steps import GeneratorStep, MagpieInstructions, Responses, Step  # noqa: E402
from magpie_hf.steps.base import INT, STRING  # noqa: E402
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


@dataclasses.dataclass(kw_only=True)
class DiesOnce(Step):
    """Its engine dies the first time any worker runs it: a CUDA error, as torch raises it (the marker
    file, on storage every worker shares, holds the pid of the process it died in)."""

    inputs = ("instruction",)
    marker: str = ""

    def output_features(self):
        return {"pid": INT}

    def process(self, batch, *, seed):
        import torch

        marker = Path(self.marker)
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return {**batch, "pid": [os.getpid()] * len(batch["instruction"])}


@dataclasses.dataclass(kw_only=True)
class RaisesWorkerOnlyError(Step):
    """Raises an exception whose class only the worker can import (like a vLLM error on a driver without vllm)."""

    inputs = ("instruction",)
    module_dir: str = ""

    def process(self, batch, *, seed):
        sys.path.insert(0, self.module_dir)
        import worker_only_errors

        raise worker_only_errors.EngineSpecificError("the real cause, from the worker")


@dataclasses.dataclass(kw_only=True)
class TokenProbe(Step):
    """Writes a digest of the Hub token its worker sees (never the token)."""

    inputs = ("instruction",)

    def output_features(self):
        return {"token_sha256": STRING}

    def process(self, batch, *, seed):
        digest = hashlib.sha256(os.environ.get("HF_TOKEN", "").encode()).hexdigest()
        return {**batch, "token_sha256": [digest] * len(batch["instruction"])}


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
    assert RayArguments(ray="local", ray_startup_timeout=30).executor().startup_timeout_s == 30
    with pytest.raises(ValueError, match="unknown key 'gpus'"):
        RayArguments(ray="local", ray_stage=["language:gpus=1"]).executor()


def test_an_engine_that_dies_ends_its_actor_and_ray_retries_the_shard(ray_cluster, tmp_path):
    marker = tmp_path / "died"
    executor = RayExecutor(default=RayStageResources(replicas=1))
    rows = Pipeline(Letters(num_rows=2) >> DiesOnce(marker=str(marker)), tmp_path / "run", shard_size=1,
                    progress=False).run(executor=executor)
    assert rows["conversation_id"] == ["row-0", "row-1"]  # nothing lost
    died = int(marker.read_text())
    assert died not in rows["pid"]  # the shard was redone by a new actor process
    assert not Path(f"/proc/{died}").exists()  # the one whose engine died is gone
    # without restarts the same death stops the stage (bounded, never a hang)
    marker.unlink()
    with pytest.raises(StageFailedError, match="failed on Ray"):
        Pipeline(Letters(num_rows=2) >> DiesOnce(marker=str(marker)), tmp_path / "again", shard_size=1,
                 progress=False).run(executor=RayExecutor(default=RayStageResources(replicas=1), max_restarts=0,
                                                          max_task_retries=0))


def test_a_worker_error_crosses_as_text_when_the_driver_cannot_unpickle_it(ray_cluster, tmp_path):
    modules = tmp_path / "worker_only"
    modules.mkdir()
    (modules / "worker_only_errors.py").write_text("class EngineSpecificError(RuntimeError):\n    pass\n")
    step = RaisesWorkerOnlyError(module_dir=str(modules))
    with pytest.raises(StageFailedError) as caught:
        Pipeline(Letters(num_rows=1) >> step, tmp_path / "run", progress=False).run(executor=RayExecutor())
    message = str(caught.value)
    assert "worker_only_errors.EngineSpecificError: the real cause, from the worker" in message
    assert "Worker traceback" in message and 'raise worker_only_errors.EngineSpecificError' in message
    assert "Ray node" in message  # where it happened
    assert caught.value.__cause__ is None  # its class is not importable here; the text still says what it was
    assert "ModuleNotFoundError" not in message


def test_the_backend_is_resolved_once_on_the_driver(ray_cluster, tmp_path, monkeypatch):
    executor = RayExecutor()
    step = Responses(engine=EngineConfig("org/model"))  # auto
    shipped = executor.map_batches_kwargs(step, RunLayout(tmp_path), pending=2)["fn_constructor_kwargs"]["step"]
    # the cluster has (logical) GPUs, the driver no vllm: transformers, on the one GPU the actor reserves
    assert shipped.engine.backend == "transformers" and step.engine.backend == "auto"
    assert shipped.engine == dataclasses.replace(step.engine, backend="transformers")
    # a driver with vllm chooses vLLM for every actor; a worker without it fails at load, once, saying so
    monkeypatch.setattr(Hardware, "local", classmethod(lambda cls: Hardware(cuda=False, vllm=True)))
    assert executor.resolved_step(step).engine.backend == "vllm"
    assert executor.actor_resources(step) == Resources(gpus=1, cpus=1.0)
    with pytest.raises(StageFailedError, match="runs on vLLM, but vllm is not installed on this machine") as caught:
        Pipeline(Letters(num_rows=1) >> step, tmp_path / "run", progress=False).run(executor=executor)
    headline = str(caught.value).splitlines()[0]
    assert "ImportError: Engine 'org/model' runs on vLLM, but vllm is not installed" in headline
    assert "pip install 'magpie-hf[vllm]'" in headline


def test_tensor_parallel_larger_than_any_node_is_refused_before_anything_starts(ray_cluster, tmp_path):
    step = Responses(engine=EngineConfig("org/model", backend="vllm", tensor_parallel_size=4))
    with pytest.raises(ValueError, match=r"needs 4 GPU\(s\).*largest: 2 GPU\(s\).*tensor_parallel_size 4 .* at most 2"):
        Pipeline(Letters(num_rows=2) >> step, tmp_path, progress=False).run(executor=RayExecutor())
    assert not (tmp_path / "stages").exists()


def test_actors_that_cannot_be_scheduled_fail_in_bounded_time(ray_cluster, tmp_path):
    import datasets

    # 3 actors of 1 GPU each on a cluster of 2 GPUs: each fits a node, the pool never does
    executor = RayExecutor(stages={"gpu_probe": RayStageResources(replicas=3)}, startup_timeout_s=5)
    rows = datasets.Dataset.from_dict({"instruction": ["a", "b", "c"]})
    started = time.monotonic()
    with pytest.raises(StageFailedError, match=r"could not start its 3 actor\(s\), each needing 1 GPU\(s\).*within 5 s"):
        Pipeline([GpuProbe()], tmp_path, shard_size=1, input_dataset=rows, progress=False).run(executor=executor)
    assert time.monotonic() - started < 60


def test_the_hub_token_reaches_workers_and_is_written_nowhere(ray_cluster, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    token = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", token)
    rows = Pipeline(Letters(num_rows=2) >> TokenProbe(), tmp_path / "run", progress=False).run(executor=RayExecutor())
    assert set(rows["token_sha256"]) == {hashlib.sha256(token.encode()).hexdigest()}  # the workers had it
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaked = [p for folder in (tmp_path, session) for p in folder.rglob("*")
              if p.is_file() and not p.is_symlink() and token.encode() in p.read_bytes()]
    assert leaked == []  # not in the run's files (shards, pipeline.json, manifest) nor Ray's logs
    assert token not in caplog.text
