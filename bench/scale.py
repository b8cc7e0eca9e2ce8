"""One stage locally and on a local 2-actor Ray cluster: rows/s of each, and whether the rows agree.

    timeout 600 python bench/scale.py                       # 32 instructions, greedy Responses, max_tokens 64
    timeout 600 python bench/scale.py --rows 64 --actors 2 --shard-size 8

The stage is :class:`magpie_hf.steps.Responses` with the embedded SmolLM2-135M-Instruct (greedy) over
fixed instructions. ``local`` is :class:`magpie_hf.pipeline.Pipeline` in this process (torch uses every
core); ``ray`` is the same pipeline on :class:`magpie_hf.executors.ray.RayExecutor` over ``ray.init(num_cpus=ACTORS)`` with ``ACTORS``
single-CPU actors, each loading its own replica. Rows/s are end to end (``run()``, model loading
included; ``ray.init`` excluded) and, in brackets, over the shards' own processing seconds.
The last line reads ``local_rows_per_s=X ray_rows_per_s=Y same_ids=True same_text=True``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("Explain", "Give three tips about", "Write a haiku about", "List two facts about",
         "Describe", "What is the history of", "Summarize the idea of", "Ask a question about")
TOPICS = ("bread baking", "prime numbers", "the moon", "recycling", "jazz music", "rainbows", "chess", "volcanoes")


def instructions(rows: int):
    """``rows`` fixed instructions (8 tasks x 8 topics, cycled) with stable ids."""
    import datasets

    texts = [f"{task} {topic}." for task, topic in itertools.islice(itertools.cycle(itertools.product(TASKS, TOPICS)), rows)]
    return datasets.Dataset.from_dict({"conversation_id": [f"bench-{i:04d}" for i in range(rows)], "instruction": texts})


def run(pipeline, executor=None) -> tuple[list[dict], float, float]:
    started = time.perf_counter()
    rows = pipeline.run(executor=executor).to_list()
    wall = time.perf_counter() - started
    return rows, wall, pipeline.manifest()["stages"][-1]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=2, help="Ray actors (and CPUs of the local Ray cluster)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from magpie_hf.engines import EngineConfig
    from magpie_hf.executors.ray import RayExecutor, RayStageResources
    from magpie_hf.pipeline import Pipeline
    from magpie_hf.steps import Responses

    out = args.output_dir or Path(tempfile.mkdtemp(prefix="magpie-hf-scale-"))
    data = instructions(args.rows)

    def steps():
        return [Responses(engine=EngineConfig.embedded(), max_tokens=args.max_tokens, drop_empty=False)]

    local_rows, local_wall, local_busy = run(
        Pipeline(steps(), out / "local", shard_size=args.shard_size, input_dataset=data, progress=False))
    print(f"local: {len(local_rows)} rows in {local_wall:.1f} s "
          f"({len(local_rows) / local_wall:.2f} rows/s; {len(local_rows) / local_busy:.2f} over shard time)", flush=True)

    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    try:
        ray_rows, ray_wall, ray_busy = run(
            Pipeline(steps(), out / "ray", shard_size=args.shard_size, input_dataset=data, progress=False),
            RayExecutor(default=RayStageResources(replicas=args.actors, num_cpus=1)))
    finally:
        ray.shutdown()
    print(f"ray:   {len(ray_rows)} rows in {ray_wall:.1f} s on {args.actors} actors "
          f"({len(ray_rows) / ray_wall:.2f} rows/s; {args.actors * len(ray_rows) / ray_busy:.2f} over shard time / actors)",
          flush=True)

    same_ids = [r["conversation_id"] for r in local_rows] == [r["conversation_id"] for r in ray_rows]
    same_text = same_ids and [r["response"] for r in local_rows] == [r["response"] for r in ray_rows]
    if not same_text and same_ids:
        differ = sum(a["response"] != b["response"] for a, b in zip(local_rows, ray_rows))
        print(f"{differ} of {len(local_rows)} responses differ")
    print(f"output: {out}")
    print(f"local_rows_per_s={len(local_rows) / local_wall:.2f} ray_rows_per_s={len(ray_rows) / ray_wall:.2f} "
          f"same_ids={same_ids} same_text={same_text}")


if __name__ == "__main__":
    main()
