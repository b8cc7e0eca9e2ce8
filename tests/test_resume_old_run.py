"""A run folder made before the package's layout move resumes after it.

``tests/fixtures/run_before_layout_move`` is what a CPU recipe run (the arguments below) left in its output
folder before the modules moved: its settings (``pipeline.json``) and its nine finished stages; the filter
stage and the dataset were not written yet, as after a kill. Resuming it with today's code must match the
stored settings, redo no finished stage, and publish the stored rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from tests.conftest import load_recipe

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "run_before_layout_move"
ARGS = ["--preset", "cpu", "--num_rows", "6", "--shard_size", "3", "--instruction_max_tokens", "64",
        "--response_max_tokens", "32"]


def test_a_run_folder_from_before_the_layout_move_resumes(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    # the settings and every shard with its completion record (a stage's _stage.json summary is rewritten
    # with this run's wall time)
    stored = {path: path.read_bytes() for path in run.rglob("*") if path.is_file() and path.name != "_stage.json"}

    assert load_recipe("magpie_pro").main([*ARGS, "--output-dir", str(run)]) == 0

    changed = [str(path.relative_to(run)) for path, data in stored.items() if path.read_bytes() != data]
    assert not changed, f"a resumed run rewrote what the earlier run finished: {changed}"
    last_stage = pq.read_table(sorted((run / "stages" / "08-neighbors").glob("shard-*.parquet"))).to_pylist()
    raw = datasets.load_dataset(str(run / "dataset"), "raw", split="train")
    assert len(last_stage) == 5
    assert sorted(zip(raw["conversation_id"], raw["instruction"], raw["response"])) == sorted(
        (row["conversation_id"], row["instruction"], row["response"]) for row in last_stage
    )
