"""Reward scoring: a tiny sequence-classification RM built here, and the generative judge reward."""

from __future__ import annotations

import pytest
import torch

from magpie_hf.engines.base import Completion, Engine
from magpie_hf.engines.config import EngineConfig
from magpie_hf.seeds import row_seeds
from magpie_hf.steps.reward import PAPER_REWARD_MODEL, JudgeReward, RewardModel, RewardModelScorer


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory, embedded_tokenizer):
    """A 2-layer LlamaForSequenceClassification (num_labels=1) with the SmolLM2 tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_rm")
    tok = embedded_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _conv(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


CONVS = [
    _conv("What is 2+2?", "4"),
    _conv("Name a colour.", "Blue is a colour that many people like."),
    _conv("Say hi", ""),
    _conv("Write a long answer.", "word " * 40),
    _conv("Capital of France?", "Paris, the capital of France, sits on the Seine."),
]


def test_batched_scores_equal_unbatched(tiny_rm_dir):
    batched = RewardModelScorer(tiny_rm_dir, batch_size=4)
    single = RewardModelScorer(tiny_rm_dir, batch_size=1)
    a, b = batched.score(CONVS), single.score(CONVS)
    assert len(a) == len(CONVS) and all(isinstance(x, float) for x in a)
    assert a == pytest.approx(b, abs=1e-4)
    assert len(set(round(x, 6) for x in a)) > 1  # different conversations, different rewards


def test_truncation_keeps_start_and_end_of_turn(tiny_rm_dir):
    scorer = RewardModelScorer(tiny_rm_dir, max_length=40)
    scorer.load()
    long = _conv("Explain everything.", "and so on " * 200)
    ids = scorer.encode(long)
    tok = scorer._tokenizer
    full = tok(tok.apply_chat_template(long, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(ids) == 40 < len(full)
    assert ids[:20] == full[:20]  # the instruction survives
    assert tok.decode(ids[-2:]) == tok.decode(full[-2:])  # the template's end of turn survives
    assert scorer.stats["truncated"] == 1
    [reward] = scorer.score([long])
    assert isinstance(reward, float)
    # the default limit comes from the model (max_position_embeddings=128)
    default = RewardModelScorer(tiny_rm_dir)
    default.load()
    assert len(default.encode(long)) == 128


def test_reward_step_column_names_and_missing_rows(tiny_rm_dir):
    step = RewardModel(model=tiny_rm_dir, response_column="base_output", output_column="base_reward", forward_batch_size=2)
    step.check_inputs(["instruction", "base_output"])
    assert step.outputs == ("base_reward", "reward_model")  # computed from the configuration
    with pytest.raises(ValueError, match="base_output"):
        step.check_inputs(["instruction", "response"])
    step.load()
    batch = {"instruction": ["What is 2+2?", "Say hi", "Name a colour."], "base_output": ["4", None, "Blue"]}
    out = step.process(batch, seed=0)
    assert out["base_reward"][1] is None and all(isinstance(out["base_reward"][i], float) for i in (0, 2))
    assert out["reward_model"] == [tiny_rm_dir] * 3
    assert step.stats["missing_input"] == 1
    expected = RewardModelScorer(tiny_rm_dir).score([CONVS[0], _conv("Name a colour.", "Blue")])
    assert [out["base_reward"][0], out["base_reward"][2]] == pytest.approx(expected, abs=1e-4)
    assert RewardModel().model == PAPER_REWARD_MODEL


class ScriptedEngine(Engine):
    name = "scripted"

    def __init__(self, answers, tokenizer):
        super().__init__(EngineConfig(model="scripted-judge"))
        self.answers, self._tok, self.prompts = list(answers), tokenizer, []

    @property
    def tokenizer(self):
        return self._tok

    def _generate(self, prompts, sampling, seeds, progress):
        self.prompts.extend(prompts)
        self.sampling, self.seeds = sampling, seeds
        return [[Completion(self.answers.pop(0), 5, "stop") for _ in range(sampling.n)] for _ in prompts]


def test_judge_reward_parses_ratings(embedded_tokenizer):
    engine = ScriptedEngine(['{"rating": 8}', '{"rating": 11}', "great answer!", '{"rating": "3"}'], embedded_tokenizer)
    step = JudgeReward(engine=engine)
    batch = {
        "instruction": ["q1", "q2", "q3", "", "q5"],
        "response": ["a1", "a2", "a3", "a4", "a5"],
    }
    out = step.process(batch, seed=0)
    assert out["instruct_reward"] == [8.0, None, None, None, 3.0]
    assert out["reward_model"] == ["scripted-judge"] * 5
    assert out["instruct_reward_error"][0] is None and "1-10" in out["instruct_reward_error"][1]
    assert step.stats == {"parsed": 2, "unparseable": 2, "out_of_set": 1, "empty_input": 1}
    assert "q1" in engine.prompts[0] and "a1" in engine.prompts[0]
    base = JudgeReward(engine=ScriptedEngine(['{"rating": 2}'], embedded_tokenizer), response_column="base_output",
                       output_column="base_reward")
    out = base.process({"instruction": ["q"], "base_output": ["b"]}, seed=0)
    assert out["base_reward"] == [2.0] and out["base_reward_error"] == [None]


def test_judge_reward_averages_sampled_ratings(embedded_tokenizer):
    answers = ['{"rating": 8}', '{"rating": 10}', "no json", '{"rating": 12}', "nope", "still no"]
    engine = ScriptedEngine(answers, embedded_tokenizer)
    step = JudgeReward(engine=engine, num_samples=3, temperature=0.7)
    out = step.process({"instruction": ["q1", "q2"], "response": ["a1", "a2"]}, seed=4)
    assert engine.sampling.n == 3 and engine.sampling.temperature == 0.7
    assert engine.seeds == row_seeds(4, 2)  # each row's own seed; its samples draw from seed + j
    # row 1: the mean of the ratings that parse; row 2: none parses -> null with the first reason
    assert out["instruct_reward"] == [9.0, None]
    assert "1-10" in out["instruct_reward_error"][1]
    assert step.stats["parsed"] == 1 and step.stats["unparseable"] == 1
    with pytest.raises(ValueError, match="num_samples"):
        JudgeReward(engine=engine, num_samples=0)


@pytest.mark.slow
def test_judge_reward_on_embedded_model(embedded_engine):
    step = JudgeReward(engine=embedded_engine, max_tokens=12)
    out = step.process({"instruction": ["What is 2+2?", "Name a fruit."], "response": ["4", "An apple."]}, seed=0)
    for value, error in zip(out["instruct_reward"], out["instruct_reward_error"]):
        assert (value is not None and 1.0 <= value <= 10.0 and error is None) or (value is None and error)


@pytest.fixture(scope="module")
def tiny_rm_other_pad_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny RM whose config pad id (0, <|endoftext|>) differs from its tokenizer's (2, <|im_end|>)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_rm_other_pad")
    tok = embedded_tokenizer
    assert tok.pad_token_id != 0
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, num_labels=1, pad_token_id=0,
    )
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_batch_scores_equal_single_scores_when_pad_ids_differ(tiny_rm_other_pad_dir):
    """transformers pools the rightmost token that is not config.pad_token_id (modeling_layers.py:174-190);
    padding with the tokenizer's different pad id made padded rows pool a pad position."""
    convs = [_conv(f"Question {i}?", "answer " * (1 + 9 * i)) for i in range(8)]  # 1 to 64 words
    seen = []
    batched = RewardModelScorer(tiny_rm_other_pad_dir, batch_size=8).score(convs, progress=lambda k, t: seen.append((k, t)))
    single = RewardModelScorer(tiny_rm_other_pad_dir, batch_size=1)
    alone = [single.score([c])[0] for c in convs]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert sum(k for k, _ in seen) == 8 and sum(t for _, t in seen) == sum(len(single.encode(c)) for c in convs)
