"""Column conditions, the paper's Table 4 presets and the removal report."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from magpie_hf.prompts.labels import DIFFICULTIES, INPUT_QUALITIES
from magpie_hf.steps.filters import (
    DEDUPLICATE,
    FILTER_PRESETS,
    Condition,
    Filter,
    hygiene_conditions,
    preset_filter,
)

# id, quality, difficulty, min neighbour distance, reward, reward difference, response
ROWS = [
    ("a", "excellent", "hard", 0.30, 5.0, 2.0, "x" * 50),
    ("b", "good", "medium", 0.20, -5.0, 1.0, "x" * 40),
    ("c", "good", "easy", 0.25, -11.0, -1.0, "x" * 60),
    ("d", "average", "very hard", 0.40, -13.0, 3.0, "x" * 70),
    ("e", "good", "medium", 0.00, 4.0, 1.0, "x" * 80),  # exact repeat
    ("f", "poor", "easy", 0.10, 0.0, 0.5, "x" * 90),
    ("g", "excellent", "very easy", 0.15, 1.0, 0.5, "x" * 45),
    ("h", None, "hard", 0.22, 2.0, 0.2, "x" * 55),  # quality judge failed
    ("i", "good", "easy", 0.35, -2.0, 0.1, "x" * 40),  # same length as b: tie broken by id
    ("j", "excellent", "medium", 0.05, 3.0, None, "x" * 65),  # reward difference missing
]


def table(rows=ROWS) -> datasets.Dataset:
    names = ["conversation_id", "input_quality", "difficulty", "min_neighbor_distance", "instruct_reward",
             "reward_difference", "response"]
    return datasets.Dataset.from_dict({n: [r[i] for r in rows] for i, n in enumerate(names)})


def run(step: Filter, ds: datasets.Dataset) -> list[str]:
    out = step.process_dataset(ds, seed=0)
    removed = sum(entry["removed"] for entry in step.report)
    assert len(ds) - removed == len(out), step.report  # the report adds up
    assert step.stats["rows_in"] - step.stats["rows_out"] == removed
    return list(out["conversation_id"])


# hand-derived answers on ROWS (survivors in row order; the length cut is set to 3 rows)
EXPECTED = {
    # good+, medium+, >0, diff>0: a(50) b(40); j has no reward difference, e is a repeat -> a, b
    "Filter": ["a", "b"],
    # average+, >0, reward>-12: a b c g i j (d reward -13, e repeat, f poor, h null) -> longest 3: j c a
    "Filter1": ["a", "c", "j"],
    # good+, easy+, >0, reward>-12: a b c i j -> longest 3: j(65) c(60) a(50)
    "Filter2": ["a", "c", "j"],
    # >0, reward>-12: a b c f g h i j -> longest 3: f(90) j(65) c(60)
    "Filter3": ["c", "f", "j"],
    # good+, easy+, >0, diff>0: a b i (c diff -1, j null) -> all 3
    "Filter4": ["a", "b", "i"],
    # Filter2's conditions, no cut
    "Filter5": ["a", "b", "c", "i", "j"],
    # >0, reward>-12: a b c f g h i j; easy: c(60) f(90) i(40) -> 2 longest: f c; harder: a b h j -> 1 longest: j(65)
    "Filter6": ["c", "f", "j"],
}


@pytest.mark.parametrize("name", sorted(FILTER_PRESETS))
def test_presets_on_a_constructed_table(name):
    step = preset_filter(name, max_rows=3)
    assert run(step, table()) == EXPECTED[name]


def test_filter6_reports_stratum_and_cut():
    step = preset_filter("Filter6", max_rows=3)
    run(step, table())
    assert [e["removed"] for e in step.report] == [1, 1, 1, 4]  # e repeat, d reward, g very easy, cut
    assert "in no stratum" in step.report[2]["condition"]


def test_presets_use_paper_row_counts_unless_overridden():
    assert preset_filter("Filter").keep_longest == 300_000
    assert preset_filter("Filter6").keep_longest == 200_000
    assert preset_filter("Filter5", max_rows=10).keep_longest is None  # no length cut in the paper
    assert preset_filter("Filter1", scale=1e-3).keep_longest == 300


def test_presets_match_a_row_by_row_reference_on_random_tables():
    rng = np.random.default_rng(0)
    n = 400
    rows = [
        (
            f"id{i:04d}",
            rng.choice([*INPUT_QUALITIES, None]),
            rng.choice([*DIFFICULTIES, None]),
            float(rng.choice([0.0, rng.uniform(0, 1)])),
            float(rng.normal(-8, 6)),
            None if rng.random() < 0.1 else float(rng.normal(0, 2)),
            "x" * int(rng.integers(1, 60)),  # many length ties
        )
        for i in range(n)
    ]
    q, d = {v: i for i, v in enumerate(INPUT_QUALITIES)}, {v: i for i, v in enumerate(DIFFICULTIES)}

    def ok(r, quality=None, difficulty=None, reward=False, diff=False):
        return (
            (quality is None or (r[1] is not None and q[r[1]] >= q[quality]))
            and (difficulty is None or (r[2] is not None and d[r[2]] >= d[difficulty]))
            and r[3] > 0
            and (not reward or r[4] > -12)
            and (not diff or (r[5] is not None and r[5] > 0))
        )

    def longest(rs, k):
        return sorted(rs, key=lambda r: (-len(r[6]), r[0]))[:k]

    k = 37
    reference = {
        "Filter": longest([r for r in rows if ok(r, "good", "medium", diff=True)], k),
        "Filter1": longest([r for r in rows if ok(r, "average", reward=True)], k),
        "Filter2": longest([r for r in rows if ok(r, "good", "easy", reward=True)], k),
        "Filter3": longest([r for r in rows if ok(r, reward=True)], k),
        "Filter4": longest([r for r in rows if ok(r, "good", "easy", diff=True)], k),
        "Filter5": [r for r in rows if ok(r, "good", "easy", reward=True)],
        "Filter6": longest([r for r in rows if ok(r, reward=True) and r[2] == "easy"], 19)
        + longest([r for r in rows if ok(r, reward=True) and r[2] in ("medium", "hard", "very hard")], 18),
    }
    ds = table(rows)
    for name, expected in reference.items():
        assert run(preset_filter(name, max_rows=k), ds) == sorted(r[0] for r in expected), name


def test_user_conditions_in_order_with_report():
    ds = table()
    step = Filter(
        conditions=[
            Condition("difficulty", "in", ["easy", "medium"]),
            Condition("instruct_reward", ">=", -5),
            Condition("response", lambda text: len(text) < 80),
        ]
    )
    assert run(step, ds) == ["b", "i", "j"]
    assert step.report == [
        {"condition": "difficulty in ['easy', 'medium']", "removed": 4},  # a d g h
        {"condition": "instruct_reward >= -5", "removed": 1},  # c
        {"condition": "<lambda>(response)", "removed": 2},  # e f
    ]
    assert step.stats["removed: instruct_reward >= -5"] == 1


def test_nulls_and_off_scale_labels_fail():
    ds = table([ROWS[0], ROWS[7]]).cast_column("input_quality", datasets.Value("string"))
    assert Condition("input_quality", "!=", "poor").mask(ds).tolist() == [True, False]
    assert Condition("input_quality", "not in", ["poor"]).mask(ds).tolist() == [True, False]
    weird = datasets.Dataset.from_dict({"input_quality": ["great", "good"]})
    assert Condition("input_quality", ">=", "poor").mask(weird).tolist() == [False, True]


def test_deduplicate_keeps_first_of_each_cluster():
    ds = datasets.Dataset.from_dict(
        {"conversation_id": ["a", "b", "c", "d"], "min_similar_conversation_id": ["a", "a", "c", None]}
    )
    assert Filter(conditions=[DEDUPLICATE]).process_dataset(ds, seed=0)["conversation_id"] == ["a", "c"]


def test_filter_respects_an_indices_mapping():
    ds = table().select([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert run(preset_filter("Filter4", max_rows=2), ds) == ["b", "a"]


def test_clear_errors():
    with pytest.raises(ValueError, match="Did you mean 'Filter1'"):
        preset_filter("filter1")
    with pytest.raises(ValueError, match="Presets: "):
        preset_filter("Nope")
    with pytest.raises(ValueError, match="not on the 'input_quality' scale"):
        Condition("input_quality", ">=", "great")
    with pytest.raises(ValueError, match="Unknown operator"):
        Condition("instruct_reward", "=>", 1)
    with pytest.raises(ValueError, match="needs a list"):
        Condition("difficulty", "in", "easy")
    ds = table().remove_columns(["reward_difference"])
    with pytest.raises(ValueError, match="'reward_difference'.*Add the step that writes them"):
        preset_filter("Filter").check_inputs(ds.column_names)
    with pytest.raises(ValueError, match="did you mean 'instruct_reward'"):
        Filter(conditions=[Condition("instruct_rewards", ">", 0)]).check_inputs(table().column_names)
    with pytest.raises(ValueError, match="Cannot evaluate"):
        Filter(conditions=[Condition("response", ">", 3)]).process_dataset(table(), seed=0)


def test_hygiene_drops_errors_truncated_and_unsafe_and_reports_each():
    """What every recipe's filter applies before its preset; each reason is one line of the report."""
    ds = datasets.Dataset.from_dict({
        "conversation_id": ["ok", "failed", "cut", "unsafe", "unjudged", "judge_failed", "ok2"],
        "response": ["a" * 5, None, "b" * 50, "c" * 9, "d" * 7, "e" * 8, "f" * 6],
        "response_error": [None, "prompt_too_long", None, None, None, None, None],
        "response_finish_reason": ["stop", None, "length", "stop", "stop", "stop", "stop"],
        "is_safe": [True, None, True, False, None, True, True],
        "input_quality_error": [None, None, None, None, None, "unparsable", None],
    })
    conditions = hygiene_conditions(ds.column_names)
    assert [str(c) for c in conditions] == ["response_error is null", "input_quality_error is null",
                                           "response_finish_reason != 'length'", "is_safe == True"]
    step = preset_filter("Filter3", max_rows=1, before=conditions)
    step.conditions = step.conditions[:4]  # the preset's own conditions need columns this table lacks
    assert run(step, ds) == ["ok2"]  # of ok and ok2, the longer response
    assert step.report == [
        {"condition": "response_error is null", "removed": 1},
        {"condition": "input_quality_error is null", "removed": 1},
        {"condition": "response_finish_reason != 'length'", "removed": 1},
        {"condition": "is_safe == True", "removed": 2},  # unsafe, and not judged
        {"condition": "keep 1 longest response", "removed": 1},
    ]
    assert hygiene_conditions(["instruction", "response"]) == []
    assert str(Condition("x", "is not null")) == "x is not null"
    with pytest.raises(ValueError, match="is null"):
        Condition("x", "is none")


def test_hygiene_step_makes_filtered_the_default_config(tmp_path):
    """What magpie_mt and magpie_reasoning end with: a hygiene-only filter, then `filtered` (first, the default) and
    `raw` (the stage before it) written as a dataset folder."""
    from magpie_hf.engines import EngineConfig
    from magpie_hf.hub import save_dataset_folder
    from magpie_hf.pipeline import Pipeline
    from magpie_hf.recipe import filtered_and_raw, hygiene_step
    from magpie_hf.steps import Responses

    rows = datasets.Dataset.from_dict({
        "conversation_id": ["a", "b", "c"], "instruction": ["Hi?", "Yo?", "Hm?"], "response": ["Hello.", None, "Cut"],
        "conversations": [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], None,
                          [{"role": "user", "content": "Hm?"}, {"role": "assistant", "content": "Cut"}]],
        "response_error": [None, "prompt_too_long", None], "response_finish_reason": ["stop", None, "length"],
    })
    # the conditions come from the columns the chain declares (Responses: response_error, response_finish_reason)
    assert [str(c) for c in hygiene_step([Responses(engine=EngineConfig(model="m"))]).conditions] == [
        "response_error is null", "response_finish_reason != 'length'"]
    steps = [Filter(conditions=[], name="tagged"),  # stands in for the generation and tagging stages
             Filter(conditions=hygiene_conditions(rows.column_names), name="filtered")]
    pipeline = Pipeline(steps, tmp_path / "run", input_dataset=rows)
    last = pipeline.run()
    configs, extra = filtered_and_raw(pipeline, last, {"recipe": "magpie_mt"})
    assert list(configs) == ["filtered", "raw"] and configs["filtered"]["conversation_id"] == ["a"]
    assert [r["removed"] for r in extra["filter_report"]] == [1, 1]
    folder = save_dataset_folder(tmp_path / "dataset", configs, extra, embedding_map=False)
    assert datasets.load_dataset(str(folder), split="train")["conversation_id"] == ["a"]  # the default: filtered
