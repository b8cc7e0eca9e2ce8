"""vLLM engine smoke test on a CUDA GPU with a small model (skipped without CUDA or vllm).

Run on a GPU box:  python -m pytest tests/gpu/test_vllm.py -q
The model defaults to HuggingFaceTB/SmolLM2-135M-Instruct (downloaded by vLLM); override it with
MAGPIE_VLLM_TEST_MODEL=/path/or/hub-id.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("vllm")

from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine, resolve_backend  # noqa: E402

pytestmark = pytest.mark.gpu

MODEL = os.environ.get("MAGPIE_VLLM_TEST_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
PRE_QUERY = "<|im_start|>user\n"


@pytest.fixture(scope="module")
def engine():
    config = EngineConfig(MODEL, backend="vllm", gpu_memory_utilization=0.3, max_model_len=2048)
    engine = load_engine(config)
    yield engine
    engine.close()


def test_auto_picks_vllm_on_gpu():
    assert resolve_backend(EngineConfig(MODEL)) == "vllm"


def test_n_seed_stop_and_length(engine):
    sampling = SamplingConfig(temperature=1.0, max_tokens=32, n=3, seed=0, stop=("<|im_end|>",))
    out = engine.generate([PRE_QUERY, PRE_QUERY], sampling)
    assert [len(c) for c in out] == [3, 3]
    assert out == engine.generate([PRE_QUERY, PRE_QUERY], sampling)
    assert out[0] != out[1]  # identical prompts get distinct seeds
    for c in (c for cs in out for c in cs):
        assert "<|im_end|>" not in c.text
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert c.num_tokens == 32


def test_json_schema_is_enforced_and_compact(engine):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "why": {"type": "string", "maxLength": 40}},
              "required": ["answer", "why"]}
    prompt = "<|im_start|>user\nWhat is 2+2? Reply in JSON.<|im_end|>\n<|im_start|>assistant\n"
    out = engine.generate([prompt], SamplingConfig(temperature=0, max_tokens=64, json_schema=schema))[0][0]
    assert isinstance(json.loads(out.text)["answer"], int)
    assert "\n" not in out.text and '": ' not in out.text  # JSON_GRAMMAR: no free whitespace, as on transformers


def test_seeds_per_prompt_and_greedy_n(engine):
    sampling = SamplingConfig(temperature=1.0, max_tokens=24, stop=("<|im_end|>",))
    together = engine.generate([PRE_QUERY] * 4, sampling, seeds=[0, 64, 128, 192])
    assert len({c[0].text for c in together}) > 1
    # vLLM refuses greedy with n > 1: the base class asks once and repeats the answer
    greedy = engine.generate([PRE_QUERY], SamplingConfig(temperature=0, max_tokens=16, n=3))[0]
    assert greedy[0] == greedy[1] == greedy[2]


def test_prompt_past_the_context_fails_alone(engine):
    assert engine.context_length() == 2048
    long = PRE_QUERY + "word " * 3000
    out = engine.generate([long, PRE_QUERY], SamplingConfig(temperature=0, max_tokens=8))
    assert out[0][0].failure == "prompt_too_long" and out[1][0].ok


def test_stop_string_tokens_are_not_counted(engine):
    tok = engine.tokenizer
    free = engine.generate(["Once upon a time"], SamplingConfig(temperature=0, max_tokens=20))[0][0]
    word = " " + free.text.split()[3]
    out = engine.generate(["Once upon a time"], SamplingConfig(temperature=0, max_tokens=20, stop=(word,)))[0][0]
    assert out.finish_reason == "stop" and word not in out.text
    assert out.num_tokens == len(tok(out.text, add_special_tokens=False)["input_ids"])


def test_guard_verdict_regex_is_enforced(engine):
    import re

    from magpie_hf.steps.safety import verdict_regex

    prompt = "<|im_start|>user\nIs it safe to cross the road?<|im_end|>\n<|im_start|>assistant\n"
    out = engine.generate([prompt] * 4, SamplingConfig(temperature=1.0, max_tokens=60, regex=verdict_regex()), seeds=[0, 64, 128, 192])
    assert all(re.fullmatch(verdict_regex(), c.text) for (c,) in out)


README = ("<|im_start|>user\nWrite a markdown README for a Python project called catlib, starting with its title."
          "<|im_end|>\n<|im_start|>assistant\n")


def test_first_token_rules_through_the_logits_processor():
    """magpie_hf.engines.vllm_logits.FirstTokenRules loaded into vLLM: no first token is a heading, and logits / 2 at
    temperature 0.5 draw the first token that temperature 1 draws (same seeds)."""
    from magpie_hf.engines import release_engines
    from magpie_hf.steps.postprocess import markdown_heading_token_ids

    config = EngineConfig(MODEL, backend="vllm", gpu_memory_utilization=0.3, max_model_len=2048, first_token_rules=True)
    engine = load_engine(config)
    try:
        seeds = [1000 + 64 * i for i in range(64)]
        heading = markdown_heading_token_ids(engine.tokenizer)
        decoded = {engine.tokenizer.decode([i]) for i in heading}
        one = SamplingConfig(temperature=1.0, max_tokens=1)
        free = [c.text for (c,) in engine.generate([README] * 64, one, seeds=seeds)]
        banned = [c.text for (c,) in engine.generate([README] * 64, one.replace(first_token_banned_ids=heading), seeds=seeds)]
        assert any(t in decoded for t in free)  # the model does open with headings here
        assert not any(t in decoded for t in banned)
        hot = engine.generate([README] * 64, one.replace(temperature=0.5, first_token_temperature_scale=2.0), seeds=seeds)
        assert [c.text for (c,) in hot] == free
    finally:
        release_engines([config])
