"""Preference-pair builders, their thresholds and ties, and the seeded train/test split."""

from __future__ import annotations

import random

import datasets
import pytest

from magpie_hf.steps.preferences import BestOfNPairs, InstructVsBasePairs, split_preferences


def _instruct_vs_base_batch():
    return {
        "conversation_id": ["keep", "zero", "null", "same", "empty", "small"],
        "instruction": ["q1", "q2", "q3", "q4", "q5", "q6"],
        "response": ["good answer", "x", "x", "same text", "fine", "better"],
        "base_output": ["bad", "y", "y", "same text", "", "worse"],
        "instruct_reward": [3.0, 1.0, None, 2.0, 2.0, 1.5],
        "base_reward": [1.0, 1.0, 0.0, 1.0, 0.0, 1.0],
        "reward_difference": [2.0, 0.0, None, 1.0, 2.0, 0.5],
    }


def test_instruct_vs_base_keeps_only_positive_differences_of_distinct_answers():
    step = InstructVsBasePairs()
    out = step.process(_instruct_vs_base_batch(), seed=0)
    assert out["conversation_id"] == ["keep", "small"]
    assert out["prompt"][0] == [{"role": "user", "content": "q1"}]
    assert out["chosen"][0] == [{"role": "assistant", "content": "good answer"}]
    assert out["rejected"][0] == [{"role": "assistant", "content": "bad"}]
    assert out["reward_difference"] == [2.0, 0.5] and out["chosen_reward"] == [3.0, 1.5]
    assert step.stats["dropped_reward_difference_at_most_tau"] == 1
    assert step.stats["dropped_null_reward_difference"] == 1
    assert step.stats["dropped_identical_answers"] == 1
    assert step.stats["dropped_empty_answer"] == 1


def test_instruct_vs_base_threshold_tau():
    out = InstructVsBasePairs(tau=1.0).process(_instruct_vs_base_batch(), seed=0)
    assert out["conversation_id"] == ["keep"]
    assert all(d > 1.0 for d in out["reward_difference"])


def _best_of_n_batch():
    return {
        "conversation_id": ["spread", "tie", "nulls", "one", "margin", "dup"],
        "instruction": ["a", "b", "c", "d", "e", "f"],
        "responses": [["r0", "r1", "r2"], ["x", "y"], ["p", "q", "s"], ["only", ""], ["m", "n"], ["z", "z"]],
        "rewards": [[0.5, 2.0, -1.0], [1.0, 1.0], [None, 0.3, 0.1], [1.0, 5.0], [0.0, 0.05], [1.0, 0.0]],
    }


def test_best_of_n_chosen_is_best_rejected_is_worst_and_ties_are_dropped():
    step = BestOfNPairs(margin=0.1)
    out = step.process(_best_of_n_batch(), seed=0)
    assert out["conversation_id"] == ["spread", "nulls"]
    assert out["chosen"][0] == [{"role": "assistant", "content": "r1"}]
    assert out["rejected"][0] == [{"role": "assistant", "content": "r2"}]
    assert (out["chosen_reward"][0], out["rejected_reward"][0]) == (2.0, -1.0)
    # a null reward is ignored, not treated as the worst
    assert out["chosen"][1][0]["content"] == "q" and out["rejected"][1][0]["content"] == "s"
    assert out["responses"][0] == ["r0", "r1", "r2"] and out["rewards"][1] == [None, 0.3, 0.1]
    assert step.stats["dropped_tied_rewards"] == 1
    assert step.stats["dropped_fewer_than_two_scored_answers"] == 1  # "one": the other answer is empty
    assert step.stats["dropped_below_margin"] == 1
    assert step.stats["dropped_identical_answers"] == 1
    for chosen, rejected, c, r in zip(out["chosen"], out["rejected"], out["chosen_reward"], out["rejected_reward"]):
        assert chosen != rejected and c - r >= 0.1


def test_best_of_n_margin_zero_still_drops_exact_ties():
    out = BestOfNPairs().process({"conversation_id": ["t"], "instruction": ["i"], "responses": [["a", "b", "c"]],
                                  "rewards": [[0.7, 0.7, 0.7]]}, seed=0)
    assert out["conversation_id"] == []


def test_best_of_n_refuses_misaligned_rewards():
    with pytest.raises(ValueError, match="rewards"):
        BestOfNPairs().process({"conversation_id": ["t"], "instruction": ["i"], "responses": [["a", "b"]],
                                "rewards": [[1.0]]}, seed=0)


def test_pairs_are_trl_conversational_preference_rows():
    from trl.data_utils import is_conversational

    out = InstructVsBasePairs().process(_instruct_vs_base_batch(), seed=0)
    row = {k: v[0] for k, v in out.items()}
    assert is_conversational(row)
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"


def _pairs(n):
    return datasets.Dataset.from_dict({"conversation_id": [f"id-{i}" for i in range(n)], "x": list(range(n))})


def test_split_is_deterministic_and_independent_of_row_order():
    ds = _pairs(200)
    split = split_preferences(ds, test_size=0.05, seed=3)
    assert (len(split["train"]), len(split["test"])) == (190, 10)
    order = list(range(200))
    random.Random(0).shuffle(order)
    shuffled = split_preferences(ds.select(order), test_size=0.05, seed=3)
    assert set(shuffled["test"]["conversation_id"]) == set(split["test"]["conversation_id"])
    assert split_preferences(ds, test_size=0.05, seed=3)["test"]["conversation_id"] == split["test"]["conversation_id"]
    assert set(split_preferences(ds, test_size=0.05, seed=4)["test"]["conversation_id"]) != set(split["test"]["conversation_id"])
    assert not set(split["train"]["conversation_id"]) & set(split["test"]["conversation_id"])


@pytest.mark.parametrize(("rows", "test_rows"), [(0, 0), (1, 0), (2, 1), (50, 1), (51, 2)])
def test_split_sizes_default_two_percent_at_least_one(rows, test_rows):
    split = split_preferences(_pairs(rows))
    assert len(split["test"]) == test_rows and len(split["train"]) == rows - test_rows


def test_split_refuses_duplicate_ids():
    ds = datasets.Dataset.from_dict({"conversation_id": ["a", "a", "b"]})
    with pytest.raises(ValueError, match="duplicate"):
        split_preferences(ds)


@pytest.mark.slow
def test_best_of_n_on_embedded_model_samples_scores_and_pairs(embedded_engine):
    from magpie_hf.steps.preferences import MultiResponseRewards, MultiResponses
    from magpie_hf.steps.reward import JudgeReward

    sample = MultiResponses(engine=embedded_engine, n=3, temperature=0.8, max_tokens=12)
    sample.load()
    batch = sample.process({"conversation_id": ["c"], "instruction": ["Name a fruit that is red."]}, seed=1)
    (responses,) = batch["responses"]
    assert len(responses) == 3 and all(isinstance(r, str) and "<|im_end|>" not in r for r in responses)
    assert sample.stats["generated_tokens"] == sum(batch["responses_num_tokens"][0])

    score = MultiResponseRewards(reward=JudgeReward(engine=embedded_engine, max_tokens=12))
    score.load()
    batch = score.process(batch, seed=0)
    (rewards,) = batch["rewards"]
    assert len(rewards) == 3 and all(r is None or 1 <= r <= 10 for r in rewards)
    assert batch["rewards_model"] == [embedded_engine.config.describe()]

    pairs = BestOfNPairs().process(batch, seed=0)
    scored = [r for r, t in zip(rewards, responses) if r is not None and t.strip()]
    expect_pair = len(scored) >= 2 and max(scored) > min(scored)
    assert len(pairs["chosen"]) <= (1 if expect_pair else 0)
    for c, r, cr, rr in zip(pairs["chosen"], pairs["rejected"], pairs["chosen_reward"], pairs["rejected_reward"]):
        assert c != r and cr == max(scored) and rr == min(scored)
