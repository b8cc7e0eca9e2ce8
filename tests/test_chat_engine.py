"""The ``openai-chat`` engine (``/v1/chat/completions`` through the official SDK) against a real server process
(tests/openai_server.py) on 127.0.0.1, and the steps that answer or judge conversations running through it:
Responses, a judge (TaskCategory, JSON schema via response_format), a Llama-Guard-style step; the raw-prompt
steps refuse it at load time with the way out."""

from __future__ import annotations

import logging

import pytest

from magpie_hf.engines import EngineConfig, SamplingConfig, load_engine
from magpie_hf.engines.openai import OpenAIChatEngine, _finish
from magpie_hf.steps import MagpieInstructions, Responses

QUESTION = [{"role": "user", "content": "Name a fruit."}]


def chat_engine(server, **overrides) -> OpenAIChatEngine:
    kwargs = dict(
        model="embedded", backend="openai-chat", base_url=server.base_url, api_key_env=server.key_env,
        max_concurrency=4, max_retries=2,
    )
    kwargs.update(overrides)
    return OpenAIChatEngine(EngineConfig(**kwargs))


def test_load_engine_builds_the_chat_engine_without_a_tokenizer(server):
    engine = load_engine(EngineConfig("embedded", backend="openai-chat", base_url=server.base_url, api_key_env=server.key_env))
    assert isinstance(engine, OpenAIChatEngine) and engine.tokenizer is None and not engine.raw_prompts
    assert engine.context_length() == 2048


def test_greedy_answer_matches_the_local_engine(server, embedded_engine):
    templates = embedded_engine.chat_templates()  # what Responses sends: the template's end-of-turn stops
    sampling = SamplingConfig(temperature=0, max_tokens=16, stop=templates.stop_strings, stop_token_ids=templates.stop_token_ids)
    remote = chat_engine(server).generate_chat([QUESTION], sampling)[0][0]
    local = embedded_engine.generate_chat([QUESTION], sampling)[0][0]
    assert remote.ok and remote.text == local.text.strip()
    assert (remote.num_tokens, remote.finish_reason) == (local.num_tokens, local.finish_reason)  # counts from usage
    body = server.bodies()[-1]
    assert body["path"] == "/v1/chat/completions" and body["messages"] == QUESTION


def test_every_sampling_field_is_sent_and_n_split_keeps_seeds(server):
    sampling = SamplingConfig(temperature=1.0, top_p=0.95, max_tokens=4, n=3, repetition_penalty=1.05)
    whole = chat_engine(server).generate_chat([QUESTION], sampling, seeds=[50])
    body = server.bodies()[-1]
    expected = {
        "temperature": 1.0, "top_p": 0.95, "max_tokens": 4, "n": 3, "seed": 50, "top_k": -1, "min_p": 0.0,
        "repetition_penalty": 1.05, "repeat_penalty": 1.05, "stop_token_ids": [], "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }
    assert {k: body.get(k) for k in expected} == expected and "stop" in body
    server.reset()
    split = chat_engine(server, max_n_per_request=1).generate_chat([QUESTION], sampling, seeds=[50])
    assert split == whole
    assert sorted((b["n"], b["seed"]) for b in server.bodies()) == [(1, 50), (1, 51), (1, 52)]


def test_fallback_when_the_chat_server_ignores_n(server, caplog):
    sampling = SamplingConfig(temperature=1.0, max_tokens=4, n=3, seed=5)
    reference = chat_engine(server).generate_chat([QUESTION], sampling)
    server.reset()
    server.configure(ignore_n=True)
    with caplog.at_level(logging.WARNING, logger="magpie_hf.engines.openai"):
        assert chat_engine(server).generate_chat([QUESTION], sampling) == reference
    assert caplog.text.count("does not serve n > 1") == 1


def test_hosted_api_mode_sends_only_openai_fields(server):
    engine = chat_engine(server, sampling_extensions=False)
    engine.generate_chat([QUESTION], SamplingConfig(max_tokens=4, temperature=0))
    body = server.bodies()[-1]
    assert body["max_completion_tokens"] == 4 and "max_tokens" not in body
    assert not {"top_k", "min_p", "repetition_penalty", "stop_token_ids"} & set(body)
    with pytest.raises(ValueError, match="sampling_extensions"):
        engine.generate_chat([QUESTION], SamplingConfig(max_tokens=4, repetition_penalty=1.2))


def test_raw_prompts_are_refused_by_the_chat_engine(server):
    with pytest.raises(TypeError, match="backend='openai'"):
        chat_engine(server).generate(["<|im_start|>user\n"], SamplingConfig(max_tokens=4))


def test_finish_reasons_are_truthful():
    assert _finish("stop") == ("stop", None) and _finish("length") == ("length", None)
    reason, error = _finish("content_filter")
    assert reason == "abort" and "content_filter" in error


def test_magpie_step_one_refuses_the_chat_engine_with_the_way_out(server):
    step = MagpieInstructions(engine=chat_engine(server), num_rows=4)
    with pytest.raises(ValueError) as info:
        step.load()
    message = str(info.value)
    assert "pre-query" in message and "applies the chat" in message
    assert "backend='openai'" in message and "/v1/completions" in message


def test_multi_turn_and_base_responses_refuse_the_chat_engine(server):
    from magpie_hf.steps.base_responses import BaseResponses
    from magpie_hf.steps.multi_turn import MultiTurn

    engine = chat_engine(server)
    with pytest.raises(ValueError, match="backend='openai'"):
        MultiTurn(engine=engine, n_turns=2).load()
    with pytest.raises(ValueError, match="backend='openai'"):
        BaseResponses(engine=engine).load()
    with pytest.raises(ValueError, match="keep_default_system_prompt"):
        Responses(engine=engine, keep_default_system_prompt=False).load()


def test_responses_through_the_chat_engine(server):
    server.configure(max_prompt_tokens=80)
    step = Responses(engine=chat_engine(server), max_tokens=12, system_prompt="Answer briefly.")
    step.load()
    out = step.process({"instruction": ["Name a fruit.", "Describe bread. " * 40, "Say hi."]}, seed=0)
    assert [r is None for r in out["response"]] == [False, True, False]
    assert "maximum context length" in out["response_error"][1] and step.stats["failed"] == 1
    assert out["conversations"][0] == [
        {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": out["response"][0]}
    ]
    assert out["gen_response_configs"][0]["engine"] == "openai-chat"
    sent = [b["messages"] for b in server.bodies()]
    assert all(m[0] == {"role": "system", "content": "Answer briefly."} for m in sent)  # the step's system prompt


def test_judge_through_the_chat_engine_with_a_json_schema(server):
    from magpie_hf.steps.judges import TASK_CATEGORIES, TaskCategory

    step = TaskCategory(engine=chat_engine(server), max_tokens=48)
    step.load()
    out = step.process({"instruction": ["Write a poem about the sea."]}, seed=0)
    body = server.bodies()[-1]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == step.schema()
    for label, error in zip(out["task_category"], out["task_category_error"]):
        assert (label in TASK_CATEGORIES and error is None) or (label is None and error)
    assert out["task_category_generator"] == ["embedded"]


def test_guard_step_through_the_chat_engine(server):
    from magpie_hf.steps.safety import LlamaGuard, verdict_regex

    step = LlamaGuard(engine=chat_engine(server, model="stand-in/Llama-Guard-3-tiny"), max_tokens=8)
    step.load()
    batch = {"instruction": ["How do I bake bread?", "", "Tell me a joke."], "response": ["Mix and bake.", "x", None]}
    out = step.process(batch, seed=0)
    # the guard's conversation goes out as messages: the server's template builds the moderation prompt
    sent = [b["messages"] for b in server.bodies()]
    assert sorted(map(len, sent)) == [1, 2]
    assert [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix and bake."}] in sent
    assert out["llama_guard_error"][1] == "empty instruction"
    # the verdict format travels in each server's field, and every answered row parses
    regex = verdict_regex("llama-guard-3")
    assert all(b["structured_outputs"] == {"regex": regex} and b["regex"] == regex and "grammar" in b for b in server.bodies())
    assert step.stats["unparseable"] == 0 and step.stats["safe"] + step.stats["unsafe"] == 2


def test_json_object_form_for_llama_cpp_python(server):
    """llama-cpp-python's server takes a schema only as {"type": "json_object", "schema": ...}."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    engine = chat_engine(server, extra={"response_format": "json_object", "extra_body": {"top_k": 0}})
    out = engine.generate_chat([QUESTION], SamplingConfig(max_tokens=12, temperature=0, json_schema=schema))[0][0]
    body = server.bodies()[-1]
    assert body["response_format"] == {"type": "json_object", "schema": schema}
    assert body["top_k"] == 0  # extra_body is merged last: it overrides a field the engine sends
    assert out.ok and out.text.startswith("{")
