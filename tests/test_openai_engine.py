"""The ``openai`` completions engine (official SDK) against a real HTTP server process (tests/openai_server.py)
on 127.0.0.1: same output as the local engine, retries and Retry-After, per-row errors, ``n`` split over
requests and the fallback for servers that ignore or refuse ``n``, every sampling field sent, the key kept out
of logs and records."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
from magpie_hf.engines.openai import OpenAICompletionsEngine, OpenAIServerError
from magpie_hf.steps import MagpieInstructions

PROMPT = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [PROMPT, "<|im_start|>user\n", "Once upon a time", "<|im_start|>user\nHi<|im_end|>\n"]
LONG = "<|im_start|>user\n" + "Tell me everything about the history of bread, " * 12 + "<|im_end|>\n<|im_start|>assistant\n"


def make_engine(server, **overrides) -> OpenAICompletionsEngine:
    """A fresh engine (not the load_engine cache: tests change what it learns about the server)."""
    kwargs = dict(backend="openai", base_url=server.base_url, api_key_env=server.key_env, max_concurrency=4, max_retries=3)
    kwargs.update(overrides)
    return OpenAICompletionsEngine(EngineConfig.embedded(**kwargs))


def test_load_engine_picks_openai_for_base_url(server, caplog):
    config = EngineConfig.embedded(backend="auto", base_url=server.base_url, api_key_env=server.key_env)
    with caplog.at_level(logging.INFO, logger="magpie_hf.engines"):
        engine = load_engine(config)
    assert isinstance(engine, OpenAICompletionsEngine)
    assert "chose openai" in caplog.text
    assert engine.context_length() == 2048  # the server's /v1/models max_model_len


def test_greedy_matches_local_engine(server, embedded_engine):
    sampling = SamplingConfig(temperature=0, max_tokens=12, stop=("<|im_end|>",))
    remote = make_engine(server).generate([PROMPT], sampling)[0][0]
    local = embedded_engine.generate([PROMPT], sampling)[0][0]
    assert (remote.text, remote.num_tokens, remote.finish_reason) == (local.text, local.num_tokens, local.finish_reason)


def test_token_id_prompts_carry_bos_once(server):
    engine = make_engine(server)
    tok = engine.tokenizer
    prompt = tok.bos_token + "Hello"
    engine.generate([prompt], SamplingConfig(max_tokens=2, temperature=0))
    sent = server.bodies()[-1]["prompt"]
    assert sent == tok(prompt, add_special_tokens=False)["input_ids"] and sent.count(tok.bos_token_id) == 1
    text = make_engine(server, extra={"prompt_format": "text"})
    text.generate([prompt], SamplingConfig(max_tokens=2, temperature=0))
    assert server.bodies()[-1]["prompt"] == prompt


def test_text_prompts_leave_the_bos_to_the_server(server):
    """With prompt_format='text' the server tokenizes with the model's special tokens: when that tokenizer
    adds a BOS by itself, the BOS text our prompts carry is dropped so that it does not come twice."""
    engine = make_engine(server, extra={"prompt_format": "text"})
    bos = engine.tokenizer.bos_token
    engine._server_bos = bos  # a model whose tokenizer adds BOS (SmolLM2's does not)
    engine.generate([bos + "Hello", "Hi"], SamplingConfig(max_tokens=1, temperature=0))
    assert sorted(b["prompt"] for b in server.bodies()) == ["Hello", "Hi"]


def test_n_seed_length_and_order(server):
    engine = make_engine(server)
    sampling = SamplingConfig(temperature=1.0, max_tokens=6, n=2, seed=7)
    first = engine.generate(PROMPTS, sampling)
    assert [len(c) for c in first] == [2, 2, 2, 2]
    assert first == engine.generate(PROMPTS, sampling)  # same seed, same texts, in prompt order
    for completion in (c for cs in first for c in cs):
        assert completion.finish_reason in ("stop", "length")
        if completion.finish_reason == "length":
            assert completion.num_tokens == 6
    # identical prompts get distinct seeds, so Magpie step 1 does not repeat itself
    same = engine.generate([PROMPTS[1]] * 3, SamplingConfig(max_tokens=8, seed=1))
    assert len({c[0].text for c in same}) > 1


def test_every_sampling_field_is_sent(server):
    sampling = SamplingConfig(
        temperature=0.7, top_p=0.9, max_tokens=5, n=2, seed=11, repetition_penalty=1.1,
        stop=("\n\n",), stop_token_ids=(2,),
    )
    make_engine(server).generate([PROMPT], sampling, seeds=[40])
    (body,) = server.bodies()
    expected = {
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "n": 2, "seed": 40, "stop": ["\n\n"], "stop_token_ids": [2],
        "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.1, "repeat_penalty": 1.1,
        "presence_penalty": 0.0, "frequency_penalty": 0.0,
    }
    assert {k: body.get(k) for k in expected} == expected
    assert body["path"] == "/v1/completions" and isinstance(body["prompt"], list)


# ---------------------------------------------------------------------- constraints and first-step rules
def test_regex_goes_out_in_every_servers_field_and_is_honoured(server):
    from magpie_hf.engines.constrained import regex_to_gbnf

    pattern = r"(yes|no)(, because [a-z ]{1,12})?"
    out = make_engine(server).generate([PROMPT], SamplingConfig(temperature=1.0, max_tokens=12, seed=3, regex=pattern))[0][0]
    (body,) = server.bodies()
    assert body["structured_outputs"] == {"regex": pattern}  # vLLM
    assert body["regex"] == pattern  # SGLang
    assert body["grammar"] == regex_to_gbnf(pattern)  # llama.cpp
    assert "response_format" not in body and "guided_regex" not in body
    assert re.fullmatch(pattern, out.text)  # the test server (vLLM's wire format) applies it

    hosted = make_engine(server, sampling_extensions=False)
    with pytest.raises(ValueError, match="sampling_extensions=False"):
        hosted.generate([PROMPT, PROMPT], SamplingConfig(max_tokens=4, regex=pattern))
    assert len(server.bodies()) == 1  # refused before any request


def test_first_step_rules_are_refused_or_become_a_counted_filter(server, embedded_engine):
    engine = make_engine(server)
    with pytest.raises(ValueError, match="cannot apply first-step logits rules"):
        engine.generate([PROMPT], SamplingConfig(max_tokens=4, first_token_banned_ids=(19,)))
    hot = MagpieInstructions(engine=engine, num_rows=4, first_token_temperature_scale=1.2)
    with pytest.raises(ValueError, match="first_token_temperature_scale=1.2"):
        hot.load()
    assert server.bodies() == []

    # no_markdown_start: a "query" opening with '#' is dropped and counted, the others are the same rows
    readme = ("<|im_start|>user\nWrite a markdown README for a Python project called catlib, starting with its title."
              "<|im_end|>\n<|im_start|>assistant\n")
    kwargs = {"engine": engine, "num_rows": 16, "max_tokens": 3, "pre_query_template": readme, "drop_truncated": False, "seed": 2}
    free = MagpieInstructions(**kwargs)
    ruled = MagpieInstructions(no_markdown_start=True, **kwargs)
    free.load()
    ruled.load()
    a, b = free.generate(offset=0, num_rows=16, seed=9), ruled.generate(offset=0, num_rows=16, seed=9)
    headings = [t for t in a["instruction"] if t.startswith("#")]
    assert headings and ruled.stats["dropped_markdown_heading"] == len(headings)
    assert b["instruction"] == [t for t in a["instruction"] if not t.startswith("#")]
    assert {c["instruction_filters"] for c in b["gen_input_configs"]} == {"markdown_heading"}
    assert all("first_token" not in json.dumps(body) for body in server.bodies())


def test_stop_string_excluded(server):
    out = make_engine(server).generate([PROMPT], SamplingConfig(temperature=0, max_tokens=40, stop=(".",)))[0][0]
    assert "." not in out.text and out.finish_reason == "stop"


def test_retries_on_503_then_succeeds(server):
    server.call("/test/fail", {"count": 2, "status": 503, "retry_after": 0.05})
    out = make_engine(server).generate([PROMPT], SamplingConfig(temperature=0, max_tokens=3))
    assert out[0][0].ok and out[0][0].num_tokens >= 1
    assert server.requests_seen() == 3  # two refusals, one answer


def test_retry_after_is_honoured(server):
    server.call("/test/fail", {"count": 1, "status": 429, "retry_after": 1.5})
    start = time.monotonic()
    out = make_engine(server).generate([PROMPT], SamplingConfig(temperature=0, max_tokens=2))
    waited = time.monotonic() - start
    assert out[0][0].ok and server.requests_seen() == 2
    assert waited >= 1.5  # the SDK's own first backoff is at most 0.5 s


def test_gives_up_after_max_retries(server):
    server.call("/test/fail", {"count": 10, "status": 429, "retry_after": 0.01})
    with pytest.raises(OpenAIServerError, match="failed after 4 attempts") as info:
        make_engine(server).generate([PROMPT], SamplingConfig(max_tokens=3))
    assert server.base_url in str(info.value) and "429" in str(info.value)
    assert server.requests_seen() == 4


def test_one_prompt_refused_nulls_that_row_only(server, caplog):
    server.configure(max_prompt_tokens=40)
    engine = make_engine(server)
    with caplog.at_level(logging.WARNING):
        out = engine.generate([PROMPT, LONG, PROMPT], SamplingConfig(temperature=0, max_tokens=4, n=2))
    assert [len(c) for c in out] == [2, 2, 2]
    assert all(c.ok for c in out[0] + out[2])
    for failed in out[1]:
        assert failed.finish_reason == "error" and failed.text == "" and failed.num_tokens == 0
        assert failed.error.startswith(f"HTTP 400 from {server.base_url}/completions") and "maximum context length" in failed.error
    assert "does not serve n > 1" not in caplog.text  # a refused prompt is not mistaken for a refused n
    assert engine._n_limit is None


def test_every_request_refused_fails_the_call(server):
    server.configure(max_prompt_tokens=40)
    with pytest.raises(OpenAIServerError, match="refused every request"):
        make_engine(server).generate([LONG, LONG + "x"], SamplingConfig(max_tokens=4))


def test_n_is_split_by_max_n_per_request_with_per_request_seeds(server):
    sampling = SamplingConfig(temperature=1.0, max_tokens=4, n=5)
    reference = make_engine(server).generate([PROMPT, PROMPTS[1]], sampling, seeds=[100, 900])
    assert sorted((b["n"], b["seed"]) for b in server.bodies()) == [(5, 100), (5, 900)]
    server.reset()
    server.configure(max_n=2)  # a server with two parallel slots
    split = make_engine(server, max_n_per_request=2).generate([PROMPT, PROMPTS[1]], sampling, seeds=[100, 900])
    assert split == reference  # sample j of a prompt draws from seed + j, however the requests are cut
    assert sorted((b["n"], b["seed"]) for b in server.bodies()) == [
        (1, 104), (1, 904), (2, 100), (2, 102), (2, 900), (2, 902)
    ]


def test_fallback_when_the_server_ignores_n(server, caplog):
    sampling = SamplingConfig(temperature=1.0, max_tokens=4, n=4, seed=3)
    reference = make_engine(server).generate([PROMPT], sampling)
    server.reset()
    server.configure(ignore_n=True)
    engine = make_engine(server)
    with caplog.at_level(logging.WARNING, logger="magpie_hf.engines.openai"):
        assert engine.generate([PROMPT], sampling) == reference
        # n=4 answered with one choice (sample 0, seed 3), then one request per missing sample
        first = [(b["n"], b["seed"]) for b in server.bodies()]
        assert first[0] == (4, 3) and sorted(first[1:]) == [(1, 4), (1, 5), (1, 6)]
        assert engine.generate([PROMPT], sampling) == reference
    # the next call asks one sample per request from the start
    assert sorted((b["n"], b["seed"]) for b in server.bodies()[4:]) == [(1, 3), (1, 4), (1, 5), (1, 6)]
    assert caplog.text.count("does not serve n > 1") == 1  # logged once


def test_fallback_when_the_server_refuses_n_above_its_slots(server, caplog):
    sampling = SamplingConfig(temperature=1.0, max_tokens=4, n=3, seed=21)
    reference = make_engine(server).generate([PROMPT, PROMPTS[2]], sampling)
    server.reset()
    server.configure(max_n=1)  # llama-server -np 1: "n_cmpl cannot be greater than the number of slots"
    engine = make_engine(server)
    with caplog.at_level(logging.WARNING, logger="magpie_hf.engines.openai"):
        assert engine.generate([PROMPT, PROMPTS[2]], sampling) == reference
    assert caplog.text.count("does not serve n > 1") == 1 and "increase -np" in caplog.text


def test_extra_body_dict_through_load_engine(server):
    extra_body = {"chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": False}
    config = EngineConfig.embedded(
        backend="openai", base_url=server.base_url, api_key_env=server.key_env, extra=(("extra_body", extra_body),)
    )
    engine = load_engine(config)  # the config is the cache key: it must hash with a dict inside
    same = EngineConfig.embedded(
        backend="openai", base_url=server.base_url, api_key_env=server.key_env,
        extra={"extra_body": {"ignore_eos": False, "chat_template_kwargs": {"enable_thinking": False}}},
    )
    assert load_engine(same) is engine
    engine.generate([PROMPT], SamplingConfig(max_tokens=2, temperature=0))
    body = server.bodies()[-1]
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["ignore_eos"] is False


def test_key_never_logged_or_recorded(server, caplog):
    from magpie_hf.steps import Responses

    config = EngineConfig.embedded(backend="openai", base_url=server.base_url, api_key_env=server.key_env)
    with caplog.at_level(logging.DEBUG):
        engine = OpenAICompletionsEngine(config)
        engine.generate([PROMPT], SamplingConfig(max_tokens=2))
        step = Responses(engine=config)
        record = json.dumps(step.config_record())
    assert server.secret not in caplog.text
    assert server.secret not in record and server.secret not in config.describe() and server.secret not in repr(config)


def test_wrong_key_is_not_retried_and_not_shown(server, monkeypatch, caplog):
    monkeypatch.setenv(server.key_env, "sk-wrong-key-do-not-log")
    engine = make_engine(server)
    with caplog.at_level(logging.DEBUG), pytest.raises(OpenAIServerError, match="HTTP 401") as info:
        engine.generate([PROMPT], SamplingConfig(max_tokens=3))
    assert server.key_env in str(info.value)  # names where the key comes from, not the key
    assert "sk-wrong-key" not in caplog.text and "sk-wrong-key" not in str(info.value)
    assert server.requests_seen() == 1


def test_connection_refused_is_retried_then_reported():
    """A server that is not there fails when the engine starts (its /models asked twice), naming the URL."""
    config = EngineConfig.embedded(backend="openai", base_url="http://127.0.0.1:9/v1", max_retries=1)
    with pytest.raises(OpenAIServerError, match=r"127\.0\.0\.1:9/v1/models did not answer .* after 2 attempts.*--base_url"):
        OpenAICompletionsEngine(config).generate([PROMPT], SamplingConfig(max_tokens=3))


def test_missing_base_url_is_a_clear_error():
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompletionsEngine(EngineConfig.embedded(backend="openai"))


def test_responses_batch_with_one_refused_prompt(server):
    """A 400 for one prompt leaves that row null with the server's reason; the batch is answered."""
    from magpie_hf.steps import Responses

    server.configure(max_prompt_tokens=60)
    step = Responses(engine=make_engine(server), max_tokens=8)
    step.load()
    batch = {"instruction": ["Name a fruit.", "Describe bread. " * 40, "Say hi."]}
    out = step.process(batch, seed=0)
    assert out["instruction"] == batch["instruction"]  # nothing dropped
    assert out["response"][1] is None and out["conversations"][1] is None
    assert out["response_finish_reason"][1] == "error" and "maximum context length" in out["response_error"][1]
    assert all(isinstance(out["response"][i], str) and out["response_error"][i] is None for i in (0, 2))
    assert step.stats["failed"] == 1
