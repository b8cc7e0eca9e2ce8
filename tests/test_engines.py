"""The transformers engine on the real embedded model (SmolLM2-135M-Instruct GGUF)."""

from __future__ import annotations

import logging

import pytest

from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine, resolve_backend
from magpie_hf.engines.transformers import TransformersEngine

PRE_QUERY = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n"
)
PROMPTS = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    PRE_QUERY + "Write a short poem about the sea and the wind and the stars.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time",
    "def fibonacci(n):",
]


def test_auto_picks_transformers_here_and_logs_why(caplog):
    with caplog.at_level(logging.INFO, logger="magpie_hf.engines"):
        assert resolve_backend(EngineConfig.embedded(backend="auto")) == "transformers"
    assert "engine 'auto' chose transformers" in caplog.text


def test_load_engine_is_cached(embedded_engine):
    assert isinstance(embedded_engine, TransformersEngine)
    assert load_engine(EngineConfig.embedded()) is embedded_engine


def test_batched_greedy_equals_unbatched(embedded_engine, monkeypatch):
    """Left padding, row dropping and slot refilling must not change greedy output."""
    greedy = SamplingConfig(temperature=0, max_tokens=10, stop=("\n",))
    monkeypatch.setattr(embedded_engine, "batch_size", 3)
    batched = embedded_engine.generate(PROMPTS + PROMPTS[:2], greedy)  # 6 rows, 3 slots: refills happen
    monkeypatch.undo()
    alone = [embedded_engine.generate([p], greedy)[0] for p in PROMPTS]
    assert batched[:4] == alone
    assert batched[4:] == alone[:2]


def test_n_samples_and_seed_reproducibility(embedded_engine):
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=8, n=3, seed=123)
    first = embedded_engine.generate([PRE_QUERY, PROMPTS[2]], sampling)
    assert [len(c) for c in first] == [3, 3]
    assert first == embedded_engine.generate([PRE_QUERY, PROMPTS[2]], sampling)
    assert len({c.text for c in first[0]}) > 1  # n samples of one prompt differ
    other = embedded_engine.generate([PRE_QUERY, PROMPTS[2]], sampling.replace(seed=124))
    assert other != first


def test_greedy_is_deterministic_without_seed(embedded_engine):
    greedy = SamplingConfig(temperature=0, max_tokens=8, n=2)
    out = embedded_engine.generate([PROMPTS[0]], greedy)
    assert out[0][0] == out[0][1] == embedded_engine.generate([PROMPTS[0]], greedy)[0][0]


def test_max_tokens_gives_length(embedded_engine):
    out = embedded_engine.generate([PROMPTS[2]], SamplingConfig(temperature=0, max_tokens=5))[0][0]
    assert out.finish_reason == "length" and out.num_tokens == 5
    assert len(embedded_engine.tokenizer(out.text, add_special_tokens=False)["input_ids"]) <= 6


def test_stop_string_is_excluded(embedded_engine):
    free = embedded_engine.generate([PROMPTS[2]], SamplingConfig(temperature=0, max_tokens=20))[0][0]
    word = free.text.split()[2]  # a word the model is known to produce
    out = embedded_engine.generate([PROMPTS[2]], SamplingConfig(temperature=0, max_tokens=20, stop=(word,)))[0][0]
    assert out.finish_reason == "stop"
    assert word not in out.text
    assert free.text.startswith(out.text)


def test_stop_token_id_ends_and_is_excluded(embedded_engine):
    tok = embedded_engine.tokenizer
    free = embedded_engine.generate([PROMPTS[2]], SamplingConfig(temperature=0, max_tokens=12))[0][0]
    ids = tok(free.text, add_special_tokens=False)["input_ids"]
    out = embedded_engine.generate(
        [PROMPTS[2]], SamplingConfig(temperature=0, max_tokens=12, stop_token_ids=(ids[3],))
    )[0][0]
    k = ids.index(ids[3])  # the first time that token is generated
    assert out.finish_reason == "stop" and out.num_tokens == k
    assert out.text == tok.decode(ids[:k])


def test_magpie_query_stops_at_end_of_turn(embedded_engine):
    """Magpie step 1: the pre-query template alone makes the model write a user query."""
    sampling = SamplingConfig(temperature=1.0, max_tokens=32, n=4, seed=0, stop=("<|im_end|>",))
    out = embedded_engine.generate([PRE_QUERY], sampling)[0]
    assert any(c.finish_reason == "stop" for c in out)
    for c in out:
        assert "<|im_end|>" not in c.text
        assert 0 < c.num_tokens <= 32


def test_repetition_penalty_changes_greedy_output(embedded_engine):
    base = SamplingConfig(temperature=0, max_tokens=12)
    plain = embedded_engine.generate([PROMPTS[3]], base)[0][0]
    penalised = embedded_engine.generate([PROMPTS[3]], base.replace(repetition_penalty=1.5))[0][0]
    assert plain.text != penalised.text


def test_progress_callback_counts_completions(embedded_engine):
    seen = []
    embedded_engine.generate(
        PROMPTS[:2], SamplingConfig(max_tokens=4, n=2, seed=0), progress=lambda n, t: seen.append((n, t))
    )
    assert sum(n for n, _ in seen) == 4 and all(0 <= t <= 4 for _, t in seen)


def test_bad_input_is_a_clear_error(embedded_engine):
    with pytest.raises(TypeError, match="list of prompts"):
        embedded_engine.generate("a string", SamplingConfig(max_tokens=2))
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        embedded_engine.generate([""], SamplingConfig(max_tokens=2))
    assert embedded_engine.generate([], SamplingConfig(max_tokens=2)) == []
