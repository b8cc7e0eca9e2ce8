"""The engine contract on the real embedded model: per-completion seeds independent of the batch, prompts
past the context failed alone, truthful token counts, greedy ``n`` generated once (transformers engine,
continuous-batching loop and ``model.generate`` fallback)."""

from __future__ import annotations

import dataclasses

import pytest

from magpie_hf.engines import SamplingConfig
from magpie_hf.engines.base import count_text_tokens
from magpie_hf.steps import Responses

PRE_QUERY = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
)
STORY = "Once upon a time"


@pytest.fixture(params=["loop", "generate"])
def engine(request, embedded_engine, monkeypatch):
    """The embedded engine, through its continuous-batching loop or its ``model.generate`` fallback."""
    if request.param == "generate":
        monkeypatch.setattr(embedded_engine, "_supports_loop", False)
    return embedded_engine


def test_a_seeded_row_does_not_depend_on_its_batch(engine, monkeypatch):
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=8, n=2, stop=("<|im_end|>",))
    prompts, seeds = [PRE_QUERY, STORY, PRE_QUERY, "def f(x):"], [100, 164, 228, 292]
    monkeypatch.setattr(engine, "batch_size", 3)  # 8 completions, 3 slots: rows leave and join
    batched = engine.generate(prompts, sampling, seeds=seeds)
    monkeypatch.setattr(engine, "batch_size", 32)
    alone = [engine.generate([p], sampling, seeds=[s])[0] for p, s in zip(prompts, seeds)]
    assert batched == alone
    assert batched[0] != batched[2]  # the same prompt, another seed
    assert batched[0][0] != batched[0][1]  # sample j draws from seed + j
    assert engine.generate([PRE_QUERY], sampling, seeds=[101])[0][0] == batched[0][1]


def test_prompts_past_the_context_fail_alone(engine, monkeypatch):
    """A 16-row Responses shard with one prompt longer than the context answers the other 15."""
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, max_model_len=128))
    assert engine.context_length() == 128
    instructions = [f"What is {i} plus {i}?" for i in range(16)]
    instructions[9] = "Summarize: " + "the quick brown fox jumps over the lazy dog " * 20
    step = Responses(engine=engine, max_tokens=4)
    step.load()
    out = step.process({"instruction": instructions}, seed=0)
    assert [i for i, r in enumerate(out["response"]) if r is None] == [9]
    assert "the model's context is 128" in out["response_error"][9] and step.stats["prompt_too_long"] == 1
    assert all(isinstance(r, str) and r for i, r in enumerate(out["response"]) if i != 9)
    # a prompt that fits but leaves less than max_tokens: "length" where the context ends
    prompt = STORY
    while len(engine.prompt_token_ids([prompt])[0]) < 124:
        prompt += " and then"
    [[near_end]] = engine.generate([prompt], SamplingConfig(temperature=0, max_tokens=50))
    assert near_end.num_tokens <= 4 and (near_end.finish_reason == "stop" or near_end.num_tokens == 4)


def test_stop_string_tokens_are_not_counted(engine):
    tok = engine.tokenizer
    free = engine.generate([STORY], SamplingConfig(temperature=0, max_tokens=20))[0][0]
    word = " " + free.text.split()[3]
    out = engine.generate([STORY], SamplingConfig(temperature=0, max_tokens=20, stop=(word,)))[0][0]
    assert out.finish_reason == "stop" and free.text.startswith(out.text) and word not in out.text
    assert out.num_tokens == len(tok(out.text, add_special_tokens=False)["input_ids"]) < free.num_tokens


def test_greedy_n_is_generated_once(embedded_engine):
    seen = []
    out = embedded_engine.generate([STORY, "def f(x):"], SamplingConfig(temperature=0, max_tokens=6, n=3),
                                   progress=lambda k, t: seen.append(k))
    assert all(c == cs[0] for cs in out for c in cs) and sum(seen) == 6


def test_count_text_tokens(embedded_tokenizer):
    tok = embedded_tokenizer
    ids = tok("Hello world, how are you?", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert count_text_tokens(tok, ids, "Hello world, how are you?") == len(ids) - 1  # the EOS is not text
    assert count_text_tokens(tok, ids, "Hello world") == len(tok("Hello world", add_special_tokens=False)["input_ids"])
    assert count_text_tokens(tok, ids, "") == 0
