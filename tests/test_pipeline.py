"""Pipeline mechanics (shards, resume, integrity, locking, typed columns, global stages, errors) on
small pure-Python steps, and Magpie generation on the real embedded model."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest

from magpie_hf.executors import LocalExecutor
from magpie_hf.executors.layout import RunLayout, RunLockedError
from magpie_hf.executors.runner import ColumnTypeError
from magpie_hf.pipeline import Pipeline, PipelineMismatchError, ShardsNotVisibleError
from magpie_hf.seeds import SEEDS_PER_ROW, row_seed, stage_seed
from magpie_hf.steps import DecodingSetting, GeneratorStep, GlobalStep, MagpieInstructions, Responses, Step, StepChain
from magpie_hf.steps.base import FLOAT, STRING, MissingColumnsError, struct
from magpie_hf.steps.generate import AIR_MIXTURE, PRO_MIXTURE, assign_settings


@dataclasses.dataclass(kw_only=True)
class Numbers(GeneratorStep):
    """Seeded random numbers (one generator per row, from the row's own seed); drops multiples of 7
    to exercise dropped-row counts."""

    #: not a field (so not part of the run's settings): simulates a crash inside that shard
    fail_at_shard: ClassVar[int | None] = None

    def output_features(self):
        return {"conversation_id": STRING, "value": FLOAT}

    def generate(self, *, offset, num_rows, seed):
        if self.fail_at_shard is not None and offset // num_rows == self.fail_at_shard:
            raise KeyboardInterrupt("simulated kill")
        batch = {"conversation_id": [], "value": []}
        for i in range(num_rows):
            if (offset + i) % 7 == 0:
                self.stats["dropped_multiple_of_7"] += 1
                continue
            batch["conversation_id"].append(f"row-{offset + i}")
            batch["value"].append(random.Random(row_seed(seed, i)).random())
        return batch


@dataclasses.dataclass(kw_only=True)
class Double(Step):
    inputs = ("value",)

    def output_features(self):
        return {"double": FLOAT}

    def process(self, batch, *, seed):
        return {**batch, "double": [2 * v for v in batch["value"]]}


@dataclasses.dataclass(kw_only=True)
class Halve(Step):
    inputs = ("double",)

    def output_features(self):
        return {"half": FLOAT}

    def process(self, batch, *, seed):
        return {**batch, "half": [v / 2 for v in batch["double"]]}


@dataclasses.dataclass(kw_only=True)
class Noted(Step):
    """Writes a column that is null in every row, and a struct with a field that is always null."""

    inputs = ("value",)

    def output_features(self):
        return {"note": STRING, "meta": struct(why=STRING, score=FLOAT)}

    def process(self, batch, *, seed):
        n = len(batch["value"])
        return {**batch, "note": [None] * n, "meta": [{"why": None, "score": v} for v in batch["value"]]}


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
    with pytest.raises(MissingColumnsError, match="needs columns \\['value' \\(did you mean 'values'\\?\\)\\]"):
        Pipeline([Double()], tmp_path / "d", input_dataset=datasets.Dataset.from_dict({"values": [1]}), progress=False).run()
    # a step reading a column no earlier step declares stops the run before the first stage writes anything
    chain = Pipeline(Numbers(num_rows=3) >> KeepTop(name="top") >> Halve(), tmp_path / "e", progress=False)
    with pytest.raises(MissingColumnsError, match="'halve' needs columns \\['double'\\] that no earlier stage declares"):
        chain.run()
    with pytest.raises(MissingColumnsError):
        chain.plan()
    assert not (tmp_path / "e").exists() or not list((tmp_path / "e").glob("00-*/*.parquet"))


def test_row_seeds_are_stable_and_never_share_a_sample_seed():
    assert stage_seed(0, 1) == stage_seed(0, 1) and stage_seed(0, 1) != stage_seed(0, 2)
    first = row_seed(stage_seed(3, 0), 0)
    # every row owns SEEDS_PER_ROW consecutive seeds; no two rows' blocks meet
    seeds = [row_seed(first, i) + j for i in range(500) for j in range(SEEDS_PER_ROW)]
    assert len(set(seeds)) == len(seeds)


def test_rows_do_not_depend_on_shard_size(tmp_path):
    small = Pipeline(Numbers(num_rows=30) >> Double(), tmp_path / "a", shard_size=4, seed=2, progress=False).run()
    large = Pipeline(Numbers(num_rows=30) >> Double(), tmp_path / "b", shard_size=30, seed=2, progress=False).run()
    assert small["value"] == large["value"] and small["double"] == large["double"]


def test_truncated_finished_shard_is_redone_with_the_same_rows(tmp_path, caplog):
    steps = lambda: Numbers(num_rows=30) >> Double()  # noqa: E731
    first = Pipeline(steps(), tmp_path, shard_size=8, seed=4, progress=False)
    reference = first.run().to_list()
    damaged = first.stage_files(0)[1]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a full disk cut it short
    with caplog.at_level("WARNING"):
        again = Pipeline(steps(), tmp_path, shard_size=8, seed=4, progress=False).run().to_list()
    assert again == reference
    assert any(str(damaged) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)


def test_a_second_live_run_on_the_same_folder_is_refused(tmp_path):
    import json
    import os
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}.*delete .*\\.lock"):
        Pipeline(Numbers(num_rows=4), tmp_path, progress=False).run()
    # a lock left by a process that is gone is taken over
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "then"}))
    assert len(Pipeline(Numbers(num_rows=4), tmp_path, progress=False).run()) == 3
    assert not (tmp_path / ".lock").exists()
    # an unreadable lock (a run died while writing it, on a filesystem without hard links) is taken over once old
    (tmp_path / ".lock").write_text("")
    os.utime(tmp_path / ".lock", (0, 0))
    assert len(Pipeline(Numbers(num_rows=4), tmp_path, progress=False).run()) == 3
    # two runs taking over one dead run's lock: the one that comes second must not remove the first one's
    from magpie_hf.executors.layout import _take_over

    live = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}
    (tmp_path / ".lock").write_text(json.dumps(live))
    _take_over(tmp_path / ".lock", {"pid": 2**22 + 12345, "host": socket.gethostname(), "started": "then"})
    assert json.loads((tmp_path / ".lock").read_text()) == live
    assert [p.name for p in tmp_path.glob(".lock*")] == [".lock"]


def test_columns_are_typed_even_when_every_value_is_null(tmp_path):
    import pyarrow.parquet as pq

    pipe = Pipeline(Numbers(num_rows=12) >> Noted() >> KeepTop(k=0), tmp_path, shard_size=5, progress=False)
    assert len(pipe.run()) == 0
    for index in range(3):
        for path in pipe.stage_files(index):
            schema = pq.read_schema(path)
            assert not [f.name for f in schema if str(f.type) == "null" or "null" in str(f.type)], schema
    assert str(pq.read_schema(pipe.stage_files(2)[0]).field("meta").type) == "struct<why: string, score: double>"


@dataclasses.dataclass(kw_only=True)
class Scored(GlobalStep):
    """Adds a column with ``datasets.concatenate_datasets(axis=1)``, as the neighbours step does: on an empty
    stage that call returns the input without the new column."""

    inputs = ("value",)

    def output_features(self):
        return {"score": FLOAT}

    def process_dataset(self, dataset, *, seed):
        import datasets

        scores = datasets.Dataset.from_dict({"score": [0.5] * len(dataset)}, features=datasets.Features({"score": datasets.Value("float64")}))
        return datasets.concatenate_datasets([dataset, scores], axis=1)


def test_an_empty_stage_still_has_the_declared_columns_for_the_next_one(tmp_path):
    """Every row dropped early (all instructions cut off in a tiny run) must not make a later step fail on a
    column that an empty stage lost: the shards of an empty stage carry every declared column."""
    import pyarrow.parquet as pq

    @dataclasses.dataclass(kw_only=True)
    class KeepScored(GlobalStep):
        inputs = ("score",)

        def process_dataset(self, dataset, *, seed):
            return dataset.filter(lambda row: row["score"] > 0)

    pipe = Pipeline(Numbers(num_rows=6) >> KeepTop(k=0) >> Scored() >> KeepScored(), tmp_path, shard_size=3, progress=False)
    assert len(pipe.run()) == 0
    assert pq.read_schema(pipe.stage_files(2)[0]).field("score").type == pa.float64()


def test_a_step_must_declare_what_it_writes(tmp_path):
    @dataclasses.dataclass(kw_only=True)
    class Sloppy(Step):
        inputs = ("value",)

        def output_features(self):
            return {"double": FLOAT}

        def process(self, batch, *, seed):
            return {**batch, "double": batch["value"], "extra": batch["value"]}

    with pytest.raises(ColumnTypeError, match="'extra'.*neither declares"):
        Pipeline(Numbers(num_rows=4) >> Sloppy(), tmp_path, progress=False).run()
    with pytest.raises(TypeError, match="output_features"):
        @dataclasses.dataclass(kw_only=True)
        class OldStyle(Step):
            outputs = ("x",)


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


def test_reports_keep_zero_counts_a_step_touched(tmp_path):
    @dataclasses.dataclass(kw_only=True)
    class Counting(Step):
        inputs = ("value",)

        def process(self, batch, *, seed):
            self.stats["removed: nothing"] += 0
            return batch

    pipe = Pipeline(Numbers(num_rows=4) >> Counting(), tmp_path, progress=False)
    pipe.run()
    assert pipe.manifest()["stages"][1]["stats"] == {"removed: nothing": 0}


class _LosesShards(LocalExecutor):
    """Runs shards here, then makes some of them unreadable to the driver, as a worker on a node without
    the shared folder leaves them (their completion record never reaches the driver's view)."""

    def __init__(self, lose: set[int]):
        self.lose = lose

    def run_stage(self, step, tasks, layout, progress):
        reports = super().run_stage(step, tasks, layout, progress)
        for task, report in zip(tasks, reports):
            report.node = f"node-{task.shard % 2}"
            if task.stage == 0 and task.shard in self.lose:
                layout.record_path(Path(task.output)).unlink()
        return reports


def test_a_stage_whose_shards_the_driver_cannot_read_fails_naming_them(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLayout, "VISIBLE_WAIT_S", 0.2)
    with pytest.raises(ShardsNotVisibleError) as caught:
        Pipeline(Numbers(num_rows=40) >> Double(), tmp_path, shard_size=10, progress=False).run(executor=_LosesShards({1, 3}))
    message = str(caught.value)
    assert "Stage '00-numbers': 2 of 4 shard(s) the workers reported written cannot be read here" in message
    assert f"shard 1 at {tmp_path / 'stages' / '00-numbers' / 'shard-00001.parquet'}, written by node-1" in message
    assert "shard 3 at" in message and "shard 0 at" not in message
    assert "put output_dir on shared storage" in message
    assert not (tmp_path / "stages" / "01-double").exists()  # the next stage never ran on fewer shards
    # a rerun (shared storage now) redoes only the lost shards and loses nothing
    rows = Pipeline(Numbers(num_rows=40) >> Double(), tmp_path, shard_size=10, progress=False).run()
    assert len(rows) == 40 - 6  # 0, 7, 14, 21, 28, 35 are dropped


def test_the_next_stage_reads_what_the_tasks_wrote_not_the_folder(tmp_path):
    first = Pipeline(Numbers(num_rows=20) >> Double(), tmp_path, shard_size=10, progress=False)
    first.run()
    # a stray shard with a valid completion record (another run's, a copy) sits in the stage folder
    stray = RunLayout.shard_path(first.stage_dir(0), 7)
    RunLayout(tmp_path).write_shard(stray, pa.table({"conversation_id": ["stray"], "value": [0.5]}), {"rows_in": 1})
    again = Pipeline(Numbers(num_rows=20) >> Double(), tmp_path, shard_size=10, progress=False)
    rows = again.run()
    assert "stray" not in rows["conversation_id"] and len(rows) == 20 - 3
    assert again.manifest()["stages"][0]["shards"] == 2 and len(again.stage_files(0)) == 2


def test_a_vllm_step_records_whether_vllm_ran_batch_invariant(monkeypatch):
    from magpie_hf.engines import EngineConfig
    from magpie_hf.executors.runner import _provenance

    on_vllm = Responses(engine=EngineConfig("org/model", backend="vllm"))
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    assert _provenance(on_vllm) == {"vllm_batch_invariant": True}
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")
    assert _provenance(on_vllm) == {"vllm_batch_invariant": False}
    assert _provenance(Responses(engine=EngineConfig("org/model", backend="transformers"))) == {}
