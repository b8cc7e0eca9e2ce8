"""Pipeline mechanics (shards, resume, global stages, errors) on small pure-Python steps,
and Magpie generation on the real embedded model."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import ClassVar

import pytest

from magpie_hf.pipeline import Pipeline, PipelineMismatchError, shard_seed
from magpie_hf.steps import DecodingSetting, GeneratorStep, GlobalStep, MagpieInstructions, Responses, Step, StepChain
from magpie_hf.steps.generate import AIR_MIXTURE, PRO_MIXTURE, assign_settings


@dataclasses.dataclass(kw_only=True)
class Numbers(GeneratorStep):
    """Seeded random numbers; drops multiples of 7 to exercise dropped-row counts."""

    outputs = ("conversation_id", "value")
    #: not a field (so not part of the run's settings): simulates a crash inside that shard
    fail_at_shard: ClassVar[int | None] = None

    def generate(self, *, offset, num_rows, seed):
        if self.fail_at_shard is not None and offset // num_rows == self.fail_at_shard:
            raise KeyboardInterrupt("simulated kill")
        rng = random.Random(seed)
        batch = {"conversation_id": [], "value": []}
        for i in range(offset, offset + num_rows):
            if i % 7 == 0:
                self.stats["dropped_multiple_of_7"] += 1
                continue
            batch["conversation_id"].append(f"row-{i}")
            batch["value"].append(rng.random())
        return batch


@dataclasses.dataclass(kw_only=True)
class Double(Step):
    inputs = ("value",)
    outputs = ("double",)

    def process(self, batch, *, seed):
        return {**batch, "double": [2 * v for v in batch["value"]]}


@dataclasses.dataclass(kw_only=True)
class KeepTop(GlobalStep):
    inputs = ("value",)
    k: int = 5

    def process_dataset(self, dataset, *, seed):
        return dataset.sort("value", reverse=True).select(range(min(self.k, len(dataset))))


def test_stage_major_shards_and_manifest(tmp_path):
    chain = Numbers(num_rows=30) >> Double() >> KeepTop(k=5)
    assert isinstance(chain, StepChain) and len(chain) == 3
    pipe = Pipeline(chain, tmp_path, shard_size=8, seed=3, progress=False)
    ds = pipe.run()
    assert len(ds) == 5
    assert ds["double"] == [2 * v for v in ds["value"]]
    assert len(pipe.stage_files(0)) == 4  # ceil(30 / 8)
    report = pipe.manifest()["stages"][0]
    assert report["rows_in"] == 30 and report["stats"]["dropped_multiple_of_7"] == 5 and report["rows_out"] == 25
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"][2]["rows_out"] == 5


def test_resume_after_interrupt_gives_identical_rows(tmp_path, monkeypatch):
    reference = Pipeline(Numbers(num_rows=40) >> Double(), tmp_path / "ref", shard_size=10, seed=1, progress=False).run()

    monkeypatch.setattr(Numbers, "fail_at_shard", 2)
    interrupted = Pipeline(Numbers(num_rows=40) >> Double(), tmp_path / "run", shard_size=10, seed=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert len(interrupted.stage_files(0)) == 2  # two finished shards survived, nothing partial
    assert not list((tmp_path / "run").rglob(".*tmp*"))

    monkeypatch.setattr(Numbers, "fail_at_shard", None)
    resumed = Pipeline(Numbers(num_rows=40) >> Double(), tmp_path / "run", shard_size=10, seed=1, progress=False).run()
    assert resumed["conversation_id"] == reference["conversation_id"]
    assert resumed["value"] == reference["value"]

    with pytest.raises(PipelineMismatchError, match="other settings"):
        Pipeline(Numbers(num_rows=50) >> Double(), tmp_path / "run", shard_size=10, seed=1, progress=False).run()


def test_resume_skips_finished_shards(tmp_path):
    steps = lambda: Numbers(num_rows=40) >> Double()  # noqa: E731
    reference = Pipeline(steps(), tmp_path / "ref", shard_size=10, seed=1, progress=False).run()
    first = Pipeline(steps(), tmp_path / "run", shard_size=10, seed=1, progress=False)
    first.run()
    # simulate a kill during stage 1: remove its last shard and the stage marker
    stage = first.stage_dir(1)
    (stage / "_stage.json").unlink()
    (stage / "shard-00003.parquet").unlink()
    (stage / "shard-00002.parquet").write_bytes(b"garbage that must not be read")  # finished shards are trusted...
    (stage / "shard-00002.json").unlink()  # ...only with their report beside them
    resumed = Pipeline(steps(), tmp_path / "run", shard_size=10, seed=1, progress=False).run()
    assert resumed["conversation_id"] == reference["conversation_id"]
    assert resumed["double"] == reference["double"]


def test_input_dataset_and_errors(tmp_path):
    import datasets

    data = datasets.Dataset.from_dict({"value": [1.0, 2.0, 3.0]})
    assert Pipeline([Double()], tmp_path / "a", input_dataset=data, shard_size=2, progress=False).run()["double"] == [2.0, 4.0, 6.0]
    with pytest.raises(ValueError, match="GeneratorStep"):
        Pipeline([Double()], tmp_path / "b")
    with pytest.raises(ValueError, match="unique"):
        Pipeline(Numbers(num_rows=3) >> Double() >> Double(), tmp_path / "c")
    with pytest.raises(ValueError, match="needs columns"):
        Pipeline([Double()], tmp_path / "d", input_dataset=datasets.Dataset.from_dict({"x": [1]}), progress=False).run()


def test_shard_seeds_are_stable_and_distinct():
    assert shard_seed(0, 0, 0) == shard_seed(0, 0, 0)
    assert len({shard_seed(s, st, sh) for s in range(3) for st in range(3) for sh in range(20)}) == 180


def test_mixture_assignment_follows_table_6():
    labels = assign_settings(PRO_MIXTURE, 1000, seed=0)
    counts = [int((labels == i).sum()) for i in range(4)]
    assert counts == [300, 300, 300, 100]
    assert (labels[:100] == 3).sum() > 0  # shuffled: an early shard sees the whole mixture
    assert (assign_settings(PRO_MIXTURE, 1000, seed=0) == labels).all()
    assert sum(int((assign_settings(AIR_MIXTURE, 30, seed=1) == i).sum()) for i in range(12)) == 30
    with pytest.raises(ValueError, match="weight"):
        DecodingSetting(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="top_p"):
        DecodingSetting(1.0, 1.5)


def test_magpie_generation_on_embedded_model(embedded_engine, tmp_path):
    steps = MagpieInstructions(engine=embedded_engine, num_rows=10, max_tokens=96, seed=5) >> Responses(
        engine=embedded_engine, max_tokens=64
    )
    pipe = Pipeline(steps, tmp_path, shard_size=5, seed=5, progress=False)
    ds = pipe.run()
    report = pipe.manifest()["stages"][0]
    dropped = sum(v for k, v in report["stats"].items() if k.startswith("dropped"))
    assert report["rows_out"] + dropped == 10
    assert len(ds) >= 1
    assert len(set(ds["conversation_id"])) == len(ds)
    for row in ds:
        assert row["instruction"] and row["response"]
        for text in (row["instruction"], row["response"]):
            assert "<|im_" not in text and text == text.strip()
        assert row["conversations"] == [
            {"role": "user", "content": row["instruction"]},
            {"role": "assistant", "content": row["response"]},
        ]
        assert row["instruction_finish_reason"] == "stop"
        assert row["gen_input_configs"]["pre_query_template"].endswith("<|im_start|>user\n")
        assert row["gen_input_configs"]["engine"] == "transformers"
        assert row["gen_response_configs"]["temperature"] == 0.0


def test_truncated_instructions_are_dropped_and_counted(embedded_engine, tmp_path):
    step = MagpieInstructions(engine=embedded_engine, num_rows=4, max_tokens=2)
    pipe = Pipeline([step], tmp_path, shard_size=4, progress=False)
    ds = pipe.run()
    stats = pipe.manifest()["stages"][0]["stats"]
    assert stats.get("dropped_truncated_instruction", 0) + stats.get("dropped_empty_instruction", 0) == 4 - len(ds)
    assert stats.get("dropped_truncated_instruction", 0) >= 1


def test_counts_since_keeps_zero_counts_a_step_touched():
    from collections import Counter

    from magpie_hf.pipeline import counts_since

    before = Counter({"parsed": 3, "removed: a": 0})
    now = Counter({"parsed": 5, "removed: a": 0, "removed: b": 0})
    assert counts_since(before, now) == Counter({"parsed": 2, "removed: b": 0})
    assert "removed: b" in counts_since(before, now)
