"""magpie_hf.ray: the same stages on a small local Ray cluster give the local pipeline's rows."""

from __future__ import annotations

import argparse
import json

import pytest

ray = pytest.importorskip("ray")

from magpie_hf.engines import EngineConfig  # noqa: E402
from magpie_hf.pipeline import Pipeline  # noqa: E402
from magpie_hf.ray import RayPipeline, RayResources, add_ray_args, pipeline_from_args  # noqa: E402
from magpie_hf.steps import MagpieInstructions  # noqa: E402
from magpie_hf.steps.filters import Condition, Filter  # noqa: E402
from magpie_hf.steps.language import Language  # noqa: E402


def _steps():
    engine = EngineConfig.embedded()
    # sampled instructions (temperature 1.0) so that the per-shard seeds are put to the test
    return (
        MagpieInstructions(engine=engine, num_rows=4, max_tokens=16, drop_truncated=False)
        >> Language(languages=("en", "de", "fr", "zh"))
        >> Filter(conditions=[Condition("instruction_num_tokens", ">", 0)], keep_longest=3, length_column="instruction")
    )


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_rows_equal_local_and_resume_per_shard(ray_cluster, embedded_engine, tmp_path):
    ray_dir = tmp_path / "ray"
    ray_rows = RayPipeline(_steps(), ray_dir, shard_size=2, resources=RayResources(replicas=2), progress=False).run().to_list()
    local_rows = Pipeline(_steps(), tmp_path / "local", shard_size=2, progress=False).run().to_list()

    assert len(ray_rows) == 3
    assert [r["conversation_id"] for r in ray_rows] == [r["conversation_id"] for r in local_rows]
    assert [r["instruction"] for r in ray_rows] == [r["instruction"] for r in local_rows]
    assert ray_rows == local_rows
    assert all(r["language"] for r in ray_rows)
    for stage in ("00-magpie_instructions", "01-language", "02-filter"):
        assert (ray_dir / "stages" / stage / "_stage.json").exists()
    assert json.loads((ray_dir / "stages" / "01-language" / "shard-00001.json").read_text())["rows_in"] == 2

    # lose one shard of the language stage (and the later stages): only it is redone
    language = ray_dir / "stages" / "01-language"
    kept = language / "shard-00000.parquet"
    kept_mtime = kept.stat().st_mtime_ns
    generated_mtime = (ray_dir / "stages" / "00-magpie_instructions" / "shard-00000.parquet").stat().st_mtime_ns
    (language / "shard-00001.parquet").unlink()
    (language / "_stage.json").unlink()
    (ray_dir / "stages" / "02-filter" / "_stage.json").unlink()
    pipeline = RayPipeline(_steps(), ray_dir, shard_size=2, resources=RayResources(replicas=2), progress=False)
    assert pipeline.run().to_list() == local_rows
    assert kept.stat().st_mtime_ns == kept_mtime
    assert (ray_dir / "stages" / "00-magpie_instructions" / "shard-00000.parquet").stat().st_mtime_ns == generated_mtime
    assert (language / "shard-00001.parquet").exists()
    assert [s["rows_out"] for s in pipeline.manifest()["stages"]] == [4, 4, 3]


def test_ray_refuses_a_loaded_engine(embedded_engine, tmp_path):
    with pytest.raises(ValueError, match="pass an EngineConfig"):
        RayPipeline([MagpieInstructions(engine=embedded_engine, num_rows=2)], tmp_path)


def test_resources_name_known_steps(tmp_path):
    with pytest.raises(ValueError, match="not in the pipeline"):
        RayPipeline([MagpieInstructions(engine=EngineConfig.embedded(), num_rows=2)], tmp_path,
                    resources={"responses": RayResources(replicas=2)})
    with pytest.raises(ValueError, match="replicas"):
        RayResources(replicas=0)


def test_pipeline_from_args():
    parser = argparse.ArgumentParser()
    add_ray_args(parser)
    steps = [MagpieInstructions(engine=EngineConfig.embedded(), num_rows=2), Language()]

    local = pipeline_from_args(parser.parse_args([]), steps, "out", 10, 0)
    assert type(local) is Pipeline

    args = parser.parse_args(["--ray", "--ray-replicas", "3", "--ray-stage", "language:replicas=1,num_cpus=2"])
    pipeline = pipeline_from_args(args, steps, "out", 10, 0)
    assert isinstance(pipeline, RayPipeline) and pipeline.address is None
    assert pipeline.stage_resources(steps[0]) == RayResources(replicas=3, num_cpus=1.0, num_gpus=0)
    assert pipeline.stage_resources(steps[1]) == RayResources(replicas=1, num_cpus=2.0, num_gpus=0)

    remote = pipeline_from_args(parser.parse_args(["--ray", "ray://head:10001"]), steps, "out", 10, 0)
    assert remote.address == "ray://head:10001"
    with pytest.raises(SystemExit):
        parser.parse_args(["--ray-stage", "language:gpus=1"])
    with pytest.raises(SystemExit, match="unknown steps"):
        pipeline_from_args(parser.parse_args(["--ray", "--ray-stage", "typo:replicas=1"]), steps, "out", 10, 0)
